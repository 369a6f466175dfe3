"""Towers built from the embeddings and the one Transformer.

DualTower (CLIP style): an image encoder (ViT or Swin, `model.vision.arch`) and a text encoder,
each followed by a linear projection into a shared embedding space, and a learnable logit scale
(temperature).

A vision-tower directory (`save_vision_tower` / `init_vision_tower`) holds one image encoder on
its own, e.g. converted from a Hugging Face Swin: config.json {"format_version",
"architecture": "vision_tower", "vision": VisionConfig, "transform": image settings, "source"}
and model.safetensors, the VisionTower's state dict without its projection `proj.weight` (a
published backbone has none; the model it initialises keeps its own).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, EncoderConfig, ModelConfig, TextConfig, VisionConfig, \
    from_dict, to_dict
from vlp.models.embed import PatchEmbed, TextEmbed
from vlp.models.encoder import Transformer, build_attention_mask
from vlp.models.swin import SwinFeatures, SwinTransformer


def build_transformer(cfg: EncoderConfig) -> Transformer:
    return Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)


class VisionTower(nn.Module):
    """The image encoder, chosen by `cfg.arch`: a ViT (PatchEmbed + the one Transformer; tokens
    with the class token first) or a Swin Transformer (vlp/models/swin.py; its final stage's
    tokens, no class token), then a linear projection of the pooled tokens."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "swin":
            self.swin = SwinTransformer(cfg.width, cfg.stage_depths, cfg.stage_heads,
                                        patch_size=cfg.patch_size, window_size=cfg.window_size,
                                        mlp_ratio=cfg.mlp_ratio, act=cfg.act,
                                        norm_eps=cfg.norm_eps)
            self.width = self.swin.out_width
        elif cfg.arch == "vit":
            self.embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.width, class_token=True,
                                    pos_embed=cfg.pos_embed)
            # CLIP's ln_pre; an Identity (no parameters) otherwise, so older checkpoints load
            self.ln_pre = (nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm
                           else nn.Identity())
            self.transformer = build_transformer(cfg)
            self.width = cfg.width
        else:
            raise ValueError(f"unknown model.vision.arch {cfg.arch!r}; choose vit or swin")
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width ** -0.5)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if self.cfg.arch == "swin":
            self.swin.set_grad_checkpointing(enabled)
        else:
            self.transformer.grad_checkpointing = enabled

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> token states: vit (B, 1 + num_patches, width), class token first;
        swin (B, h * w, width of the last stage), its final grid row-major."""
        if self.cfg.arch == "swin":
            return self.swin(pixel_values)
        return self.transformer(self.ln_pre(self.embed(pixel_values)))

    def forward_stages(self, pixel_values: torch.Tensor) -> SwinFeatures:
        """swin only: every stage's tokens with their grids and strides, and the final tokens
        (SwinFeatures: `feature_map(s)` for RoIAlign, `positions()` for 2-D positions)."""
        if self.cfg.arch != "swin":
            raise ValueError("forward_stages needs model.vision.arch=swin (a ViT has one stage: "
                             "forward_features)")
        return self.swin.forward_stages(pixel_values)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "swin":
            pooled = tokens.mean(dim=1)  # Swin's average pool (HF's SwinModel pooler_output)
        else:
            pooled = tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.proj(pooled)  # (B, embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))


VISION_TOWER_FORMAT_VERSION = 1
# what must agree between a vision-tower directory and the tower it initialises (image_size and
# window_size may differ: the weights do not depend on them, but a ViT's learned positions do)
_ARCH_KEYS = {"vit": ("width", "layers", "heads", "mlp_ratio", "act", "patch_size", "pos_embed",
                      "pre_norm", "image_size"),
              "swin": ("width", "stage_depths", "stage_heads", "mlp_ratio", "act", "patch_size")}


def save_vision_tower(tower: VisionTower, out: str | Path, transform: dict,
                      source: dict | None = None) -> Path:
    """Write `tower` (without its projection) as a vision-tower directory `out`; `transform`
    is the image settings (ImageTransform.to_dict())."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format_version": VISION_TOWER_FORMAT_VERSION, "architecture": "vision_tower",
              "vision": to_dict(tower.cfg), "transform": transform, "source": source or {}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in tower.state_dict().items()
             if k != "proj.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def read_vision_tower(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor], dict]:
    """(VisionConfig, weights, the whole config.json) of a vision-tower directory."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [n for n in ("config.json", "model.safetensors") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a vision-tower directory: missing "
                                f"{', '.join(missing)} (`vlp convert hf-swin` writes one)")
    config = json.loads((path / "config.json").read_text())
    if config.get("architecture") != "vision_tower":
        raise ValueError(f"{path}/config.json: architecture {config.get('architecture')!r}; "
                         "expected 'vision_tower'")
    if config.get("format_version", 0) > VISION_TOWER_FORMAT_VERSION:
        raise ValueError(f"{path}/config.json: format_version {config['format_version']} is "
                         f"newer than this vlp reads ({VISION_TOWER_FORMAT_VERSION})")
    try:
        vision = from_dict(VisionConfig, config["vision"])
    except ConfigError as e:
        raise ValueError(f"{path}/config.json: {e}") from None
    return vision, load_file(str(path / "model.safetensors")), config


def init_vision_tower(tower: VisionTower, path: str | Path) -> VisionConfig:
    """Load a vision-tower directory's weights into `tower` (everything but its projection).
    The architecture must match (`_ARCH_KEYS`, named when not); the image size and, for Swin,
    the window size may differ (relative position tables are resampled bicubically). Returns
    the directory's VisionConfig."""
    saved, state, _ = read_vision_tower(path)
    if saved.arch != tower.cfg.arch:
        raise ValueError(f"{path}: a {saved.arch} tower cannot initialise "
                         f"model.vision.arch={tower.cfg.arch}")
    for key in _ARCH_KEYS[saved.arch]:
        a, b = getattr(saved, key), getattr(tower.cfg, key)
        if (list(a) if isinstance(a, (list, tuple)) else a) != \
                (list(b) if isinstance(b, (list, tuple)) else b):
            raise ValueError(f"{path}: vision.{key}={a!r} but model.vision.{key}={b!r}; set "
                             f"model.vision.{key}={a!r} to start from these weights")
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"proj.weight"}:
        raise ValueError(f"{path}: weights do not fit the tower (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return saved


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed = TextEmbed(vocab_size, cfg.width, cfg.context_length)
        self.transformer = build_transformer(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width ** -0.5)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         causal: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids and 1 = real token mask -> (B, L, width) token states. `causal`: causal
        attention even for a bidirectional tower (a prefix-LM decoder over it); `add` (B, L,
        width): added to the embeddings (grounded words: their objects' visual embeddings)."""
        x = self.embed(input_ids)
        if add is not None:
            x = x + add
        if causal or self.cfg.mask == "causal":
            # Sequences are right-padded, so under a causal mask a real token never sees a pad:
            # the plain is_causal path (no mask tensor) is exact and fastest.
            return self.transformer(x, is_causal=True)
        mask = build_attention_mask("bidirectional", x.shape[1], padding_mask=attention_mask)
        return self.transformer(x, attn_mask=mask)

    def forward_head(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "eos":
            # the last real token ([SEP] / end-of-text) of each right-padded sequence. HF CLIP
            # pools at the first eos id (argmax of the ids for legacy eos_token_id=2 configs):
            # the same token when the mask ends at the first eos, as the tokenizer's does and
            # Tokenizer.attention_mask builds for bare ids.
            last = attention_mask.long().sum(dim=1) - 1  # (B,)
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
        elif self.cfg.pool == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.to(tokens.dtype)[..., None]  # (B, L, 1)
            pooled = (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return self.proj(pooled)  # (B, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask)


class DualTower(nn.Module):
    """Image encoder + text encoder + projections + learnable logit scale."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size or cfg.text.vocab_size
        if not vocab_size:
            raise ValueError("DualTower needs a vocabulary size: pass vocab_size= (the "
                             "tokenizer's) or set model.text.vocab_size")
        # a copy: the caller's (validated, saved) config is not changed
        cfg = replace(cfg, text=replace(cfg.text, vocab_size=vocab_size))
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, vocab_size, cfg.embed_dim)
        # Shape (1,), not CLIP's 0-dim: DeepSpeed broadcasts parameters as byte views, which
        # 0-dim tensors cannot give. 0-dim checkpoints still load (_load_from_state_dict).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        if cfg.logit_bias:  # SigLIP's learnable bias; absent otherwise (older directories load)
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in (prefix + "logit_scale", prefix + "logit_bias"):
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.set_grad_checkpointing(enabled)
        self.text.transformer.grad_checkpointing = enabled

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual(pixel_values)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        feats = self.text(input_ids, attention_mask)
        return F.normalize(feats, dim=-1) if normalize else feats

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (image_features (B, D), text_features (B, D), logit scale), features L2-normalised,
        and the logit bias (a scalar) after them when the model has one (SigLIP). Returned from
        the forward so that ZeRO-3, which gathers parameters only inside it, can train them."""
        out = (self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask),
               self.scale())
        return (*out, self.logit_bias[0]) if self.cfg.logit_bias else out
