"""Retrieval head: no new weights. Fine-tuning trains the backbone's dual tower (its encoders,
projections and learnable logit scale) with the CLIP loss, and optionally the backbone's fusion
layers + ITM head on [text | image] pairs with hard negatives, to re-rank the top k (ALBEF's
retrieval recipe, Li et al. 2021: `models/model_retrieval.py`, `Retrieval.py`).

    image, caption -> towers -> L2-normalised features, logit scale -> CLIP loss
                   -> (train_itm) tower tokens -> fused [CLS] -> ITM: the positive pair, the
                      image with a hard negative caption, the caption with a hard negative image

The backbone is a combined or dual_tower `Backbone` (its `.core` is a `Combined`: `.towers`,
`.fuse`, `.itm_head`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.combined import hard_negatives


def itm_logits(backbone, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               image_tokens: torch.Tensor) -> torch.Tensor:
    """Tower tokens of N pairs -> (N, 2) ITM logits (column 1: "they match") from the fused
    [CLS] state: the same fusion as the backbone's forward and the combined pretraining's ITM."""
    fused = backbone.core.fuse(text_tokens, text_mask, image_tokens)  # (N, L, W)
    return backbone.itm_head(fused[:, 0])


def match_score(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits -> (N,) log-odds that the pair matches (what re-ranking sorts by;
    monotone in the match probability, and it does not saturate as a probability does)."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


class RetrievalHead(nn.Module):
    def __init__(self, train_itm: bool = False):
        super().__init__()
        self.train_itm = train_itm

    def forward(self, backbone, *, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> image_features, text_features (B, D) L2-normalised, logit_scale; with train_itm
        also itm_logits (3B, 2) and itm_labels (3B,): B positives, B image -> hard caption,
        B caption -> hard image."""
        towers = backbone.core.towers
        image_tokens = towers.visual.forward_features(pixel_values)  # (B, 1+g*g, W)
        text_tokens = towers.text.forward_features(input_ids, attention_mask)  # (B, L, W)
        # the same ops as DualTower.encode_image / encode_text (what evaluation and vlp.load use)
        image_features = F.normalize(towers.visual.forward_head(image_tokens), dim=-1)
        text_features = F.normalize(towers.text.forward_head(text_tokens, attention_mask), dim=-1)
        scale = towers.scale()
        out = {"image_features": image_features, "text_features": text_features,
               "logit_scale": scale}
        b = input_ids.shape[0]
        if not self.train_itm or b < 2:
            return out
        with torch.no_grad():
            # ALBEF samples hard negatives from softmax(similarity / temperature) over the local
            # batch; a caption identical token for token to the positive is no negative: left
            # out of the draw (it stays drawable only when nothing else is) and labelled 1.
            # -1e4, not -inf: a row of only such captions must not turn the softmax into NaNs
            same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B)
            sim = scale.float() * (image_features.float() @ text_features.float().T)
            sim = sim.masked_fill(same_text, -1e4)
            text_for_image = hard_negatives(sim)  # (B,)
            image_for_text = hard_negatives(sim.T)  # (B,)
        pair_text = torch.cat([text_tokens, text_tokens[text_for_image], text_tokens])
        pair_mask = torch.cat([attention_mask, attention_mask[text_for_image], attention_mask])
        pair_image = torch.cat([image_tokens, image_tokens, image_tokens[image_for_text]])
        out["itm_logits"] = itm_logits(backbone, pair_text, pair_mask, pair_image)  # (3B, 2)
        arange = torch.arange(b, device=input_ids.device)
        out["itm_labels"] = torch.cat([torch.ones_like(arange),
                                       same_text[arange, text_for_image].long(),
                                       same_text[image_for_text, arange].long()])
        return out


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)
