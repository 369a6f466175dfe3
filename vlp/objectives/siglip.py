"""SigLIP's sigmoid loss on features, across processes without the global logits matrix.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training": every image-text pair of the
global batch is its own binary classification,

    L = -1/N sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),   z_ij = +1 for a pair, -1 else

with N the global batch, t = exp(t') the learnable temperature and b the learnable bias. Each
process scores its own images against every process's texts, and its loss is that sum divided
by its local batch size: the mean over processes (what DeepSpeed's gradient averaging
optimises) is the single-process loss over the global batch, as in OpenCLIP's SigLipLoss.

**Across processes the text features go round a ring, chunk by chunk**, as the paper does
(Sec. 3.3, its "chunked" implementation), instead of being all-gathered. At any time a
process holds its own images, one chunk of B_local texts in flight and one B_local x B_local
block of logits, whatever the number of processes. An all-gather would hold all B_global
texts and, saved for autograd, a B_local x B_global block of logits per process; neither is
the global matrix, but both grow with the number of processes, which is what the ring avoids
(and it is the same communication volume: W - 1 exchanges of a chunk).

The backward goes round the ring again (`_RingSigmoidLoss.backward`): every logits block is
recomputed from the features rather than stored, the image gradients add up locally, and each
text chunk travels with a gradient accumulator that every process adds its part to (scaled by
its own incoming gradient), so that after one lap a process gets back its own texts' gradient
summed over every process's loss, the same semantics as `contrastive.gather_with_grad`. The
loss's matmuls thus run twice, which is small next to the towers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ring_pass(buf: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Send `buf` to the next process, receive the previous one's (the same shape)."""
    import torch.distributed as dist

    if world == 1:
        return buf
    out = torch.empty_like(buf)
    ops = [dist.P2POp(dist.isend, buf.contiguous(), (rank + 1) % world),
           dist.P2POp(dist.irecv, out, (rank - 1) % world)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def _signs(rows: int, cols: int, positives: bool, like: torch.Tensor) -> torch.Tensor:
    """z: -1 everywhere, +1 on the diagonal when the block holds the rows' own texts."""
    z = -torch.ones(rows, cols, dtype=like.dtype, device=like.device)
    if positives:
        z.diagonal().fill_(1.0)
    return z


def block_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """(B, D) images x (C, D) texts -> (B, C) logits t x.y + b: the largest matrix the loss
    builds."""
    return scale * image @ text.T + bias


class _RingSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias):
        rank, world = _world()
        total = image.new_zeros(())
        chunk = text
        for k in range(world):
            owner = (rank - k) % world  # the process whose texts `chunk` holds
            logits = block_logits(image, chunk, scale, bias)
            z = _signs(*logits.shape, owner == rank, logits)
            total = total - F.logsigmoid(z * logits).sum()
            if k < world - 1:
                chunk = _ring_pass(chunk, rank, world)
        ctx.save_for_backward(image, text, scale, bias)
        return total / image.shape[0]

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        rank, world = _world()
        g = grad / image.shape[0]
        d_image = torch.zeros_like(image)
        d_scale, d_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        # one buffer in flight: the chunk's texts and their gradient so far
        flight = torch.stack([text, torch.zeros_like(text)])  # (2, C, D)
        for k in range(world):
            chunk, d_chunk = flight[0], flight[1]
            owner = (rank - k) % world
            dots = image @ chunk.T  # (B, C)
            z = _signs(*dots.shape, owner == rank, dots)
            # d/ds of -log sigmoid(z s) = -z sigmoid(-z s), times the incoming gradient
            coef = -z * torch.sigmoid(-z * (scale * dots + bias)) * g  # (B, C)
            d_image += scale * coef @ chunk
            d_chunk = d_chunk + scale * coef.T @ image
            d_scale += (coef * dots).sum()
            d_bias += coef.sum()
            flight = torch.stack([chunk, d_chunk])
            if k < world - 1:
                flight = _ring_pass(flight, rank, world)
        # one more pass takes every chunk's gradient home (the texts themselves are not needed)
        d_text = _ring_pass(flight[1].contiguous(), rank, world)
        return d_image, d_text, d_scale, d_bias


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> dict:
    """image_features, text_features: (B, D) this process's rows, L2-normalised (fp32);
    logit_scale: exp'd temperature t, logit_bias: b (scalars). With several processes (every
    one calls it with the same B) its images are scored against every process's texts, which
    travel round a ring (module docstring); the backward goes round again. One process: the
    plain loss over its batch. Returns {"contrastive_loss": scalar}."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"siglip_loss: image features {tuple(image_features.shape)} and text "
                         f"features {tuple(text_features.shape)} must have the same shape")
    loss = _RingSigmoidLoss.apply(image_features, text_features, logit_scale, logit_bias)
    return {"contrastive_loss": loss}
