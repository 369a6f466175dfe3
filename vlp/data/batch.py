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
    pixel_values: torch.Tensor  # (B, 3, H, W) float32, normalized; (B, 0) for "regions"
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 = real token
    keys: list[str]
    # samples skipped (reason -> count) in the producing worker since its previous batch
    skipped: dict[str, int] = field(default_factory=dict)
    # the producing loader worker (its logical id, stable across a resume) and its position
    # right after this batch, for pipeline.StreamPosition; None when not from make_loader
    worker: int = 0
    position: dict | None = None
    # Regions (make_loader(visual="regions" | "roi_align")); None when unused. R = the largest
    # region count in the batch, capped at max_regions; padded slots are zeros, label -100 and
    # mask False. Boxes are x1, y1, x2, y2 in [0, 1] of the image the model sees.
    region_features: torch.Tensor | None = None  # (B, R, D) float32; "regions" only
    region_boxes: torch.Tensor | None = None  # (B, R, 4) float32
    region_labels: torch.Tensor | None = None  # (B, R) long, -100 = unknown or padded
    region_mask: torch.Tensor | None = None  # (B, R) bool, True = a real region

    def __len__(self) -> int:
        return len(self.keys)

    def _map_tensors(self, fn) -> "Batch":
        # Generic over fields, so the optional region tensors move too (None stays None).
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device`."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())
