"""Cross-entropy for the classification heads (MLM, MRC, ITM), with its accuracy for the logs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.objectives.masking import IGNORE


def classification_loss(logits: torch.Tensor, target: torch.Tensor, metrics: dict[str, float],
                        name: str) -> torch.Tensor:
    """Cross-entropy of `logits` (N, C) against `target` (N,) (IGNORE entries left out), in
    fp32; `metrics[f"{name}_loss"]` and `metrics[f"{name}_acc"]` are set for the log. With no
    target the loss is 0 and keeps the graph (every rank must run the same backward)."""
    logits = logits.float()
    target = target.to(logits.device)
    if target.numel() == 0:
        metrics[f"{name}_loss"] = float("nan")
        return logits.sum() * 0.0
    valid = target != IGNORE
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE) if valid.any() \
        else logits.sum() * 0.0
    metrics[f"{name}_loss"] = float(loss.detach())
    if valid.any():
        metrics[f"{name}_acc"] = float((logits.argmax(-1)[valid] == target[valid]).float().mean())
    return loss
