"""Symmetric InfoNCE (CLIP) loss on features, not models.

Written for gathered features from the start (OpenCLIP's `local_loss` semantics): each rank
scores its local rows against the global columns, and its positives sit at
`offset + arange(B_local)`. With no gathered features this is the ordinary single-process loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor, *, all_image_features: torch.Tensor | None = None,
              all_text_features: torch.Tensor | None = None, offset: int = 0) -> dict:
    """image_features, text_features: (B, D) local, L2-normalised; logit_scale: exp'd scalar.

    all_*_features: (N, D) features of the whole global batch (this rank's rows at
    [offset, offset + B)); None means the local batch is the global batch.
    Returns {"contrastive_loss": scalar, "logits_per_image": (B, N)}.
    """
    all_img = image_features if all_image_features is None else all_image_features
    all_txt = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_txt.T  # (B, N)
    logits_per_text = logit_scale * text_features @ all_img.T  # (B, N)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    loss = (F.cross_entropy(logits_per_image.float(), labels)
            + F.cross_entropy(logits_per_text.float(), labels)) / 2
    return {"contrastive_loss": loss, "logits_per_image": logits_per_image}
