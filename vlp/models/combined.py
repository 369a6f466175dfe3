"""The combined model (ALBEF style, with merged attention): a dual tower for image-text
contrastive learning, and fusion layers on top of its two encoders for matching and masked
language modelling:

    image -> vision tower ─┬─ pooled -> ITC    (ViT: class token or mean; Swin: the mean)
                           └─ tokens ─┐      (ViT: class + patches; Swin: final-stage grid)
    text  -> text tower  ──┬─ pooled -> ITC
                           └─ tokens ─┴─ [text tokens | image tokens] -> fusion Transformer
                                          -> [CLS]: ITM    text positions: MLM

ITM negatives are hard ones, drawn by the caller's sampler from the contrastive similarities
(`negatives=`: vlp.objectives.matching.sample_matching_pairs, ALBEF's, Li et al. 2021). ALBEF
fuses by cross-attention; here the fusion layers attend over both token sets at once (METER's
merged attention), with the same unified Transformer as everything else. The fine-tuning joint
encoder (vlp/models/joint.py) runs the same `fuse`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ModelConfig
from vlp.models.encoder import Transformer, build_attention_mask
from vlp.models.single_stream import MLMHead, prefix_lm_mask
from vlp.models.towers import DualTower


class Combined(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        f, t = cfg.fusion, cfg.text
        self.cfg = cfg
        self.towers = DualTower(cfg, vocab_size)
        # towers of other widths than the fusion's are projected into it (METER, Dou et al.
        # 2022); equal widths fuse as they are (no parameters: older checkpoints still load).
        # The image tokens' width is the tower's output: a Swin's last stage, not vision.width
        v_width = self.towers.visual.width
        self.text_proj = nn.Linear(t.width, f.width) if t.width != f.width else nn.Identity()
        self.image_proj = nn.Linear(v_width, f.width) if v_width != f.width else nn.Identity()
        self.segment = nn.Embedding(2, f.width)
        nn.init.normal_(self.segment.weight, std=0.02)
        self.fusion = Transformer(f.width, f.layers, f.heads, f.mlp_ratio, f.act, f.norm_eps,
                                  norm_first=f.norm_first)
        self.mlm_head = MLMHead(f.width, f.act, f.norm_eps, self.towers.text.embed.token_embed)
        self.itm_head = nn.Linear(f.width, 2)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.towers.set_grad_checkpointing(enabled)
        self.fusion.grad_checkpointing = enabled

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             image_tokens: torch.Tensor, *, blank_visual: bool = False,
             causal_text: bool = False) -> torch.Tensor:
        """[text tokens | image tokens] (each tower's width) projected into the fusion width,
        through the fusion layers -> (B, L, W) states of the text positions. `blank_visual`:
        the image tokens masked out (the same weights as a text-only model); `causal_text`:
        words see earlier words and the whole image (the prefix-LM mask a caption decoder
        needs)."""
        n_text = text_tokens.shape[1]
        x = torch.cat([self.text_proj(text_tokens) + self.segment.weight[0],
                       self.image_proj(image_tokens) + self.segment.weight[1]], dim=1)
        image_keep = torch.full(image_tokens.shape[:2], not blank_visual, dtype=torch.bool,
                                device=x.device)
        keep = torch.cat([text_mask.bool(), image_keep], dim=1)
        attn = build_attention_mask("bidirectional", x.shape[1], padding_mask=keep)
        if causal_text:
            attn = attn & prefix_lm_mask(n_text, x.shape[1], x.device)
        return self.fusion(x, attn)[:, :n_text]

    def itm_logits(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                   image_tokens: torch.Tensor, blank_visual: bool = False) -> torch.Tensor:
        """Tower tokens of N pairs -> (N, 2) ITM logits (column 1: "they match") from the
        fused [CLS] state."""
        return self.itm_head(self.fuse(text_tokens, text_mask, image_tokens,
                                       blank_visual=blank_visual)[:, 0])

    def matching(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                 text_mask: torch.Tensor, text_for_image: torch.Tensor,
                 image_for_text: torch.Tensor, blank_visual: bool = False) -> torch.Tensor:
        """(3B, 2) ITM logits of B positive pairs, each image with its hard negative caption
        and each caption with its hard negative image (the order of MatchingPairs.labels)."""
        pair_text = torch.cat([text_tokens, text_tokens[text_for_image], text_tokens])
        pair_mask = torch.cat([text_mask, text_mask[text_for_image], text_mask])
        pair_image = torch.cat([image_tokens, image_tokens, image_tokens[image_for_text]])
        return self.itm_logits(pair_text, pair_mask, pair_image, blank_visual)

    def forward(self, pixel_values, input_ids, attention_mask, masked_ids=None, mlm_labels=None,
                blank_visual: bool = False, negatives: Callable | None = None
                ) -> dict[str, torch.Tensor]:
        """-> image_features, text_features, logit_scale (ITC); with `negatives` (a sampler:
        features, ids, logit scale -> MatchingPairs) itm_logits (3B, 2) and itm_labels;
        with `mlm_labels` mlm_logits (M, vocab) for the positions with mlm_labels != -100."""
        towers = self.towers
        image_tokens = towers.visual.forward_features(pixel_values)
        text_tokens = towers.text.forward_features(input_ids, attention_mask)
        image_features = F.normalize(towers.visual.forward_head(image_tokens), dim=-1)
        text_features = F.normalize(towers.text.forward_head(text_tokens, attention_mask), dim=-1)
        out = {"image_features": image_features, "text_features": text_features,
               "logit_scale": towers.scale()}
        if negatives is not None:
            pairs = negatives(image_features, text_features, input_ids, out["logit_scale"])
            out["itm_logits"] = self.matching(image_tokens, text_tokens, attention_mask,
                                              pairs.text_for_image, pairs.image_for_text,
                                              blank_visual)
            out["itm_labels"] = pairs.labels
        if mlm_labels is not None:
            masked_tokens = towers.text.forward_features(masked_ids, attention_mask)
            fused = self.fuse(masked_tokens, attention_mask, image_tokens,
                              blank_visual=blank_visual)
            out["mlm_logits"] = self.mlm_head(fused[mlm_labels != -100])
        return out
