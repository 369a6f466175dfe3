"""VCR head: one score per (context, choice) sequence from the joint [CLS] state, softmax
cross-entropy over the four choices of a question (VL-BERT's and UNITER's multiple-choice
head: Linear-GELU-LayerNorm-Linear, here to one logit).

A batch holds B items of G groups of C = 4 choice sequences each (training: G = 1, one Q->A or
QA->R sample; evaluation: G = 5, the answers and the rationales given each answer). Every
sequence sees the item's image: its visual tokens (the vision tower's output, or the embedded
regions) and the objects grounded words point at are computed once per item, then shared by
its G * C sequences (their rows repeated), which the joint Transformer encodes one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VCRHead(nn.Module):
    def __init__(self, width: int, norm_eps: float = 1e-12):
        super().__init__()
        self.scorer = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                    nn.LayerNorm(2 * width, eps=norm_eps),
                                    nn.Linear(2 * width, 1))
        for m in self.scorer:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, backbone, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_objects: torch.Tensor | None, visual: dict) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / token_objects (B, G, C, L) -> {"logits" (B, G, C)}.
        `visual` is per item; its "object_boxes"/"object_mask" (patch and fused backbones) are
        the boxes grounded words pool from."""
        b, g, c, length = input_ids.shape
        visual = dict(visual)
        boxes, box_mask = visual.pop("object_boxes", None), visual.pop("object_mask", None)
        # once per item (the image is the same for its 4 answers and 16 rationales)
        encoded = backbone.encode_visual(visual, objects=token_objects is not None,
                                         object_boxes=boxes, object_mask=box_mask)

        def per_sequence(t):  # (B, ...) -> (B * G * C, ...), item-major like the reshape below
            return None if t is None else t.repeat_interleave(g * c, dim=0)

        hidden = backbone(input_ids.reshape(-1, length), attention_mask.reshape(-1, length),
                          {k: per_sequence(v) for k, v in encoded.items()},
                          token_objects=None if token_objects is None
                          else token_objects.reshape(-1, length),
                          object_boxes=per_sequence(boxes), object_mask=per_sequence(box_mask))
        return {"logits": self.scorer(hidden[:, 0]).view(b, g, c)}  # (B, G, C)


def vcr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each group's choices: logits (B, G, C), labels (B, G)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
