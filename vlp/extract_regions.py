"""`vlp data regions`: write `{key}.regions.npz` region features for a shard set, from a trained
vision encoder and the boxes in each sample's json (`objects[*].box`, pixels).

For every sample: the image through the model's eval transform -> the vision tower's patch
grid (a ViT: its patch tokens, the class token dropped; a Swin: stage
`model.vision.roi_stage`'s map, pooled at 1/stride) -> RoIAlign over each box mapped into that
geometry (2x2 cells, averaged: vlp.models.regions.RoIRegionFeatures) -> features [N, width],
the width of that grid. The npz holds those features, the kept boxes in pixels of the
original image, `labels` (index of the object's `label` in --labels, -1 when absent/unknown)
and image_w / image_h: the format vlp/data/regions.py reads. Output shards keep every member of
the input and add the npz, with the same shard names and `_stats.json` files, so they drop in
for the originals.

Samples whose image or json cannot be used are copied without regions and counted (the
training pipeline then skips them as `missing_regions`).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlp.data.pipeline import SkipCounter, decode_image, read_json_member, SkipSample
from vlp.data.regions import RegionError
from vlp.data.shards import expand_urls, iter_tar_samples, is_remote
from vlp.models.device import eval_autocast
from vlp.models.regions import RoIRegionFeatures


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class RegionExtractor:
    """Region features of images from a model directory's vision tower (vlp.load)."""

    def __init__(self, model_dir: str | Path, label_names: list[str] | None = None,
                 device: str | None = None):
        import vlp

        self.pretrained = vlp.load(model_dir, device=device)
        self.visual = self.pretrained.model.visual.eval()
        self.transform = self.pretrained.transform
        v = self.visual.cfg
        # the stage a Swin tower pools (-1: the last); a ViT has one grid
        self.stage = v.roi_stage % len(v.stage_depths) if v.arch == "swin" else None
        self.pool = RoIRegionFeatures()
        self.labels = {name: i for i, name in enumerate(label_names or [])}

    @property
    def dim(self) -> int:
        if self.stage is not None:
            return self.visual.swin.widths[self.stage]
        return self.visual.cfg.width

    def _grid(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, C, H, W) float32 CPU feature map to pool, and the pooling's geometry."""
        with eval_autocast(self.pretrained.device):
            if self.stage is not None:
                stages = self.visual.forward_stages(pixels)
                fmap = stages.feature_map(self.stage)
                geometry = {"stride": stages.strides[self.stage],
                            "image_size": tuple(pixels.shape[-2:])}
            else:
                tokens = self.visual.forward_features(pixels)[:, 1:]  # drop the class token
                g = self.visual.embed.grid_size
                fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)
                geometry = {}
        return fmap.float().cpu(), geometry

    @torch.no_grad()
    def features(self, images, boxes_px: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """PIL images and their boxes [N, 4] (pixels) -> per image (features [M, width] float32,
        keep [N] bool: the boxes with area left inside the model's centre crop)."""
        pixels = torch.stack([self.transform(im) for im in images]).to(self.pretrained.device)
        grid, geometry = self._grid(pixels)
        b = grid.shape[0]
        mapped = [self.transform.map_boxes(bx, im.size) for im, bx in zip(images, boxes_px)]
        r = max(1, max(len(m[0]) for m in mapped))
        boxes = torch.zeros(b, r, 4)
        mask = torch.zeros(b, r, dtype=torch.bool)
        for i, (norm, _) in enumerate(mapped):
            boxes[i, :len(norm)] = torch.as_tensor(norm)
            mask[i, :len(norm)] = True
        pooled = self.pool(grid, boxes, mask, **geometry)
        return [(pooled[i, :len(norm)].numpy().astype(np.float32), keep)
                for i, (norm, keep) in enumerate(mapped)]


def _objects(meta: dict) -> tuple[np.ndarray, list[str]]:
    objects = meta.get("objects")
    if not isinstance(objects, list) or not objects:
        raise SkipSample("missing_regions")
    boxes, labels = [], []
    for obj in objects:
        box = obj.get("box") if isinstance(obj, dict) else None
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            raise SkipSample("bad_regions")
        boxes.append(box)
        labels.append(str(obj.get("label", "")))
    return np.asarray(boxes, dtype=np.float32), labels


def extract_regions(model_dir: str | Path, data: str, out_dir: str | Path, *,
                    label_names: list[str] | None = None, batch_size: int = 64,
                    progress: bool = True, device: str | None = None) -> dict:
    """Write region-feature copies of the shards of `data` into `out_dir`; returns counts.
    Each output shard is written to a temporary name and renamed when complete."""
    urls = expand_urls(data)
    if any(is_remote(u) for u in urls):
        raise ValueError("vlp data regions reads local shards (copy remote ones first)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = RegionExtractor(model_dir, label_names, device)
    skips = SkipCounter()
    counts = {"samples": 0, "with_regions": 0, "regions": 0}
    bar = tqdm(total=len(urls), desc="extract regions", unit="shard", disable=not progress)
    for url in urls:
        target = out_dir / Path(url).name
        tmp = target.with_name(target.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            pending: list[tuple[dict, object, np.ndarray, list[str]]] = []

            def flush():
                if not pending:
                    return
                results = extractor.features([p[1] for p in pending], [p[2] for p in pending])
                for (sample, image, boxes, labels), (feats, keep) in zip(pending, results):
                    _write_sample(tar, sample, _npz_bytes(
                        features=feats, boxes=boxes[keep],
                        labels=np.asarray([extractor.labels.get(lb, -1) for lb, k
                                           in zip(labels, keep) if k], dtype=np.int64),
                        image_w=np.int64(image.size[0]), image_h=np.int64(image.size[1])))
                    counts["with_regions"] += 1
                    counts["regions"] += len(feats)
                pending.clear()

            for sample in iter_tar_samples([url], skips.shard_error):
                counts["samples"] += 1
                try:
                    boxes, labels = _objects(read_json_member(sample))
                    image = decode_image(sample)
                    if not extractor.transform.map_boxes(boxes, image.size)[1].any():
                        raise SkipSample("missing_regions")
                except (SkipSample, RegionError) as skip:
                    skips.add(getattr(skip, "reason", "bad_regions"))
                    _write_sample(tar, sample, None)
                    continue
                pending.append((sample, image, boxes, labels))
                if len(pending) == batch_size:
                    flush()
            flush()
        os.replace(tmp, target)
        stats = Path(url).with_name(Path(url).stem + "_stats.json")
        if stats.is_file():
            shutil.copy(stats, out_dir / stats.name)
        bar.update(1)
    bar.close()
    counts.update({f"skipped_{k}": v for k, v in sorted(skips.counts.items())})
    (out_dir / "regions_extraction.json").write_text(json.dumps(
        {"model": str(model_dir), "source": data, "dim": extractor.dim,
         "labels": label_names or [], **counts}, indent=2) + "\n")
    return counts


def _write_sample(tar: tarfile.TarFile, sample: dict, npz: bytes | None) -> None:
    key = sample["__key__"]
    for name, value in sample.items():
        if name.startswith("__") or name == "regions.npz":
            continue
        _add(tar, f"{key}.{name}", value)
    if npz is not None:
        _add(tar, f"{key}.regions.npz", npz)
