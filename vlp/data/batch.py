"""`Batch`: what every data source hands the model (vlp/data -> vlp/models), for pretraining
(the shard pipeline) and fine-tuning (benchmark datasets) alike.

The common inputs are fields; what only one task needs (VQA's soft targets, a caption's LM
labels, VCR's grounded word indexes, the ids its results file names) goes in `fields`. A batch
may be empty (len 0): a shard worker sends one at the end of its stream to carry skip counts
that no real batch carried, and a benchmark batch whose every image was unreadable is one too;
sources skip len-0 batches but still add up their `skipped` (and a shard stream's position).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# the joint encoder's visual inputs (vlp/models/joint.py): what `visual()` hands it
VISUAL_FIELDS = ("pixel_values", "region_features", "region_boxes", "region_mask")


@dataclass
class Batch:
    keys: list[str]  # one id per sample: the shard key, or the benchmark record's id
    input_ids: torch.Tensor | None = None  # (B, L) long (VCR: (B, groups, choices, L))
    attention_mask: torch.Tensor | None = None  # like input_ids, 1 = real token
    pixel_values: torch.Tensor | None = None  # (B, 3, H, W) float32, normalized; (B, 0) for
    #                                           the pipeline's "regions" (no image decoded)
    # Regions (the pipeline's visual="regions" | "roi_align", region backbones in fine-tuning);
    # None when unused. R = the largest region count in the batch, capped at max_regions;
    # padded slots are zeros, label -100 and mask False. Boxes are x1, y1, x2, y2 in [0, 1] of
    # the image the model sees.
    region_features: torch.Tensor | None = None  # (B, R, D) float32; "regions" only
    region_boxes: torch.Tensor | None = None  # (B, R, 4) float32
    region_labels: torch.Tensor | None = None  # (B, R) long, -100 = unknown or padded
    region_mask: torch.Tensor | None = None  # (B, R) bool, True = a real region
    # objects words refer to (VCR's grounding), boxes as above, padded likewise
    object_boxes: torch.Tensor | None = None  # (B, N, 4) float32
    object_mask: torch.Tensor | None = None  # (B, N) bool
    # what one task needs besides: tensors (first dimension B) and per-sample lists
    fields: dict[str, Any] = field(default_factory=dict)
    # samples skipped (reason -> count) while making this batch (a shard worker: since its
    # previous batch)
    skipped: dict[str, int] = field(default_factory=dict)
    # the producing shard-loader worker (its logical id, stable across a resume) and its
    # position right after this batch, for pipeline.StreamPosition; None when not from
    # make_loader
    worker: int = 0
    position: dict | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def visual(self, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The visual inputs the joint encoder reads, moved to `device`; floats cast to `dtype`
        (the engine's compute dtype), masks stay bool."""
        out = {}
        for name in VISUAL_FIELDS:
            value = getattr(self, name)
            if value is None or (name == "pixel_values" and value.numel() == 0):
                continue
            # non_blocking: a pinned batch (CUDA loaders pin) copies while the GPU computes
            out[name] = value.to(device, dtype, non_blocking=True) \
                if value.is_floating_point() and dtype else value.to(device, non_blocking=True)
        return out

    def first(self, n: int) -> "Batch":
        """The first n samples (every tensor and per-sample list sliced on its first
        dimension)."""
        def cut(value):
            return value[:n] if isinstance(value, (torch.Tensor, list, tuple)) else value

        changes = {f.name: cut(getattr(self, f.name)) for f in fields(self)
                   if f.name not in ("fields", "skipped", "worker", "position")}
        return replace(self, fields={k: cut(v) for k, v in self.fields.items()}, **changes)

    def _map_tensors(self, fn) -> "Batch":
        # Generic over fields, so the optional tensors move too (None stays None).
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        extra = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.fields.items()}
        return replace(self, fields=extra, **changes)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device`."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())
