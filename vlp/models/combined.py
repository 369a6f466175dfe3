"""The combined model (ALBEF style, with merged attention): a dual tower for image-text
contrastive learning, and fusion layers on top of its two encoders for matching and masked
language modelling:

    image -> vision tower ─┬─ pooled -> ITC
                           └─ tokens ─┐
    text  -> text tower  ──┬─ pooled -> ITC
                           └─ tokens ─┴─ [text tokens | image tokens] -> fusion Transformer
                                          -> [CLS]: ITM    text positions: MLM

ITM negatives are hard ones: for every image a text, and for every text an image, drawn from
the batch with probability softmax(similarity) over the non-matching ones (ALBEF, Li et al.
2021). ALBEF fuses by cross-attention; here the fusion layers attend over both token sets at
once (METER's merged attention), with the same unified Transformer as everything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ModelConfig
from vlp.models.encoder import Transformer, build_attention_mask
from vlp.models.single_stream import MLMHead
from vlp.models.towers import DualTower


def hard_negatives(similarity: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row i of `similarity` (B, B), a column j != i drawn with probability
    softmax over the row without its diagonal (the more similar, the likelier)."""
    b = similarity.shape[0]
    weights = F.softmax(similarity.float(), dim=1)
    weights = weights.masked_fill(torch.eye(b, dtype=torch.bool, device=similarity.device), 0)
    weights = weights + 1e-12 * (~torch.eye(b, dtype=torch.bool, device=similarity.device))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class Combined(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        f, t, v = cfg.fusion, cfg.text, cfg.vision
        if not f.width == t.width == v.width:
            raise ValueError(f"the combined recipe fuses tower tokens directly: model.fusion.width "
                             f"({f.width}), model.text.width ({t.width}) and model.vision.width "
                             f"({v.width}) must be equal")
        self.cfg = cfg
        self.towers = DualTower(cfg, vocab_size)
        self.segment = nn.Embedding(2, f.width)
        nn.init.normal_(self.segment.weight, std=0.02)
        self.fusion = Transformer(f.width, f.layers, f.heads, f.mlp_ratio, f.act, f.norm_eps,
                                  norm_first=f.norm_first)
        self.mlm_head = MLMHead(f.width, f.act, f.norm_eps, self.towers.text.embed.token_embed)
        self.itm_head = nn.Linear(f.width, 2)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.towers.set_grad_checkpointing(enabled)
        self.fusion.grad_checkpointing = enabled

    def fuse(self, text_tokens, text_mask, image_tokens, blank_visual: bool = False):
        b = text_tokens.shape[0]
        x = torch.cat([text_tokens + self.segment.weight[0],
                       image_tokens + self.segment.weight[1]], dim=1)
        image_mask = torch.full(image_tokens.shape[:2], not blank_visual, dtype=torch.bool,
                                device=x.device)
        keep = torch.cat([text_mask.bool(), image_mask], dim=1)
        return self.fusion(x, build_attention_mask("bidirectional", x.shape[1],
                                                   padding_mask=keep))[:, :text_tokens.shape[1]]

    def forward(self, pixel_values, input_ids, attention_mask, masked_ids=None, mlm_labels=None,
                blank_visual: bool = False) -> dict[str, torch.Tensor]:
        """-> image_features, text_features, logit_scale (ITC); itm_logits (3B, 2) and
        itm_labels (B positives, then B image->hard text, B text->hard image negatives);
        mlm_logits (M, vocab) for the positions with mlm_labels != -100."""
        towers = self.towers
        image_tokens = towers.visual.forward_features(pixel_values)
        text_tokens = towers.text.forward_features(input_ids, attention_mask)
        image_features = F.normalize(towers.visual.forward_head(image_tokens), dim=-1)
        text_features = F.normalize(towers.text.forward_head(text_tokens, attention_mask), dim=-1)
        out = {"image_features": image_features, "text_features": text_features,
               "logit_scale": towers.scale()}
        b = input_ids.shape[0]
        with torch.no_grad():
            sim = image_features.float() @ text_features.float().T
            text_for_image = hard_negatives(sim) if b > 1 else torch.zeros(b, dtype=torch.long)
            image_for_text = hard_negatives(sim.T) if b > 1 else torch.zeros(b, dtype=torch.long)
        pair_text = torch.cat([text_tokens, text_tokens[text_for_image], text_tokens])
        pair_mask = torch.cat([attention_mask, attention_mask[text_for_image], attention_mask])
        pair_image = torch.cat([image_tokens, image_tokens, image_tokens[image_for_text]])
        fused = self.fuse(pair_text, pair_mask, pair_image, blank_visual)
        out["itm_logits"] = self.itm_head(fused[:, 0])
        labels = torch.zeros(3 * b, dtype=torch.long, device=input_ids.device)
        labels[:b] = 1
        # a "negative" whose caption is token for token the positive's is a positive
        labels[b:2 * b] = (input_ids[text_for_image] == input_ids).all(1).long()
        labels[2 * b:] = (input_ids[image_for_text] == input_ids).all(1).long()
        out["itm_labels"] = labels
        if mlm_labels is not None:
            masked_tokens = towers.text.forward_features(masked_ids, attention_mask)
            fused = self.fuse(masked_tokens, attention_mask, image_tokens, blank_visual)
            out["mlm_logits"] = self.mlm_head(fused[mlm_labels != -100])
        return out
