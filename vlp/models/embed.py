"""Visual and word tokenizers in front of the unified Transformer.

PatchEmbed: image -> (class token +) patch tokens (a patchify, or ConvStem's convolutions) with
            learned or fixed 2-D sin-cos positions.
            `resample_pos_embed` / `resize_image_state` carry learned positions to another image
            size (fine-tuning at a higher resolution, as BLIP, METER and LAVIS do).
TextEmbed:  token ids -> token + learned position embeddings.
BertEmbed:  BERT's embeddings: (token ids, or embeddings the caller built, e.g. visual tokens)
            + position + token type, then LayerNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, VisionConfig


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] embedding (Transformer / MAE convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (dim/2,)
    out = positions.double()[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid*grid, dim): half the channels encode the row, half the column (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # row index of each patch, row-major
    cols = coords.repeat(grid_size)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


class ConvStem(nn.Module):
    """A convolutional stem in place of the patchify (Xiao et al. 2021, "Early Convolutions
    Help Transformers See Better"): log2(patch_size) 3x3 stride-2 convolutions, each followed by
    a GroupNorm over all its channels and a GELU, channels doubling from `channels`, then a 1x1
    convolution to `width`. The same token grid as a patch_size patchify, but each token sees
    overlapping, growing receptive fields. (Xiao et al. use BatchNorm + ReLU; GroupNorm(1)
    needs no batch statistics, so it is the same in training and evaluation, on any number of
    processes.)"""

    def __init__(self, patch_size: int, width: int, channels: int = 16):
        super().__init__()
        convs = patch_size.bit_length() - 1
        if patch_size < 2 or 2 ** convs != patch_size:
            raise ValueError(f"a conv stem halves the image per convolution: patch_size="
                             f"{patch_size} must be a power of two >= 2")
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(convs):
            c_out = channels * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out),
                       nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)  # (B, width, H / patch, W / patch)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv), or a convolutional stem
    (`stem="conv"`: ConvStem) -> + positions."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, class_token: bool = True,
                 pos_embed: str = "learned", stem: str = "patch", stem_channels: int = 16):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        if stem == "patch":
            self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        elif stem == "conv":
            self.proj = ConvStem(patch_size, width, stem_channels)
        else:
            raise ValueError(f"unknown stem {stem!r}; choose patch or conv")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        n_tokens = self.num_patches + (1 if class_token else 0)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        elif pos_embed == "sincos":
            table = sincos_2d(width, self.grid_size)
            if class_token:  # the class token gets the zero position, as in MAE
                table = torch.cat([torch.zeros(1, width), table])
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose learned or sincos")
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {H}x{W}")
        # the conv runs in autocast's bf16; the class token and positions are added in the
        # parameters' own precision (fp32 master weights), as the text tower's are
        x = self.proj(pixel_values).to(self.pos_embed.dtype)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, num_patches, width), row-major patches
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + self.pos_embed


# Where PatchEmbeds sit in the state dicts vlp writes: a ViT tower's (`visual.embed`, under
# `towers.` / `core.towers.` in combined and fine-tuned models) and the single stream's
# (`patch_embed`, ViLT patches and the RoIAlign encoder). Only learned tables are in a state
# dict: sin-cos positions are a non-persistent buffer, recomputed when a model is built.
PATCH_POSITION_KEYS = ("visual.embed.pos_embed", "patch_embed.pos_embed")


def resample_pos_embed(pos: torch.Tensor, new_grid: int, num_prefix: int) -> torch.Tensor:
    """Learned positions (1, num_prefix + g*g, W) of a g x g patch grid -> (1, num_prefix +
    new_grid**2, W): the leading (class token) positions kept as they are, the grid resampled
    as a 2-D image by bicubic interpolation (F.interpolate, align_corners=False: timm's
    `resample_abs_pos_embed`, BLIP's `interpolate_pos_embed`). The same grid returns `pos`
    itself, bit for bit. Computed in float32 (bicubic in 16 bits rounds every tap), returned in
    `pos`'s dtype."""
    n_grid = pos.shape[1] - num_prefix
    old_grid = int(round(n_grid ** 0.5))
    if pos.ndim != 3 or pos.shape[0] != 1 or old_grid * old_grid != n_grid:
        raise ValueError(f"positions of shape {tuple(pos.shape)} with {num_prefix} leading "
                         "token(s) are not (1, prefix + g*g, width) of a square patch grid")
    if new_grid == old_grid:
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    W = pos.shape[2]
    grid = grid.reshape(1, old_grid, old_grid, W).permute(0, 3, 1, 2)  # (1, W, g, g), row-major
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic",
                         align_corners=False)  # (1, W, new, new)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, W).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_image_state(state: dict[str, torch.Tensor], vision: VisionConfig,
                       image_size: int) -> dict[str, torch.Tensor]:
    """A state dict of a model whose vision config is `vision` -> the same weights for a model
    built at `image_size` (every other setting equal): each PatchEmbed's learned positions
    (`PATCH_POSITION_KEYS`) resampled by `resample_pos_embed`, everything else the same
    tensors. Sin-cos positions need nothing (recomputed when the model is built) and neither
    does a Swin tower (relative positions only; any image size runs, padded to the windows).
    The same size returns `state` unchanged. The class token is recognised by the table's
    length (g*g + 1)."""
    if image_size <= 0:
        raise ConfigError(f"model.vision.image_size={image_size} must be > 0")
    if vision.arch == "swin" or image_size == vision.image_size:
        return state
    if image_size % vision.patch_size:
        raise ConfigError(f"model.vision.image_size={image_size} must be a multiple of the "
                          f"model's patch size {vision.patch_size} (e.g. "
                          f"{max(1, round(image_size / vision.patch_size)) * vision.patch_size})")
    old_grid, new_grid = vision.image_size // vision.patch_size, image_size // vision.patch_size
    out = dict(state)
    for key, pos in state.items():
        if not any(key == k or key.endswith("." + k) for k in PATCH_POSITION_KEYS):
            continue
        prefix = pos.shape[1] - old_grid * old_grid if pos.ndim == 3 else -1
        if prefix not in (0, 1):
            raise ValueError(f"{key} has shape {tuple(pos.shape)}, not the positions of a "
                             f"{old_grid}x{old_grid} grid (image_size={vision.image_size}, "
                             f"patch_size={vision.patch_size}), with or without a class token")
        out[key] = resample_pos_embed(pos, new_grid, prefix)
    return out


