"""`Batch`: what the input pipeline hands the model (vlp/data -> vlp/models).

One dataclass for every recipe. A batch may be empty (len 0): a worker sends one at the end of
its stream to carry skip counts that no real batch carried, so the trainer must skip len-0
batches but still add up their `skipped` (and pass them to its StreamPosition: they carry a
position too).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W) float32, normalized
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    keys: list[str]
    # samples skipped (reason -> count) in the producing worker since its previous batch
    skipped: dict[str, int] = field(default_factory=dict)
    # the producing loader worker (its logical id, stable across a resume) and its position
    # right after this batch, for pipeline.StreamPosition; None when not from make_loader
    worker: int = 0
    position: dict | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def _map_tensors(self, fn) -> "Batch":
        # Generic over fields so that tensor fields added later (regions, labels) move too.
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device`."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())
