"""A benchmark image -> the visual inputs a model needs, and their collation into a `Batch`.

Benchmarks name images by file (COCO `file_name`, VQA `image_id`, VCR `img_fn`); region
features, when a model's visual tokens are regions, come from a folder of per-image files
`{image file stem}.npz`, read by the same `read_regions` as the shards' `{key}.regions.npz`
(vlp/data/regions.py) and padded by the same `collate_regions`. A file that cannot be used
raises `VisualError` with the pipeline's skip reason, which the datasets turn into a skipped,
counted sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlp.data.pipeline import collate_regions
from vlp.data.regions import IGNORE_LABEL, RegionError, Regions, read_regions
from vlp.data.transforms import ImageTransform


class VisualError(ValueError):
    """An image or region file that cannot be used (the sample is skipped and counted under
    `reason`, one of the pipeline's SKIP_REASONS)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VisualNeeds:
    """What a model's visual tokens read: the transformed image, region features, region
    boxes (regions: from the file; roi_align: pooled by the model)."""

    kind: str  # for messages: "pixels", "patches", "regions" or "roi_align"
    pixels: bool
    region_features: bool
    region_boxes: bool
    max_regions: int = 36
    feature_dim: int = 0  # regions: the model's D (0: any)


class VisualReader:
    def __init__(self, needs: VisualNeeds, transform: ImageTransform,
                 regions_dir: str | Path | None):
        self.needs = needs
        self.transform = transform.as_eval()
        self.regions_dir = Path(regions_dir) if regions_dir else None
        if needs.region_boxes and self.regions_dir is not None and not self.regions_dir.is_dir():
            raise FileNotFoundError(
                f"this model's visual tokens are {needs.kind!r}: it needs a folder of per-image "
                f"region files ({{image stem}}.npz), set data.regions (got "
                f"{str(regions_dir)!r}). Write them with `vlp data regions` or use a model "
                "with patch tokens.")

    def check_files(self, image_paths: list[Path], what: str) -> None:
        """Fail before training when images (or their region files) are missing: a benchmark
        with a wrong image folder would otherwise skip every sample."""
        missing = [p for p in image_paths if self.needs.pixels and not p.is_file()]
        if self.needs.region_boxes and self.regions_dir is None:
            raise FileNotFoundError(f"{what}: this model's visual tokens are regions; set "
                                    "data.regions to the folder of per-image region files")
        if self.needs.region_boxes:
            missing += [self.regions_dir / f"{p.stem}.npz" for p in image_paths
                        if not (self.regions_dir / f"{p.stem}.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} file(s) missing, e.g. "
                                    f"{', '.join(str(p) for p in missing[:3])}")

    def read(self, image: Path | Image.Image, object_boxes_px=None,
             regions_file: Path | None = None) -> dict:
        """-> {"pixel_values" (3, H, W), "regions" (Regions), "objects" (Regions without
        features)}, the keys this model needs (object boxes given in pixels are normalised to
        the model's image). `image`: a file or a PIL image; the region file is `regions_file`,
        else data.regions/{image file stem}.npz."""
        out: dict = {}
        size = None
        if isinstance(image, Image.Image):
            size = image.size
            if self.needs.pixels:
                out["pixel_values"] = self.transform(image)
        elif self.needs.pixels or object_boxes_px is not None:
            try:
                with Image.open(image) as im:
                    im.load()  # Image.open reads the header only; truncated data fails here
                    size = im.size
                    if self.needs.pixels:
                        out["pixel_values"] = self.transform(im)
            except FileNotFoundError:
                raise VisualError(f"{image}: missing image", "missing_image") from None
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise VisualError(f"{image}: unreadable image ({type(e).__name__})",
                                  "corrupt_image") from None
        if self.needs.region_boxes:
            out["regions"] = self._regions(image, regions_file, size)
        if object_boxes_px is not None:
            boxes = np.asarray(object_boxes_px, np.float64).reshape(-1, 4)
            w, h = size
            # VCR's objects keep their index even when a box is degenerate: clip, never drop
            norm = np.clip(boxes / np.array([w, h, w, h]), 0.0, 1.0).astype(np.float32)
            out["objects"] = Regions(None, norm, np.full(len(norm), IGNORE_LABEL, np.int64))
        return out

    def _regions(self, image, regions_file: Path | None, size) -> Regions:
        if regions_file is None:
            if self.regions_dir is None or isinstance(image, Image.Image):
                raise VisualError("this model's visual tokens are regions: pass the image's "
                                  "region file (regions=PATH.npz)", "missing_regions")
            regions_file = self.regions_dir / f"{Path(image).stem}.npz"
        path = Path(regions_file)
        try:
            regions = read_regions(path.read_bytes(), size,
                                   feature_dim=self.needs.feature_dim or None,
                                   max_regions=self.needs.max_regions)
        except FileNotFoundError:
            raise VisualError(f"{path}: missing region file", "missing_regions") from None
        except RegionError as e:
            raise VisualError(f"{path}: {e}", "bad_regions") from None
        if not self.needs.region_features:
            regions = Regions(None, regions.boxes, regions.labels)
        return regions


def collate_visual(items: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sample `VisualReader.read` outputs -> Batch fields: pixel_values stacked; regions
    and objects padded to the batch's largest count, with their masks (`collate_regions`)."""
    out: dict = {}
    if items and "pixel_values" in items[0]:
        out["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
    if items and "regions" in items[0]:
        padded = collate_regions([it["regions"] for it in items])
        out.update({k: v for k, v in padded.items() if k != "region_labels"})
    if items and "objects" in items[0]:
        padded = collate_regions([it["objects"] for it in items])
        boxes, mask = padded["region_boxes"], padded["region_mask"]
        if boxes.shape[1] == 0:  # no objects anywhere: one empty slot keeps RoIAlign's shapes
            boxes, mask = torch.zeros(len(items), 1, 4), torch.zeros(len(items), 1, dtype=bool)
        out["object_boxes"], out["object_mask"] = boxes, mask
    return out
