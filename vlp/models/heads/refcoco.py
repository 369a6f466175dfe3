"""Referring expression comprehension head: one score per candidate box from the joint
encoder, softmax cross-entropy over an expression's candidates.

Two ways to get a candidate's joint state, by what the backbone's visual tokens are:

- **Region tokens** (single-stream `regions` / `roi_align`, `objects_are_regions`): the
  candidates ARE the visual regions, and each is scored from the joint encoder's hidden state
  at its region position (VL-BERT's RefCOCO head, `final_mlp` over `hidden_states_regions`).
  `[CLS] expression [SEP] | regions | [END]` goes through the single stream once.
- **Patch grids** (single-stream `patches`, combined / dual-tower fused backbones): each
  candidate box is pooled by RoIAlign from the patch grid exactly as VCR grounds an object
  (the joint encoder's `token_objects` / `object_boxes`), and that pooled vector is added to
  the word embedding of one "slot" token per candidate appended after the expression:
  `[CLS] expression [SEP] slot_1 .. slot_N`. The slots are scored from their joint states:
  each has attended to the expression and to the whole image (through the fusion layers), so
  one forward pass scores every candidate. The slots use the tokenizer's [MASK] word (else
  [SEP]), so they carry no word of their own but position and the box.

Scorer: Linear-GELU-LayerNorm-Linear to one logit (the VCR / VQA heads' shape). Padded
candidates get -inf, so the softmax runs over the real ones only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def region_states(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  visual: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, W) joint hidden states at the region positions of a single-stream region
    backbone and their mask (B, R): the joint encoder's own single-stream path (region
    features or RoIAlign'd encoder features -> region embedding -> `encode`), keeping the
    visual positions that JointEncoder.forward drops."""
    m = backbone.core
    feats, boxes, rmask = m.region_inputs(visual.get("pixel_values"),
                                          visual.get("region_features"),
                                          visual["region_boxes"], visual["region_mask"])
    vis, vmask = m.embed_visual(feats, boxes, rmask)
    hidden = m.encode(input_ids, attention_mask, vis, vmask)  # [text | regions | END]
    n_text = input_ids.shape[1]
    return hidden[:, n_text:n_text + vis.shape[1]], vmask.bool()


class RefCOCOHead(nn.Module):
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
                visual: dict, slot_positions: torch.Tensor | None = None,
                token_objects: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """-> {"logits" (B, N) float32, -inf at padded candidates; "mask" (B, N)}.

        Region backbones: candidates = visual's regions (slot_positions None). Patch grids:
        `slot_positions` (B, N) the slot tokens' positions in input_ids (-1: padding),
        `token_objects` (B, L) the candidate each slot grounds (-1 elsewhere), and visual's
        "object_boxes" / "object_mask" the candidate boxes."""
        if slot_positions is None:
            states, mask = region_states(backbone, input_ids, attention_mask, visual)
        else:
            visual = dict(visual)
            boxes, box_mask = visual.pop("object_boxes"), visual.pop("object_mask")
            hidden = backbone(input_ids, attention_mask, visual, token_objects=token_objects,
                              object_boxes=boxes, object_mask=box_mask)  # (B, L, W)
            index = slot_positions.clamp(min=0)
            states = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            mask = slot_positions >= 0  # (B, N)
        logits = self.scorer(states).squeeze(-1).float()  # (B, N)
        return {"logits": logits.masked_fill(~mask, float("-inf")), "mask": mask}


def refcoco_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each expression's candidates: logits (B, N) with -inf at
    padding, targets (B,) the candidate with the highest IoU with the ground truth."""
    return F.cross_entropy(logits.float(), targets)
