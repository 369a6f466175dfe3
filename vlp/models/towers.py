"""Towers built from the embeddings and the one Transformer.

DualTower (CLIP style): an image encoder and a text encoder, each followed by a linear projection
into a shared embedding space, and a learnable logit scale (temperature).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import EncoderConfig, ModelConfig, TextConfig, VisionConfig
from vlp.models.embed import PatchEmbed, TextEmbed
from vlp.models.encoder import Transformer, build_attention_mask


def build_transformer(cfg: EncoderConfig) -> Transformer:
    return Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.width, class_token=True,
                                pos_embed=cfg.pos_embed)
        # CLIP's ln_pre; an Identity (no parameters) otherwise, so older checkpoints still load
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.transformer = build_transformer(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width ** -0.5)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + num_patches, width) token states."""
        return self.transformer(self.ln_pre(self.embed(pixel_values)))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.proj(pooled)  # (B, embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))


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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enabled
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
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image_features (B, D), text_features (B, D), logit scale), features L2-normalised."""
        return (self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask),
                self.scale())
