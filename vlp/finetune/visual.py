"""A benchmark image -> the visual inputs a backbone needs, and their collation.

Benchmarks name images by file (COCO `file_name`, VQA `image_id`, VCR `img_fn`); region
features, when the backbone's visual tokens are regions, come from a folder of per-image files
`{image file stem}.npz` in the regions.npz layout (bottom-up-attention's too; see
vlp/data/regions.py). A file that cannot be used raises `VisualError`, which the datasets turn
into a skipped, counted sample.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlp.data.regions import RegionError, read_regions
from vlp.data.transforms import ImageTransform


class VisualError(ValueError):
    """An image or region file that cannot be used (the sample is skipped and counted)."""


class VisualReader:
    def __init__(self, backbone, transform: ImageTransform, regions_dir: str | Path | None):
        self.pixels = backbone.needs_pixels
        self.region_features = backbone.needs_region_features
        self.region_boxes = backbone.needs_region_boxes
        self.transform = transform.as_eval()
        self.max_regions = backbone.cfg.max_regions
        self.feature_dim = backbone.spec.get("region_feature_dim", 0)
        self.regions_dir = Path(regions_dir) if regions_dir else None
        if self.region_boxes and self.regions_dir is not None and not self.regions_dir.is_dir():
            raise FileNotFoundError(
                f"this backbone's visual tokens are {backbone.visual_tokens!r}: it needs a "
                f"folder of per-image region files ({{image stem}}.npz), set data.regions "
                f"(got {str(regions_dir)!r}). Write them with `vlp data regions` or use a "
                "backbone with patch tokens.")

    def check_files(self, image_paths: list[Path], what: str) -> None:
        """Fail before training when images (or their region files) are missing: a benchmark
        with a wrong image folder would otherwise skip every sample."""
        missing = [p for p in image_paths if self.pixels and not p.is_file()]
        if self.region_boxes and self.regions_dir is None:
            raise FileNotFoundError(f"{what}: this backbone's visual tokens are regions; set "
                                    "data.regions to the folder of per-image region files")
        if self.region_boxes:
            missing += [self.regions_dir / f"{p.stem}.npz" for p in image_paths
                        if not (self.regions_dir / f"{p.stem}.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} file(s) missing, e.g. "
                                    f"{', '.join(str(p) for p in missing[:3])}")

    def read(self, image: Path | Image.Image, object_boxes_px=None,
             regions_file: Path | None = None) -> dict:
        """-> {"pixel_values" (3, H, W), "region_features" (R, D), "region_boxes" (R, 4),
        "object_boxes" (N, 4)}, the keys this backbone needs (object boxes normalised to the
        model's image, when given in pixels). `image`: a file or a PIL image; the region file
        is `regions_file`, else data.regions/{image file stem}.npz."""
        out: dict = {}
        size = None
        if isinstance(image, Image.Image):
            size = image.size
            if self.pixels:
                out["pixel_values"] = self.transform(image)
        elif self.pixels or object_boxes_px is not None:
            try:
                with Image.open(image) as im:
                    im.load()  # Image.open reads the header only; truncated data fails here
                    size = im.size
                    if self.pixels:
                        out["pixel_values"] = self.transform(im)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise VisualError(f"{image}: unreadable image ({type(e).__name__})") from None
        if self.region_boxes:
            if regions_file is None:
                if self.regions_dir is None or isinstance(image, Image.Image):
                    raise VisualError("this model's visual tokens are regions: pass the image's "
                                      "region file (regions=PATH.npz)")
                regions_file = self.regions_dir / f"{Path(image).stem}.npz"
            path = Path(regions_file)
            try:
                regions = read_regions(path.read_bytes(), size)
            except FileNotFoundError:
                raise VisualError(f"{path}: missing region file") from None
            except RegionError as e:
                raise VisualError(f"{path}: {e}") from None
            regions = regions.first(self.max_regions)
            if self.region_features:
                if self.feature_dim and regions.features.shape[1] != self.feature_dim:
                    raise VisualError(f"{path}: features are {regions.features.shape[1]}-d, the "
                                      f"model's are {self.feature_dim}-d")
                out["region_features"] = torch.from_numpy(regions.features.astype(np.float32))
            out["region_boxes"] = torch.from_numpy(regions.boxes.astype(np.float32))
        if object_boxes_px is not None:
            boxes = np.asarray(object_boxes_px, np.float64).reshape(-1, 4)
            w, h = size
            # VCR's objects keep their index even when a box is degenerate: clip, never drop
            norm = boxes / np.array([w, h, w, h])
            out["object_boxes"] = torch.from_numpy(np.clip(norm, 0.0, 1.0).astype(np.float32))
        return out


def collate_visual(items: list[dict]) -> dict:
    """Stack pixels; pad regions / objects to the batch's largest count (+ masks)."""
    out: dict = {}
    if items and "pixel_values" in items[0]:
        out["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
    for key, mask_key in (("region_boxes", "region_mask"), ("object_boxes", "object_mask")):
        if not items or key not in items[0]:
            continue
        n = max(1, max(len(it[key]) for it in items))
        boxes = torch.zeros(len(items), n, 4)
        mask = torch.zeros(len(items), n, dtype=torch.bool)
        for i, it in enumerate(items):
            boxes[i, :len(it[key])] = it[key]
            mask[i, :len(it[key])] = True
        out[key], out[mask_key] = boxes, mask
        if key == "region_boxes" and "region_features" in items[0]:
            feats = torch.zeros(len(items), n, items[0]["region_features"].shape[1])
            for i, it in enumerate(items):
                feats[i, :len(it["region_features"])] = it["region_features"]
            out["region_features"] = feats
    return out


def visual_to(visual: dict, device, dtype) -> dict:
    """Move float tensors to `dtype` (the engine's compute dtype), masks stay bool."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in visual.items()}
