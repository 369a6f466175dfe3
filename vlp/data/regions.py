"""Region features: a sample's `{key}.regions.npz` -> `Regions` (features, normalised boxes,
labels), with validation.

Sits beside pipeline.py in vlp/data: with `make_loader(visual="regions")` each sample's npz is
read here, and its regions are padded into `Batch.region_*` by the pipeline. The image itself
is not decoded; only its size is needed, to normalise the boxes.

File format. A numpy .npz (`np.savez`) member `{key}.regions.npz` of the webdataset sample:

    features  [N, D] float   one row per region
    boxes     [N, 4]         x1, y1, x2, y2 in pixels of the original image (x2/y2 exclusive)
    labels    [N] int        optional: index into the dataset's label names; < 0 = unknown
    image_w, image_h         optional scalars: the image size the boxes refer to

The bottom-up-attention layout (github.com/peteanderson80/bottom-up-attention and its
PyTorch port github.com/MILVLG/bottom-up-attention.pytorch, `extract_features.py`) loads too:
`x` [N, 2048] features, `bbox` [N, 4], `image_w`, `image_h`, `num_bbox`; its other keys
(`info`, `objects_id`, `attrs_id`, ...) are ignored. Files that store `x` as [2048, N] (the
MCAN / openvqa feature release, whose loader transposes it) are transposed.

Image size: `image_w`/`image_h` from the file, else the size the caller passes (the pipeline
reads it from the image header).

Validation policy (what happens to a sample, and the skip reason the pipeline counts):

- skipped, `bad_regions`: unreadable npz (not a zip, truncated, pickled objects); no features
  (`features`/`x`) or boxes (`boxes`/`bbox`) array; features not 2-D or boxes not [N, 4];
  features and boxes (or labels, or `num_bbox`) disagree on N; N = 0; NaN or inf in features
  or boxes; non-numeric features or boxes, non-integer labels; a box with x2 < x1 or y2 < y1
  (often xywh boxes read as xyxy); a bad image size (not a positive finite scalar); no
  box left after clipping (below); a feature dimension D other than the dataset's (the
  pipeline fixes it from the first readable file in shard order, or takes it from the caller).
- skipped, `missing_regions`: the sample has no `regions.npz` member where regions are
  required (`visual="regions"`).
- kept, not counted: a box partly outside the image is clipped to it; a box with no area left
  after clipping (fully outside, or zero width/height) is dropped with its features and
  label. A label outside the dataset's label names (when their number is known) becomes
  unknown (-100).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

IGNORE_LABEL = -100  # torch.nn.functional.cross_entropy's default ignore_index


class RegionError(ValueError):
    """A regions file or an object list that cannot be used; the pipeline counts the sample
    as `bad_regions`."""


class UnknownImageSize(RegionError):
    """The file has no image_w/image_h and the caller gave no image size."""


@dataclass
class Regions:
    """One sample's regions, after validation, clipping and dropping."""

    features: np.ndarray | None  # (N, D) float32; None when boxes come from json objects
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in [0, 1] of the image, x1 < x2, y1 < y2
    labels: np.ndarray  # (N,) int64, IGNORE_LABEL (-100) where unknown

    def __len__(self) -> int:
        return len(self.boxes)

    def first(self, n: int) -> "Regions":
        """The first n regions (file order)."""
        return Regions(None if self.features is None else self.features[:n], self.boxes[:n],
                       self.labels[:n])


def _number(value, name: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number) or \
            np.issubdtype(arr.dtype, np.complexfloating):
        raise RegionError(f"{name} must be a number, got {arr.dtype} of shape {arr.shape}")
    x = float(arr.reshape(()))
    if not np.isfinite(x) or x <= 0:
        raise RegionError(f"{name}={x}: must be a positive finite number")
    return x


