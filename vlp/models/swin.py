"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows")
as a vision trunk, built from the one Transformer block of vlp/models/encoder.py.

    pixels (B, 3, H, W) -> patch partition (a stride-`patch` conv; H, W padded up to a multiple of
    the patch, right/bottom) -> LayerNorm -> stages: blocks attending within windows of
    window x window tokens, every second block on windows shifted by window // 2, then patch
    merging (2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C) between stages -> final
    LayerNorm -> tokens (B, h * w, C_last); the dual tower averages them.

A Swin block is `encoder.Block` with `groups=WindowGroups(...)` (pad the grid to a multiple of
the window, cyclic shift, partition; undone after the attention) and an additive attention
mask: the block's relative position bias (nh, N, N) plus, on shifted blocks, the cyclic-shift
mask (windows, 1, N, N). The conventions follow the official code and Hugging Face's
`SwinModel` exactly, so its checkpoints load (vlp/convert/hf_swin.py): padding happens after
the block's LayerNorm (the padded tokens enter the attention as zeros and are not masked), a
stage whose grid is no larger than the window uses one window of min(grid) tokens a side and no
shift, the shift mask gives -100 to pairs from different regions, and patch merging
concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (row, col).

Resolution: nothing depends on the image size but the padding, so any size runs. A window
smaller than the table's (a small stage grid) reads the centre of the table, exactly the same
relative offsets. A checkpoint whose tables were trained for another window is resampled on
load, bicubically, as Swin V1's fine-tuning at 384 px does (`RelativePositionBias`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.config import VisionConfig
from vlp.models.encoder import Block, set_drop_path

# Swin's (and HF's) value for pairs of tokens from different regions of a shifted window
SHIFT_MASK_VALUE = -100.0


