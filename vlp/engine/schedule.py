"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, base_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): step 0 of warmup gets base_lr / warmup_steps.
    A warmup longer than the run (short test runs) is cut to the run's length."""
    warmup_steps = min(warmup_steps, total_steps)
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
