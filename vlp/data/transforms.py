"""Image transforms (PIL/numpy/torch, no torchvision): decoded image -> normalized tensor.

Sits between decoding and collation in vlp/data. Eval follows OpenAI CLIP's preprocess
(resize the shorter side, bicubic, then center crop); train takes a RandomResizedCrop-style
crop. Settings travel in a model directory through `to_dict()` / `from_dict()`. `map_boxes`
carries pixel boxes through the eval geometry (for `visual="roi_align"`).
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlp.data.regions import RegionError, clip_boxes

# OpenAI CLIP's normalization (github.com/openai/CLIP clip/clip.py, _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image or an HWC / HW array (uint8, or float in [0, 1]) as an RGB PIL image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        image = Image.fromarray(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P -> RGB with transparency
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering a `scale` fraction of the area with aspect
    ratio in `ratio` — torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback (torchvision): the whole image, clamped to the aspect range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image or array -> float tensor (3, image_size, image_size), normalized.

    train=False: resize the shorter side to image_size, center crop (CLIP's preprocess).
    train=True:  random crop of `scale` of the area and aspect in `ratio`, resized to
    image_size. Randomness comes from the `rng` passed to __call__ (the data pipeline seeds one
    per sample), else from the `random` module.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, train: bool = False,
                 scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: str = "bicubic"):
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation={interpolation!r}: expected one of "
                             f"{sorted(_INTERPOLATION)}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.train = train
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation

    def __call__(self, image: Image.Image | np.ndarray,
                 rng: random.Random | None = None) -> torch.Tensor:
        image = to_pil_rgb(image)
        size, resample = self.image_size, _INTERPOLATION[self.interpolation]
        if self.train:
            box = random_resized_crop_box(*image.size, self.scale, self.ratio, rng or random)
            image = image.resize((size, size), resample, box=box)
        else:
            image = self._resize_center_crop(image, size, resample)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    @staticmethod
    def _resize_center_crop_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
        """(new_w, new_h, left, top): the resized size and the crop's corner in it. Same
        arithmetic as torchvision Resize(size) + CenterCrop(size), which CLIP uses."""
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))

    @classmethod
    def _resize_center_crop(cls, image: Image.Image, size: int, resample) -> Image.Image:
        new_w, new_h, left, top = cls._resize_center_crop_geometry(*image.size, size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample)
        return image.crop((left, top, left + size, top + size))

    def as_eval(self) -> "ImageTransform":
        """The same settings with train=False (deterministic resize + centre crop)."""
        return ImageTransform(self.image_size, self.mean, self.std, train=False,
                              scale=self.scale, ratio=self.ratio,
                              interpolation=self.interpolation)

    def map_boxes(self, boxes_px, image_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes in pixels of the input image -> (boxes, keep) in the output image of the eval
        geometry (resize the shorter side, centre crop).

        `boxes_px` [N, 4] x1, y1, x2, y2 (x2/y2 exclusive, so a box spans [x1, x2] in continuous
        coordinates, as PIL resamples); `image_wh` the input (width, height). Returns `boxes`
        [M, 4] float32 normalised to [0, 1] of the output image and clipped to it, and `keep`
        [N] bool: the M boxes with area left inside the crop (the others are dropped). Only the
        eval geometry is supported: a random training crop would need its crop box (TODO), so
        the pipeline uses `as_eval()` for roi_align even when training. A box with x2 < x1 or
        y2 < y1, or NaN/inf, raises vlp.data.regions.RegionError (a ValueError).
        """
        if self.train:
            raise ValueError("map_boxes follows the eval geometry (resize + centre crop) only; "
                             "use transform.as_eval() (a random crop would need its crop box)")
        try:
            boxes = np.asarray(boxes_px, dtype=np.float64)
        except (TypeError, ValueError):
            raise RegionError(f"boxes must be [N, 4] numbers, got {boxes_px!r}") from None
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise RegionError(f"boxes must be [N, 4], got shape {boxes.shape}")
        w, h = (int(v) for v in image_wh)
        size = self.image_size
        new_w, new_h, left, top = self._resize_center_crop_geometry(w, h, size)
        # Scale each axis by its own factor (int() above makes them differ slightly), then move
        # to the crop's frame; clip_boxes clips to the crop and drops what lies outside it.
        scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h])
        shift = np.array([left, top, left, top])
        return clip_boxes(boxes * scale - shift, (size, size))

    def to_dict(self) -> dict:
        """Settings for a model directory's config.json (eval settings; train is a run flag)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict, train: bool = False) -> "ImageTransform":
        valid = ("image_size", "mean", "std", "interpolation", "scale", "ratio")
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown image transform setting(s) {unknown}; valid: {list(valid)}")
        if "image_size" not in d:
            raise ValueError(f"image transform settings need 'image_size', got {dict(d)}")
        return cls(train=train, **d)

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, train={self.train}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")
