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


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own rows (the
    loss on each rank uses every rank's rows). Written here: torch 2.13 deprecates
    torch.distributed.nn's all_gather, and this is all it takes."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter; features are small (B x D)
        rows = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * rows:(rank + 1) * rows]


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All-gather (B, D) features from every rank into (world * B, D), rank-major, keeping the
    autograd graph: the backward sums every rank's gradient for these rows back onto the rank
    that owns them (OpenCLIP's `gather_with_grad`). Every rank must pass the same B. With one
    process it returns `features`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return _AllGatherWithGrad.apply(features)


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> dict:
    """`clip_loss` of this rank's rows against the features of all ranks (local-loss form).

    The mean of the per-rank losses equals the single-process loss on the global batch, and
    after the usual gradient averaging across ranks so do the gradients
    (tests/test_distributed_loss.py checks both on 2 gloo ranks)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return clip_loss(image_features, text_features, logit_scale,
                     all_image_features=gather_with_grad(image_features),
                     all_text_features=gather_with_grad(text_features),
                     offset=rank * image_features.shape[0])
