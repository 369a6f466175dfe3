"""VQA head: an answer classifier on the joint [CLS] state (UNITER / VL-BERT's
Linear-GELU-LayerNorm-Linear), trained with binary cross-entropy against the soft VQA scores of
every answer in the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VQAHead(nn.Module):
    def __init__(self, width: int, num_answers: int, norm_eps: float = 1e-12):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                        nn.LayerNorm(2 * width, eps=norm_eps),
                                        nn.Linear(2 * width, num_answers))
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, backbone, *, input_ids, attention_mask, visual) -> dict[str, torch.Tensor]:
        hidden = backbone(input_ids, attention_mask, visual)  # (B, L, W)
        return {"logits": self.classifier(hidden[:, 0])}  # (B, num_answers)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE over the vocabulary, summed over answers and averaged over questions (UNITER: the
    mean BCE times the number of answers)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="mean") \
        * targets.shape[1]