class TextEmbed(nn.Module):
    def __init__(self, vocab_size: int, width: int, context_length: int):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"sequence length {L} exceeds context_length={self.context_length}")
        return self.token_embed(input_ids) + self.pos_embed[:, :L]  # (B, L, width)


class BertEmbed(nn.Module):
    """BERT's input embeddings: word + learned absolute position + token type (segment), summed,
    then LayerNorm (Devlin et al. 2019, Fig. 2; HF's BertEmbeddings without its dropout).
    Post-LN BERT layers (Transformer(norm_first=False)) expect this normalised input.

    Two ways in, as in HF's BertEmbeddings:
    - text: `embed(input_ids, token_type_ids, position_ids)`, ids (B, L);
    - tokens whose content embedding the caller builds itself (VL-BERT's visual tokens, already
      projected to `width`): `embed(inputs_embeds=v, token_type_ids=..., position_ids=...)`,
      v (B, N, width): the position and token-type embeddings are added, then the LayerNorm.
    For one joint sequence either embed the parts separately and concatenate (the LayerNorm is
    per token, so it is the same thing), or concatenate `embed.token_embed(input_ids)` with the
    visual embeddings and call it once with `inputs_embeds=`. Visual tokens take token_type 1
    (VL-BERT, UNITER) and whatever positions the caller chooses.
    """

    def __init__(self, vocab_size: int, width: int, max_positions: int = 512,
                 type_vocab_size: int = 2, norm_eps: float = 1e-12, pad_id: int = 0):
        super().__init__()
        self.max_positions = max_positions
        self.type_vocab_size = type_vocab_size
        # padding_idx as in BERT: the pad row starts at zero and gets no gradient
        self.token_embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.pos_embed = nn.Embedding(max_positions, width)
        self.type_embed = nn.Embedding(type_vocab_size, width)
        self.ln = nn.LayerNorm(width, eps=norm_eps)
        for emb in (self.token_embed, self.pos_embed, self.type_embed):
            nn.init.normal_(emb.weight, std=0.02)  # BERT's initializer_range
        with torch.no_grad():
            self.token_embed.weight[pad_id].zero_()

    def forward(self, input_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Exactly one of input_ids (B, L) / inputs_embeds (B, L, width) -> (B, L, width).

        token_type_ids (B, L): default all 0 (the first segment). position_ids (B, L) or (L,):
        default arange(L); given ones must be < max_positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BertEmbed needs exactly one of input_ids (B, L) or "
                             "inputs_embeds (B, L, width)")
        x = self.token_embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        if position_ids is None:
            if L > self.max_positions:
                raise ValueError(f"sequence length {L} exceeds max_positions="
                                 f"{self.max_positions} (the position table's size)")
            position_ids = torch.arange(L, device=x.device)  # (L,), broadcasts over B
        x = x + self.pos_embed(position_ids)
        if token_type_ids is None:
            x = x + self.type_embed.weight[0]  # type 0 everywhere, without a (B, L) zeros tensor
        else:
            x = x + self.type_embed(token_type_ids)
        return self.ln(x)  # (B, L, width)