def window_and_shift(grid: tuple[int, int], window: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) a block uses on a (H, W) grid: a grid no larger than the window in its
    smaller side gets one window of that side and no shift (Swin's rule)."""
    if min(grid) <= window:
        return min(grid), 0
    return window, (window // 2 if shifted else 0)


def _take(x: torch.Tensor, index: torch.Tensor, zero_row: bool) -> torch.Tensor:
    """x[:, index] for x (B, n, C); with zero_row, index n reads a row of zeros."""
    if zero_row:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
    return x.index_select(1, index)


class _Regroup(torch.autograd.Function):
    """Tokens moved by one gather: out = x[:, index] (index == n: a zero token); the backward
    is the gather by `inverse`, the position each input token went to (zero for outputs that
    are padding). Pad + cyclic shift + window partition as separate ops copy the activations
    up to four times each way (torch.roll copies once per axis); this copies once."""

    @staticmethod
    def forward(ctx, x, index, inverse, zero_forward: bool, zero_backward: bool):
        ctx.save_for_backward(inverse)
        ctx.zero_backward = zero_backward
        return _take(x, index, zero_forward)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take(grad, inverse, ctx.zero_backward), None, None, None, None


class WindowGroups:
    """Swin's windows as `encoder.TokenGroups` for one block on a (H, W) token grid: the grid
    padded with zeros (right/bottom) to multiples of the window, cyclically shifted up-left by
    `shift`, cut into windows, all in one gather (`_Regroup`)."""

    def __init__(self, grid: tuple[int, int], window: int, shift: int,
                 device: torch.device | None = None):
        self.H, self.W = H, W = grid
        self.window, self.shift = w, s = window, shift
        self.Hp, self.Wp = Hp, Wp = -(-H // w) * w, -(-W // w) * w  # padded
        # window-layout position (window row, window col, row in window, col in window) ->
        # its token in the padded grid before the shift, then in the (H, W) grid (H*W: padding)
        rows = torch.arange(Hp, device=device).view(Hp // w, 1, w, 1)
        cols = torch.arange(Wp, device=device).view(1, Wp // w, 1, w)
        r, c = (rows + s) % Hp, (cols + s) % Wp  # roll(x, -s)[i] = x[(i + s) % P]
        real = ((r < H) & (c < W)).expand(Hp // w, Wp // w, w, w).reshape(-1)
        self.index = torch.where(real, (r * W + c).expand(Hp // w, Wp // w, w, w).reshape(-1),
                                 H * W)  # (Hp*Wp,)
        self.inverse = torch.empty(H * W, dtype=torch.long, device=device)  # (H*W,)
        self.inverse[self.index[real]] = torch.arange(Hp * Wp, device=device)[real]
        self.padded = Hp != H or Wp != W

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) -> (B, windows, window*window, C), windows in row-major order."""
        B, _, C = x.shape
        x = _Regroup.apply(x, self.index, self.inverse, self.padded, False)  # (B, Hp*Wp, C)
        return x.view(B, -1, self.window * self.window, C)

    def join(self, x: torch.Tensor) -> torch.Tensor:
        """(B, windows, window*window, C) -> (B, H*W, C); the padding is dropped."""
        B, _, _, C = x.shape
        return _Regroup.apply(x.reshape(B, -1, C), self.inverse, self.index, False, self.padded)

    def shift_mask(self, device: torch.device | None = None) -> torch.Tensor | None:
        """(windows, 1, N, N) additive mask of a shifted block, None without shift.

        After the cyclic shift a window can hold tokens from up to 4 regions of the padded grid
        that are not neighbours in the image; each axis splits into [0, P - w), [P - w, P - s),
        [P - s, P) (the official code's slices), and a pair from different regions gets -100.
        """
        if not self.shift:
            return None
        w, s = self.window, self.shift

        def regions(n: int) -> torch.Tensor:
            i = torch.arange(n, device=device)
            return (i >= n - w).long() + (i >= n - s).long()  # 0, 1, 2 along the axis

        ids = regions(self.Hp)[:, None] * 3 + regions(self.Wp)[None, :]  # (Hp, Wp)
        ids = ids.view(self.Hp // w, w, self.Wp // w, w).transpose(1, 2).reshape(-1, w * w)
        different = ids[:, :, None] != ids[:, None, :]  # (windows, N, N)
        mask = torch.zeros(different.shape, device=device).masked_fill_(different, SHIFT_MASK_VALUE)
        return mask[:, None]  # (windows, 1, N, N)


def relative_position_index(window: int, table_window: int | None = None) -> torch.Tensor:
    """(N, N) index into a ((2T - 1)^2, heads) table for the tokens of a window x window window,
    N = window^2, T = table_window (default window): row offset dy and column offset dx of key
    j from query i, index (dy + T - 1) * (2T - 1) + (dx + T - 1) (Swin's relative_position_index
    when T = window; a smaller window reads the centre of a larger table)."""
    T = table_window or window
    if window > T:
        raise ValueError(f"a {window}x{window} window needs a table for a window >= {window}, "
                         f"this one is for {T}")
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)  # (2, N): row, col
    rel = coords[:, :, None] - coords[:, None, :] + (T - 1)  # (2, N, N), each in [0, 2T - 2]
    return rel[0] * (2 * T - 1) + rel[1]


def resample_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A ((2w0 - 1)^2, heads) relative position table resampled to window `window`: bicubic
    interpolation of each head's (2w0 - 1) x (2w0 - 1) map, as Swin V1's `load_pretrained`
    does for fine-tuning at another window size."""
    n, heads = table.shape
    side = round(n ** 0.5)
    if side * side != n:
        raise ValueError(f"a relative position table has (2w - 1)^2 rows, got {n}")
    new_side = 2 * window - 1
    if new_side == side:
        return table
    maps = table.float().T.reshape(1, heads, side, side)
    maps = F.interpolate(maps, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return maps.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


class RelativePositionBias(nn.Module):
    """One block's learned bias per head for every relative offset inside a window.

    The parameter is named `rel_pos_embed`: the engine's param_groups keep tables named
    `pos_embed` out of weight decay, as Swin does for its relative_position_bias_table.
    """

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.rel_pos_embed = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_pos_embed, std=0.02)
        self.register_buffer("index", relative_position_index(window), persistent=False)

    def forward(self, window: int) -> torch.Tensor:
        """(heads, N, N) for a window x window window (<= the table's), N = window^2."""
        index = self.index if window == self.window else \
            relative_position_index(window, self.window).to(self.index.device)
        N = window * window
        return self.rel_pos_embed[index.reshape(-1)].view(N, N, self.heads).permute(2, 0, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "rel_pos_embed"
        table = state_dict.get(key)
        if table is not None and table.shape[0] != self.rel_pos_embed.shape[0] \
                and table.shape[1] == self.heads:
            state_dict[key] = resample_table(table, self.window)  # trained for another window
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchPartition(nn.Module):
    """Swin's patch embedding: pad right/bottom to a multiple of the patch, conv, LayerNorm."""

    def __init__(self, patch_size: int, width: int, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, h*w, width) row-major, and the grid (h, w)."""
        p = self.patch_size
        H, W = pixel_values.shape[-2:]
        if H % p or W % p:
            pixel_values = F.pad(pixel_values, (0, -W % p, 0, -H % p))
        x = self.proj(pixel_values)  # (B, width, h, w)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one: concatenated (4C), LayerNorm, Linear to 2C. An odd grid
    is padded with zeros on the right/bottom first."""

    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(4 * width, eps=norm_eps)
        self.reduction = nn.Linear(4 * width, 2 * width, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor,
                                                                       tuple[int, int]]:
        """(B, H*W, C) on grid (H, W) -> (B, ceil(H/2) * ceil(W/2), 2C) and the new grid."""
        B, _, C = x.shape
        H, W = grid
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # (row, col) offsets (0, 0), (1, 0), (0, 1), (1, 1): Swin's x0, x1, x2, x3 order
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)  # (B, H/2, W/2, 4C)
        grid = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C))), grid


class SwinStage(nn.Module):
    """`depth` blocks at one width, alternately on plain and shifted windows."""

    def __init__(self, width: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 act: str, norm_eps: float):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, norm_eps)
                                    for _ in range(depth))
        self.rel_pos = nn.ModuleList(RelativePositionBias(window, heads) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, width) -> (B, H*W, width)."""
        layouts, masks = {}, {}
        for i, (block, rel_pos) in enumerate(zip(self.blocks, self.rel_pos)):
            shifted = i % 2 == 1
            if shifted not in layouts:  # the same two layouts and shift masks for every pair
                window, shift = window_and_shift(grid, self.window, shifted)
                layouts[shifted] = WindowGroups(grid, window, shift, x.device)
                masks[shifted] = layouts[shifted].shift_mask(x.device)
            groups, mask = layouts[shifted], masks[shifted]
            bias = rel_pos(groups.window)  # (nh, N, N)
            bias = bias if mask is None else bias + mask  # (windows, nh, N, N)
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, bias, False, groups, use_reentrant=False)
            else:
                x = block(x, bias, False, groups)
        return x


def grid_positions(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(H*W, 2) long (row, col) of each token of a row-major (H, W) grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device),
                                torch.arange(grid[1], device=device), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


@dataclass
class SwinFeatures:
    """What a Swin trunk computes, for towers that need more than the pooled vector (RoIAlign
    over a feature map, visual tokens of a joint stream).

    stage_tokens[s] (B, H_s*W_s, C_s): stage s's output before patch merging (the last one
    before the final norm), row-major on stage_grids[s] = (H_s, W_s); each cell spans
    strides[s] = patch * 2^s pixels of the padded image. tokens (B, H*W, C): the last stage
    after the final LayerNorm (what the tower pools), on grid (H, W).
    """

    stage_tokens: list[torch.Tensor]
    stage_grids: list[tuple[int, int]]
    strides: list[int]
    tokens: torch.Tensor
    grid: tuple[int, int]

    def feature_map(self, stage: int) -> torch.Tensor:
        """(B, C_s, H_s, W_s): stage s as a feature map (RoIAlign's layout)."""
        t = self.stage_tokens[stage]
        H, W = self.stage_grids[stage]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H, W)

    def positions(self) -> torch.Tensor:
        """(H*W, 2) long (row, col) of each final token on `grid`."""
        return grid_positions(self.grid, self.tokens.device)


class SwinTransformer(nn.Module):
    """Patch partition, stages (width doubling, patch merging between them), final norm."""

    def __init__(self, width: int, depths: tuple[int, ...] | list[int],
                 heads: tuple[int, ...] | list[int], *, patch_size: int = 4, window_size: int = 7,
                 mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        depths, heads = tuple(depths), tuple(heads)
        if len(depths) != len(heads) or not depths:
            raise ValueError(f"Swin needs one head count per stage: depths={list(depths)}, "
                             f"heads={list(heads)}")
        widths = [width * 2 ** s for s in range(len(depths))]
        for s, (w, h) in enumerate(zip(widths, heads)):
            if w % h:
                raise ValueError(f"stage {s} has width {w} (= {width} * 2^{s}), not divisible "
                                 f"by its {h} heads")
        self.patch_size, self.window_size = patch_size, window_size
        self.depths, self.widths = depths, widths
        self.out_width = widths[-1]
        self.embed = PatchPartition(patch_size, width, norm_eps)
        self.stages = nn.ModuleList(
            SwinStage(w, d, h, window_size, mlp_ratio, act, norm_eps)
            for w, d, h in zip(widths, depths, heads))
        self.merges = nn.ModuleList(PatchMerging(w, norm_eps) for w in widths[:-1])
        self.norm = nn.LayerNorm(self.out_width, eps=norm_eps)
        self._init_weights()

    def blocks(self) -> list:
        """Every stage's blocks, in forward order (what stochastic depth's schedule spans)."""
        return [block for stage in self.stages for block in stage.blocks]

    def _init_weights(self) -> None:
        # as the one Transformer: N(0, 0.02) linears, zero biases, GPT-2's depth-scaled residual
        # projections (Swin's own is truncated N(0, 0.02) without the scaling)
        layers = sum(self.depths)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.stages:
            for block in stage.blocks:
                for proj in (block.attn.proj, block.mlp.fc2):
                    nn.init.normal_(proj.weight, std=0.02 / (2 * layers) ** 0.5)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enabled

    def forward_stages(self, pixel_values: torch.Tensor) -> SwinFeatures:
        """(B, 3, H, W) -> SwinFeatures (every stage's tokens and grid, the final tokens)."""
        x, grid = self.embed(pixel_values)
        stage_tokens, grids, strides = [], [], []
        for s, stage in enumerate(self.stages):
            x = stage(x, grid)
            stage_tokens.append(x)
            grids.append(grid)
            strides.append(self.patch_size * 2 ** s)
            if s < len(self.merges):
                x, grid = self.merges[s](x, grid)
        return SwinFeatures(stage_tokens, grids, strides, self.norm(x), grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h*w, out_width): the last stage's tokens after the final norm."""
        return self.forward_stages(pixel_values).tokens


def build_swin(v: VisionConfig) -> SwinTransformer:
    """The Swin trunk `model.vision` describes (a vision tower's, a single stream's), with its
    stochastic-depth schedule."""
    swin = SwinTransformer(v.width, v.stage_depths, v.stage_heads, patch_size=v.patch_size,
                           window_size=v.window_size, mlp_ratio=v.mlp_ratio, act=v.act,
                           norm_eps=v.norm_eps)
    set_drop_path(swin.blocks(), v.drop_path_rate)
    return swin