def _real_array(arr: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise RegionError(f"{name} must be numeric, got dtype {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise RegionError(f"{name} holds NaN or inf")
    return out


def check_image_wh(image_wh) -> tuple[float, float]:
    """(width, height) as positive finite floats, or RegionError."""
    if image_wh is None or len(image_wh) != 2:
        raise RegionError(f"image size {image_wh!r}: expected (width, height)")
    return _number(image_wh[0], "image_w"), _number(image_wh[1], "image_h")


def clip_boxes(boxes_px: np.ndarray, image_wh: tuple[float, float]) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(boxes normalised to [0, 1] and clipped to the image, keep): `keep` [N] bool marks the
    boxes with area left after clipping; only those are returned. `boxes_px` is [N, 4] pixels;
    a box with x2 < x1 or y2 < y1 is a RegionError."""
    boxes = _real_array(np.asarray(boxes_px), "boxes")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RegionError(f"boxes must be [N, 4], got shape {boxes.shape}")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise RegionError("a box has x2 < x1 or y2 < y1 (boxes must be x1, y1, x2, y2, "
                          "not x, y, w, h)")
    w, h = check_image_wh(image_wh)
    scale = np.array([w, h, w, h], np.float32)
    norm = np.clip(boxes / scale, 0.0, 1.0)
    keep = (norm[:, 2] > norm[:, 0]) & (norm[:, 3] > norm[:, 1])
    return norm[keep], keep


def read_regions(npz_bytes: bytes, image_wh: tuple | None, *, num_labels: int | None = None,
                 feature_dim: int | None = None, max_regions: int | None = None) -> Regions:
    """Parse and validate a `regions.npz` (see the module docstring for the format and the
    policy). `image_wh` (width, height) is used when the file has no image_w/image_h; None when
    unknown. `num_labels`: labels outside [0, num_labels) become -100. `feature_dim`: the
    dataset's (or model's) D; another D is a RegionError. `max_regions`: the first ones kept
    (file order). The one reader of region files, for shards and for benchmark folders alike.
    Raises RegionError."""
    try:
        npz = np.load(io.BytesIO(npz_bytes), allow_pickle=False)
    except Exception as exn:  # noqa: BLE001 - zipfile, numpy and OSError all surface here
        raise RegionError(f"unreadable npz: {type(exn).__name__}: {exn}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise RegionError(f"expected an .npz archive, got a single {type(npz).__name__}")
    try:
        with npz:
            arrays = {k: npz[k] for k in npz.files
                      if k in ("features", "x", "boxes", "bbox", "labels", "image_w",
                               "image_h", "num_bbox")}
    except Exception as exn:  # noqa: BLE001 - a corrupt member, or a pickled (object) array
        raise RegionError(f"unreadable npz member: {type(exn).__name__}: {exn}") from None

    boxes = arrays.get("boxes", arrays.get("bbox"))
    if boxes is None:
        raise RegionError(f"no 'boxes' (or 'bbox') array; found {sorted(arrays)}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RegionError(f"boxes must be [N, 4], got shape {boxes.shape}")
    n = boxes.shape[0]
    if "features" in arrays:
        features = arrays["features"]
    elif "x" in arrays:
        features = arrays["x"]
        # MCAN/openvqa's bottom-up-attention release stores x as [2048, N] (its loader does
        # `frcn_feat['x'].transpose((1, 0))`); ours and MILVLG's store [N, 2048].
        if features.ndim == 2 and features.shape[0] != n and features.shape[1] == n:
            features = features.T
    else:
        raise RegionError(f"no 'features' (or 'x') array; found {sorted(arrays)}")
    if features.ndim != 2:
        raise RegionError(f"features must be [N, D], got shape {features.shape}")
    if features.shape[0] != n:
        raise RegionError(f"{features.shape[0]} feature rows but {n} boxes")
    if n == 0:
        raise RegionError("no regions (N = 0)")
    if "num_bbox" in arrays and _number(arrays["num_bbox"], "num_bbox") != n:
        raise RegionError(f"num_bbox={arrays['num_bbox']} but {n} boxes")
    features = _real_array(features, "features")
    if features.shape[1] == 0:
        raise RegionError("features have D = 0")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise RegionError(f"features are {features.shape[1]}-d, the dataset's are "
                          f"{feature_dim}-d")

    labels = arrays.get("labels")
    if labels is None:
        labels = np.full(n, IGNORE_LABEL, np.int64)
    else:
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise RegionError(f"labels must be [N] ints (N={n}), got {labels.dtype} of shape "
                              f"{labels.shape}")
        labels = labels.astype(np.int64)
        unknown = labels < 0 if num_labels is None else (labels < 0) | (labels >= num_labels)
        labels[unknown] = IGNORE_LABEL

    if "image_w" in arrays or "image_h" in arrays:
        image_wh = (arrays.get("image_w"), arrays.get("image_h"))
        if image_wh[0] is None or image_wh[1] is None:
            raise RegionError("the file has only one of image_w, image_h")
    elif image_wh is None:
        raise UnknownImageSize("the image size is unknown (no image_w/image_h in the file, "
                               "and none given)")
    boxes, keep = clip_boxes(boxes, image_wh)
    if not keep.any():
        raise RegionError("no box is inside the image")
    regions = Regions(features[keep], boxes, labels[keep])
    return regions if max_regions is None else regions.first(max_regions)
