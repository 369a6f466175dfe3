"""The webdataset input pipeline: shard URLs -> `Batch`es, with bad input skipped and counted,
resumable mid-epoch from a saved `StreamPosition`.

In each DataLoader worker:

    shard list (shuffled per epoch | wds.ResampledShards)
      -> this rank's shards[rank::world_size] -> this worker's [worker::num_workers]
      -> iter_tar_samples (unreadable shard: counted as shard_error)
      -> block shuffle (raw bytes, cheap): blocks of shuffle_buffer samples, each permuted
      -> parse json, pick caption, decode image / read regions (bad sample: counted by reason)
      -> ImageTransform -> collate + tokenize -> Batch (carries the counts since the last Batch,
         the worker id and the worker's position after the batch)

Visual input (`visual=`), for the single-stream recipes' three kinds of visual tokens:
    patches    the image, transformed (pixel_values); no region fields
    regions    precomputed region features, `{key}.regions.npz` (format and validation policy:
               vlp/data/regions.py); the image is not decoded, only its header read for its
               size when the npz has none; pixel_values is (B, 0)
    roi_align  boxes and labels from the json `objects` (`box` in pixels, `label` looked up in
               `region_labels`), carried through the image transform by
               `ImageTransform.map_boxes`; the model pools its own features in them. The eval
               (deterministic) geometry is used even when training (TODO: a random crop would
               need its crop box passed to map_boxes).

Skip reasons: corrupt_image, missing_image, missing_caption, bad_json, bad_regions,
missing_regions (per sample) and shard_error (per shard that failed to open or read to its end;
samples after the failure point cannot be counted). bad_regions: an unusable regions.npz (see
vlp/data/regions.py), or in roi_align a malformed `objects` list or box; missing_regions: no
regions.npz member (regions), or no `objects` list, an empty one, or none left inside the
cropped image (roi_align). A worker whose stream ends with counts not yet sent yields one empty
Batch (len 0) carrying them, so summing `batch.skipped` over all batches gives exact totals.

Resuming. A worker's position is where it stands in its own shard sequence: `{"block": b,
"shard": j, "offset": o, "index": k}` (block b starts at raw sample o of the worker's j-th shard,
and k of its entries are consumed) or `{"done": True}`. Because blocks are permuted by a seed
of their own and each sample's caption/crop by a seed of the sample, a worker restarted at a
position produces exactly what it would have produced next; a reservoir shuffle buffer could
not be restarted without saving its contents. `StreamPosition` collects the positions from the
batches a run has consumed; `make_loader(start=...)` continues from them.

A worker reads a sequence of *pieces*: by default the whole shards its rank and worker slice
give it; after an elastic resume (another number of processes or workers, vlp/data/elastic.py)
the unread parts of the epoch's shards that it was dealt (`start["plan"]`). A piece is a list
`[shard]` (all of urls[shard]), `[shard, start]`, `[shard, start, stop]` or
`[shard, start, stop, skip]`: the raw samples at offsets start <= o < stop (stop None: to the
end) but those in `skip`. Positions number samples by their offset in the shard, so a piece
read by another worker numbers them alike. A position inside a block also carries the block's
`spans` ([[piece ordinal, samples], ...]), which the tracker keeps apart (`state_dict(blocks=
True)`): with them the consumed samples of a partly read block can be named without reading it.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import ConfigError
from vlp.data.batch import Batch
from vlp.data.regions import (IGNORE_LABEL, RegionError, Regions, UnknownImageSize,
                              read_regions)
from vlp.data.shards import check_shards_vs_workers, expand_urls, iter_tar_samples
from vlp.data.transforms import ImageTransform, to_pil_rgb

if TYPE_CHECKING:
    from vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # looked up in this order
REGIONS_EXT = "regions.npz"
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "bad_json", "bad_regions",
                "missing_regions", "shard_error")
CAPTION_MODES = ("random", "first")
VISUAL_MODES = ("patches", "regions", "roi_align")
PROBE_SAMPLES = 64  # samples read at most to find the dataset's region feature dimension


# --------------------------------------------------------------------------- skip accounting
class SkipCounter:
    """Counts of skipped input by reason (`counts`), local to one worker or one eval loop."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def shard_error(self, url: str, exn: Exception) -> None:
        """`on_error` callback for iter_tar_samples. Shard failures are rare and serious enough
        to name in the log (sample skips are only counted)."""
        log.warning("skipping the rest of shard %s: %s: %s", url, type(exn).__name__, exn)
        self.add("shard_error")

    def pop(self) -> dict[str, int]:
        """The counts so far, and reset."""
        counts, self.counts = self.counts, {}
        return counts


def accumulate(total: dict[str, int], skipped: dict[str, int]) -> dict[str, int]:
    """Add `skipped` (e.g. `batch.skipped`) into `total` in place; returns `total`."""
    for reason, n in skipped.items():
        total[reason] = total.get(reason, 0) + n
    return total


def skipped_samples(counts: dict[str, int]) -> int:
    """Samples skipped in all; shard_error is left out (it counts shards, whose remaining
    samples cannot be counted)."""
    return sum(n for reason, n in counts.items() if reason != "shard_error")


def format_skips(counts: dict[str, int]) -> str:
    """One line for end-of-run reports, e.g. '3 samples skipped (bad_json=1, corrupt_image=2);
    1 shard error' or 'none skipped'. Shard errors count shards, not samples."""
    shards = counts.get("shard_error", 0)
    samples = {k: v for k, v in sorted(counts.items()) if v and k != "shard_error"}
    if not samples and not shards:
        return "none skipped"
    n = skipped_samples(counts)
    text = f"{n} sample{'s' * (n != 1)} skipped"
    if samples:
        text += " (" + ", ".join(f"{k}={v}" for k, v in samples.items()) + ")"
    if shards:
        text += f"; {shards} shard error{'s' * (shards != 1)}"
    return text


# --------------------------------------------------------------------------- sample parsing
class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS (counted, not fatal)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_json_member(raw: dict) -> dict:
    """A sample's `.json` member as a dict ({} when it has none); SkipSample("bad_json")."""
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError):
        raise SkipSample("bad_json") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json")
    return meta


def _read_captions(raw: dict, meta: dict) -> tuple[str, list[str]]:
    """(txt, captions): the .txt caption ('' if none) and all captions — json `captions` when
    present (our data), else [txt], else [json `caption`] (img2dataset also writes it)."""
    txt = raw.get("txt", b"")
    txt = txt.decode("utf-8", errors="replace").strip() if isinstance(txt, bytes) else ""
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return txt, captions
    if txt:
        return txt, [txt]
    cap = meta.get("caption")
    if isinstance(cap, str) and cap.strip():
        return txt, [cap.strip()]
    return txt, []


def _image_ext(raw: dict) -> str:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image")
    return ext


def _image_size(raw: dict) -> tuple[int, int]:
    """(width, height) from the image header alone (no decode)."""
    ext = _image_ext(raw)
    try:
        return Image.open(io.BytesIO(raw[ext])).size
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise SkipSample("corrupt_image") from None


def decode_image(raw: dict) -> Image.Image:
    """A sample's image member, decoded to RGB; SkipSample for a missing or corrupt one."""
    ext = _image_ext(raw)
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()  # Image.open only reads the header; truncated data fails here
        # Converted here, not in the transform, so an odd mode is a counted skip, not a crash.
        return to_pil_rgb(image)
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, bomb...)
        raise SkipSample("corrupt_image") from None


@dataclass(frozen=True)
class _Visual:
    """What a sample's visual input is read as (make_loader's `visual` and its settings)."""

    mode: str = "patches"
    max_regions: int = 36
    region_dim: int | None = None  # "regions": the dataset's D; other D are bad_regions
    region_labels: tuple[str, ...] | None = None

    def label_index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, name in enumerate(self.region_labels or ()):
            index.setdefault(name, i)
        return index


def _check_visual(visual: str, max_regions: int, region_labels) -> None:
    if visual not in VISUAL_MODES:
        raise ConfigError(f"visual={visual!r}: expected one of {VISUAL_MODES} (model."
                          "visual_tokens: image patches, precomputed region features, or "
                          "boxes from the json pooled by the model)")
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise ConfigError(f"max_regions={max_regions!r}: must be an int >= 1")
    if region_labels is not None and (isinstance(region_labels, str) or not all(
            isinstance(x, str) for x in region_labels)):
        raise ConfigError(f"region_labels={region_labels!r}: expected a list of label names")


def _is_coord(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_regions(meta: dict, labels: dict[str, int]) -> tuple[list, np.ndarray]:
    """(boxes in pixels, labels) from the json `objects`; SkipSample for a malformed or missing list.
    A label not in `labels` (or none) is IGNORE_LABEL."""
    objects = meta.get("objects")
    if objects is None:
        raise SkipSample("missing_regions")
    if not isinstance(objects, list):
        raise SkipSample("bad_regions")
    boxes, ids = [], []
    for o in objects:
        box = o.get("box") if isinstance(o, dict) else None
        if not isinstance(box, list) or len(box) != 4 or not all(_is_coord(v) for v in box):
            raise SkipSample("bad_regions")
        label = o.get("label")
        boxes.append(box)
        ids.append(labels.get(label, IGNORE_LABEL) if isinstance(label, str) else IGNORE_LABEL)
    if not boxes:
        raise SkipSample("missing_regions")
    return boxes, np.array(ids, np.int64)


def parse_sample(raw: dict, visual: _Visual = _Visual(), geometry: ImageTransform | None = None
           ) -> tuple[dict, str, list[str], Image.Image | None, Regions | None]:
    """(json, txt, captions, image, regions) or SkipSample. Cheap checks first: no decode for a
    sample that is skipped anyway.

    patches: image decoded, regions None. regions: image None, regions from the npz (boxes
    normalised by the original image size). roi_align: image decoded, regions from the json
    with boxes already mapped through `geometry` (an eval ImageTransform; the caller transforms
    the image with it). Regions are cut to the first visual.max_regions."""
    meta = read_json_member(raw)
    txt, captions = _read_captions(raw, meta)
    if not captions:
        raise SkipSample("missing_caption")
    if visual.mode == "patches":
        return meta, txt, captions, decode_image(raw), None
    if visual.mode == "regions":
        if REGIONS_EXT not in raw:
            raise SkipSample("missing_regions")
        try:  # only needed when the npz has no image_w/image_h
            image_wh, no_size = _image_size(raw), None
        except SkipSample as skip:
            image_wh, no_size = None, skip
        num_labels = None if visual.region_labels is None else len(visual.region_labels)
        try:
            regions = read_regions(raw[REGIONS_EXT], image_wh, num_labels=num_labels,
                                   feature_dim=visual.region_dim,
                                   max_regions=visual.max_regions)
        except UnknownImageSize:
            raise no_size from None
        except RegionError:
            raise SkipSample("bad_regions") from None
        return meta, txt, captions, None, regions
    boxes_px, labels = _json_regions(meta, visual.label_index())
    image = decode_image(raw)
    try:
        boxes, keep = geometry.map_boxes(boxes_px, image.size)
    except RegionError:
        raise SkipSample("bad_regions") from None
    if not keep.any():
        raise SkipSample("missing_regions")
    return meta, txt, captions, image, Regions(None, boxes, labels[keep]).first(visual.max_regions)


def collate_regions(regions: Sequence[Regions], dim: int | None = None) -> dict[str, torch.Tensor]:
    """Pad per-sample `Regions` to the longest: {"region_features" (B, R, D) (only when the
    regions have features, or `dim` is given for an empty list), "region_boxes" (B, R, 4),
    "region_labels" (B, R) (-100 where padded), "region_mask" (B, R) bool}."""
    b, r = len(regions), max((len(x) for x in regions), default=0)
    with_features = regions[0].features is not None if regions else dim is not None
    out = {"region_boxes": torch.zeros(b, r, 4),
           "region_labels": torch.full((b, r), IGNORE_LABEL, dtype=torch.long),
           "region_mask": torch.zeros(b, r, dtype=torch.bool)}
    if with_features:
        d = regions[0].features.shape[1] if regions else dim
        out["region_features"] = torch.zeros(b, r, d)
    for i, x in enumerate(regions):
        n = len(x)
        out["region_boxes"][i, :n] = torch.from_numpy(x.boxes)
        out["region_labels"][i, :n] = torch.from_numpy(x.labels)
        out["region_mask"][i, :n] = True
        if with_features:
            out["region_features"][i, :n] = torch.from_numpy(x.features)
    return out


def region_feature_dim(urls: str | Sequence[str], max_samples: int = PROBE_SAMPLES) -> int | None:
    """The feature dimension D most of the first `max_samples` samples' readable regions.npz
    files have (ties: the one seen first), or None when none is readable. The loader fixes a
    dataset's D with it, so every rank, worker and resumed run agrees on which files are
    bad_regions; a majority, so one odd file first in the shards does not make every other
    file the odd one out."""
    counts: dict[int, int] = {}
    for sample in itertools.islice(iter_tar_samples(expand_urls(urls), lambda url, exn: None),
                                   max_samples):
        if REGIONS_EXT not in sample:
            continue
        try:
            wh = _image_size(sample)
        except SkipSample:
            wh = None
        try:
            dim = int(read_regions(sample[REGIONS_EXT], wh).features.shape[1])
        except RegionError:
            continue
        counts[dim] = counts.get(dim, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None  # dicts keep first-seen order


def has_region_files(urls: str | Sequence[str]) -> bool:
    """Whether the first sample of the first readable shard has a `regions.npz` member (a
    quick check at start that `visual="regions"` has data to read)."""
    for sample in iter_tar_samples(expand_urls(urls), lambda url, exn: None):
        return REGIONS_EXT in sample
    return False


# --------------------------------------------------------------------------- training stream
def _seed(*parts) -> int:
    """A 64-bit seed from ints/strings; stable across processes (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def reader_shards(num_shards: int, *, seed: int, epoch: int, shuffle_buffer: int, rank: int,
                  world_size: int, worker: int, num_workers: int) -> list[int]:
    """The shards (indices into the url list) that reader (rank, worker) of an epoch-mode stream
    reads in `epoch`, in order: the epoch's shard permutation (the same on every rank when
    shuffle_buffer > 0), sliced by rank, then by worker."""
    order = list(range(num_shards))
    if shuffle_buffer > 0:
        # Same permutation on every rank (seed and epoch only), so the slices are disjoint.
        random.Random(_seed(seed, epoch, "shards")).shuffle(order)
    return order[rank::world_size][worker::max(1, num_workers)]


def block_order(seed: int, epoch: int, rank: int, worker: int, block: int, n: int) -> list[int]:
    """The order in which reader (rank, worker) takes the n raw samples of its block `block`."""
    order = list(range(n))
    if n > 1:
        random.Random(_seed(seed, epoch, rank, worker, "block", block)).shuffle(order)
    return order


Bounds = tuple  # (start, stop | None, frozenset of skipped offsets): a piece without its shard
WHOLE: Bounds = (0, None, frozenset())


def make_piece(shard: int, start: int = 0, stop: int | None = None,
               skip: Iterable[int] = ()) -> list | None:
    """A piece in its shortest list form (see the module docstring), or None when its offset
    range is empty. `skip` is kept only inside [start, stop)."""
    if stop is not None and start >= stop:
        return None
    skip = sorted({o for o in skip if o >= start and (stop is None or o < stop)})
    if stop is not None and len(skip) == stop - start:
        return None
    if skip:
        return [shard, start, stop, skip]
    if stop is not None:
        return [shard, start, stop]
    return [shard, start] if start else [shard]


def piece_fields(piece) -> tuple[int, int, int | None, frozenset]:
    """(shard, start, stop, skip) of a piece; ValueError naming what is wrong."""
    ok = isinstance(piece, list) and 1 <= len(piece) <= 4 and _is_count(piece[0])
    if ok:
        shard, start, stop, skip = (piece + [0, None, []][len(piece) - 1:])[:4]
        ok = _is_count(start) and (stop is None or _is_count(stop)) and \
            isinstance(skip, list) and all(_is_count(o) for o in skip)
    if not ok:
        raise ValueError(f"{piece!r} is not a shard piece: expected [shard], [shard, start], "
                         "[shard, start, stop] or [shard, start, stop, [skipped offsets]] with "
                         "ints >= 0 (stop may be null)")
    return shard, start, stop, frozenset(skip)


class _RawReader:
    """One worker's raw samples in order, numbered by (piece ordinal, offset in the shard).

    `position` is the number of the next sample `take` returns, or None at the end. That sample
    is already read (one sample of look-ahead), so a position never points past the end of a
    shard or at a shard that failed: a restart there re-reads no shard just to skip it, and
    the shard errors on the way were counted before the position was reported.
    """

    def __init__(self, pieces: Iterable[tuple[str, Bounds]], shard: int, offset: int,
                 skips: SkipCounter, count_errors: bool, max_failures_in_a_row: int | None):
        self.count_errors = count_errors
        self._skips = skips
        self._max_failures, self._failures = max_failures_in_a_row, 0
        self._samples = self._read_pieces(itertools.islice(pieces, shard, None), shard)
        self._next = next(self._samples, None)
        while self._next is not None and self._next[:2] < (shard, offset):
            self._next = next(self._samples, None)

    def _read_pieces(self, pieces: Iterable[tuple[str, Bounds]],
                     first: int) -> Iterator[tuple[int, int, dict]]:
        """(piece ordinal, offset in its shard, sample) of the samples the pieces read."""
        for ordinal, (url, (start, stop, skip)) in enumerate(pieces, first):
            samples = iter_tar_samples([url], self._on_error)
            try:
                for offset, sample in enumerate(samples):
                    self._failures = 0
                    if offset >= start and offset not in skip:
                        yield ordinal, offset, sample
                    if stop is not None and offset + 1 >= stop:
                        break  # the piece ends here: no further read (nor error) of the shard
            finally:
                samples.close()

    def _on_error(self, url: str, exn: Exception) -> None:
        if self.count_errors:
            self._skips.shard_error(url, exn)
        self._failures += 1
        if self._max_failures is not None and self._failures >= self._max_failures:
            raise RuntimeError(f"{self._failures} shards in a row failed to read (the last: "
                               f"{url}: {type(exn).__name__}: {exn}); is the data reachable?")

    @property
    def position(self) -> tuple[int, int] | None:
        return None if self._next is None else self._next[:2]

    def take(self, n: int) -> list[tuple[int, dict]]:
        """The next n raw samples (fewer at the end of the stream), each with its piece
        ordinal."""
        out = []
        while len(out) < n and self._next is not None:
            out.append((self._next[0], self._next[2]))
            self._next = next(self._samples, None)
        return out


def _runs(ordinals: Iterable[int]) -> list[list[int]]:
    """[[ordinal, count], ...] of consecutive equal ordinals."""
    out: list[list[int]] = []
    for x in ordinals:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


class ShardDataset(IterableDataset):
    """Iterable of `Batch`es for one rank; each DataLoader worker reads its own shards.

    Built by `make_loader`; kept picklable (spawn start method) by holding only plain
    settings, the tokenizer and the transform. `start` (a checked `StreamPosition.state_dict()`)
    applies only while `epoch` is the epoch it was saved in.
    """

    def __init__(self, urls: list[str], *, tokenizer: "Tokenizer", transform: ImageTransform,
                 batch_size: int, context_length: int, shuffle_buffer: int, seed: int,
                 rank: int, world_size: int, resampled: bool, caption: str, epoch: int,
                 drop_last: bool, start: dict | None = None, visual: _Visual = _Visual()):
        super().__init__()
        self.urls = list(urls)
        self.tokenizer, self.transform = tokenizer, transform
        self.visual = visual
        # roi_align: boxes must follow the image, and map_boxes knows only the eval geometry.
        self.geometry = transform.as_eval() if visual.mode == "roi_align" else None
        self.batch_size, self.context_length = batch_size, context_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.resampled, self.caption, self.drop_last = resampled, caption, drop_last
        self.epoch = epoch
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        """Takes effect at the next iter(loader) (workers are re-created every epoch). A
        `start` position is for its own epoch only: other epochs start from the beginning."""
        self.epoch = epoch

    def active_start(self) -> dict | None:
        """The start state if it applies to the current epoch, else None."""
        return self.start if self.start is not None and self.start["epoch"] == self.epoch else None

    def worker_pieces(self, worker: int, num_workers: int) -> Iterable[tuple[str, Bounds]]:
        """This rank's and worker's pieces for the current epoch, as (url, bounds): the plan a
        re-dealt start gives it, else its whole shards (`worker_urls`)."""
        start = self.active_start()
        if start is not None and start.get("plan") is not None:
            return [(self.urls[shard], (a, b, skip)) for shard, a, b, skip
                    in map(piece_fields, start["plan"][worker])]
        return ((url, WHOLE) for url in self.worker_urls(worker, num_workers))

    def worker_urls(self, worker: int, num_workers: int) -> Iterable[str]:
        """This rank's and worker's shard URLs for the current epoch (without a plan)."""
        if self.resampled:
            # Every reader draws from all shards with its own seed (OpenCLIP's resampled mode):
            # an endless stream, so no split and no shard-count constraint. The draws depend on
            # the seed only, so a restart re-creates them and skips the ones already read.
            seed = _seed(self.seed, self.epoch, self.rank, worker)
            shards = wds.ResampledShards(self.urls, seed=seed, deterministic=True,
                                         worker_seed=lambda: 0)
            return (s["url"] for s in shards)
        return [self.urls[i] for i in reader_shards(
            len(self.urls), seed=self.seed, epoch=self.epoch, shuffle_buffer=self.shuffle_buffer,
            rank=self.rank, world_size=self.world_size, worker=worker, num_workers=num_workers)]

    def _sample_rng(self, worker: int, shard: int, sample: dict) -> random.Random:
        """Caption choice and crop are keyed by the sample, not by the stream position, so a
        restarted worker repeats them, and in epoch mode the same sample gets the same ones on
        any rank or worker, from any copy of the shards (the key, not the URL: img2dataset keys
        are unique across a dataset's shards). A resampled stream may draw a shard twice: its
        draw is mixed in."""
        if self.resampled:
            return random.Random(_seed(self.seed, self.epoch, self.rank, worker, shard,
                                       sample["__url__"], sample["__key__"]))
        return random.Random(_seed(self.seed, self.epoch, sample["__key__"]))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.active_start()
        # The DataLoader asks its workers for batches round-robin from physical worker 0; the
        # rotation makes it ask the worker that was next when the position was saved.
        worker = (physical + (start["next_worker"] if start else 0)) % num_workers
        saved = start["positions"][worker] if start else None
        position = saved or {"block": 0, "shard": 0, "offset": 0, "index": 0}
        if position.get("done"):
            return
        skips = SkipCounter()
        block, index = position["block"], position["index"]
        # Re-reading a partly consumed block repeats its shard errors, which were already
        # reported in the batches before the position; a block not yet begun counts them.
        reader = _RawReader(self.worker_pieces(worker, num_workers), position["shard"],
                            position["offset"], skips, count_errors=index == 0,
                            max_failures_in_a_row=100 if self.resampled else None)
        if saved and reader.position != (position["shard"], position["offset"]):
            log.warning("worker %d resumes at %s, but the stream continues at %s (did the "
                        "shards change since the position was saved?)", worker, position,
                        reader.position)
        block_size = max(1, self.shuffle_buffer)
        pending: list[tuple[str, torch.Tensor | None, str, Regions | None]] = []
        while reader.position is not None:
            block_shard, block_offset = reader.position
            entries = reader.take(block_size)
            reader.count_errors = True
            order = block_order(self.seed, self.epoch, self.rank, worker, block, len(entries))
            spans = _runs(piece for piece, _ in entries)
            for i in range(index, len(entries)):  # the first `index` entries were consumed
                shard, sample = entries[order[i]]
                try:
                    _, txt, captions, image, regions = parse_sample(sample, self.visual, self.geometry)
                except SkipSample as skip:
                    skips.add(skip.reason)
                    continue
                rng = self._sample_rng(worker, shard, sample)
                text = rng.choice(captions) if self.caption == "random" else (txt or captions[0])
                if self.visual.mode == "patches":
                    pixels = self.transform(image, rng=rng)
                elif self.visual.mode == "roi_align":
                    pixels = self.geometry(image)
                else:
                    pixels = None
                pending.append((sample["__key__"], pixels, text, regions))
                if len(pending) == self.batch_size:
                    if i + 1 < len(entries):
                        at = {"block": block, "shard": block_shard, "offset": block_offset,
                              "index": i + 1, "spans": spans}
                    elif reader.position is not None:
                        # The block is used up: point at the next one, so that a restart reads
                        # nothing of this one.
                        at = {"block": block + 1, "shard": reader.position[0],
                              "offset": reader.position[1], "index": 0}
                    else:
                        at = {"done": True}
                    yield self._collate(pending, skips.pop(), worker, at)
                    pending = []
            block, index = block + 1, 0
        # A partial last batch under drop_last is expected (not a skip): it is not counted.
        if pending and not self.drop_last:
            yield self._collate(pending, skips.pop(), worker, {"done": True})
        if skips.counts:
            yield self._collate([], skips.pop(), worker, {"done": True})  # stats-only: len 0

    def _collate(self, items: list[tuple[str, torch.Tensor | None, str, Regions | None]],
                 skipped: dict[str, int], worker: int, position: dict) -> Batch:
        keys, pixels, texts, regions = zip(*items) if items else ((), (), (), ())
        if self.visual.mode == "regions":
            pixel_values = torch.zeros(len(items), 0)  # not decoded
        elif items:
            pixel_values = torch.stack(pixels)
        else:
            size = self.transform.image_size
            pixel_values = torch.zeros(0, 3, size, size)
        input_ids, attention_mask = self.tokenizer(list(texts), self.context_length)
        extra = {} if self.visual.mode == "patches" else \
            collate_regions(regions, dim=self.visual.region_dim)
        return Batch(list(keys), input_ids=input_ids, attention_mask=attention_mask,
                     pixel_values=pixel_values, skipped=skipped, worker=worker,
                     position=position, **extra)


class StreamPosition:
    """Where one rank's training stream stands, for an exact mid-epoch restart.

    Feed it every batch taken from the loader, empty ones included (`update`); save
    `state_dict()` (plain JSON) with the checkpoint; pass it as `make_loader(start=...)` to go
    on with exactly the batches the interrupted run would have produced next. It records each
    loader worker's position after its last consumed batch and which worker the DataLoader asks
    next: torch hands out batches round-robin over workers 0..n-1, skipping exhausted ones
    (torch/utils/data/dataloader.py, `_MultiProcessingDataLoaderIter._try_put_index` and
    `_next_data`), and so does the resumed loader, starting at `next_worker`.

    `epoch` and `num_workers` are always checked on resume; the other settings (rank,
    world_size, num_shards, resampled, shuffle_buffer, seed) when recorded. `for_loader` records
    them all. A loader started from a re-dealt plan keeps it (`plan`: each worker's pieces);
    `state_dict(blocks=True)` adds each worker's current block spans (`blocks`), which only an
    elastic resume needs (vlp/data/elastic.py).
    """

    SETTINGS = ("rank", "world_size", "num_shards", "resampled", "shuffle_buffer", "seed")

    def __init__(self, num_workers: int, epoch: int, **settings):
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise ValueError(f"unknown StreamPosition setting(s) {unknown}; valid: "
                             f"{list(self.SETTINGS)}")
        self.num_workers, self.epoch = num_workers, epoch
        self.settings = {k: settings.get(k) for k in self.SETTINGS}  # None: not recorded
        self.positions: list[dict | None] = [None] * max(1, num_workers)
        self.blocks: list[list | None] = [None] * max(1, num_workers)  # spans, inside a block
        self.plan: list[list] | None = None  # each worker's pieces, when re-dealt
        self.next_worker = 0

    @classmethod
    def for_loader(cls, loader: DataLoader) -> "StreamPosition":
        """A tracker for a `make_loader` loader, recording all its settings; for a resumed
        loader it starts from the loader's `start`."""
        dataset = loader.dataset
        if dataset.active_start() is not None:
            return cls.from_state(dataset.active_start())
        return cls(loader.num_workers, dataset.epoch, rank=dataset.rank,
                   world_size=dataset.world_size, num_shards=len(dataset.urls),
                   resampled=dataset.resampled, shuffle_buffer=dataset.shuffle_buffer,
                   seed=dataset.seed)

    def update(self, batch: Batch) -> None:
        """Record that `batch` has been consumed."""
        if not 0 <= batch.worker < len(self.positions):
            raise ValueError(f"batch.worker={batch.worker} is outside num_workers="
                             f"{self.num_workers}; is this tracker for this loader?")
        position = batch.position
        spans = position.get("spans") if isinstance(position, dict) else None
        if spans is not None:
            position = {k: v for k, v in position.items() if k != "spans"}
        self.positions[batch.worker] = position
        self.blocks[batch.worker] = [list(x) for x in spans] if spans else None
        self.next_worker = (batch.worker + 1) % len(self.positions)

    def state_dict(self, blocks: bool = False) -> dict:
        """Plain JSON: {"epoch", "num_workers", "next_worker", "positions": [position or null
        per worker], the recorded settings, "plan" when re-dealt, and with `blocks` the
        "blocks": [spans or null per worker]}."""
        state = {"epoch": self.epoch, "num_workers": self.num_workers,
                 **{k: v for k, v in self.settings.items() if v is not None},
                 "next_worker": self.next_worker,
                 "positions": [dict(p) if p is not None else None for p in self.positions]}
        if self.plan is not None:
            state["plan"] = [[list(piece) for piece in pieces] for pieces in self.plan]
        if blocks:
            state["blocks"] = [[list(x) for x in b] if b else None for b in self.blocks]
        return state

    @classmethod
    def from_state(cls, state: dict) -> "StreamPosition":
        """The tracker saved by `state_dict`; a malformed state raises ValueError naming the
        bad field."""
        if not isinstance(state, dict):
            raise ValueError(f"a stream position state must be a dict (StreamPosition."
                             f"state_dict()), got {type(state).__name__}")
        required = ("epoch", "num_workers", "next_worker", "positions")
        valid = required + cls.SETTINGS + ("plan", "blocks")
        unknown = sorted(set(state) - set(valid))
        if unknown:
            raise ValueError(f"unknown stream position field(s) {unknown}; valid: {list(valid)}")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"stream position state lacks {missing}")
        for name in ("epoch", "num_workers", "next_worker"):
            if not _is_count(state[name]):
                raise ValueError(f"start.{name}={state[name]!r}: expected an int >= 0")
        n = max(1, state["num_workers"])
        positions = state["positions"]
        if not isinstance(positions, list) or len(positions) != n:
            raise ValueError(f"start.positions={positions!r}: expected a list of {n} positions "
                             f"(one per loader worker, num_workers={state['num_workers']})")
        if state["next_worker"] >= n:
            raise ValueError(f"start.next_worker={state['next_worker']} is outside "
                             f"num_workers={state['num_workers']}")
        for w, p in enumerate(positions):
            _check_position(p, f"start.positions[{w}]")
        plan, blocks = state.get("plan"), state.get("blocks")
        for name, value in (("plan", plan), ("blocks", blocks)):
            if value is not None and (not isinstance(value, list) or len(value) != n):
                raise ValueError(f"start.{name}: expected a list of {n} (one per loader worker, "
                                 f"num_workers={state['num_workers']}), got {value!r:.200}")
        for w, pieces in enumerate(plan or []):
            if not isinstance(pieces, list):
                raise ValueError(f"start.plan[{w}]={pieces!r:.200}: expected a list of pieces")
            for piece in pieces:
                try:
                    piece_fields(piece)
                except ValueError as e:
                    raise ValueError(f"start.plan[{w}]: {e}") from None
        for w, spans in enumerate(blocks or []):
            _check_spans(spans, positions[w], f"start.blocks[{w}]")
        settings = {k: state[k] for k in cls.SETTINGS if k in state}
        tracker = cls(state["num_workers"], state["epoch"], **settings)
        tracker.positions = [dict(p) if p is not None else None for p in positions]
        tracker.next_worker = state["next_worker"]
        if plan is not None:
            tracker.plan = [[list(piece) for piece in pieces] for pieces in plan]
        if blocks is not None:
            tracker.blocks = [[list(x) for x in b] if b else None for b in blocks]
        return tracker


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_position(p, name: str) -> None:
    if p is None or p == {"done": True}:
        return
    fields = ("block", "shard", "offset", "index")
    if not isinstance(p, dict) or set(p) != set(fields) or not all(_is_count(p[f])
                                                                    for f in fields):
        raise ValueError(f"{name}={p!r}: expected null, {{'done': true}} or "
                         f"{{'block', 'shard', 'offset', 'index'}} ints >= 0")


def _check_spans(spans, position, name: str) -> None:
    """A worker's block spans: null, or [[piece ordinal, samples], ...] for the block its
    position is inside (starting at its piece, holding more samples than it consumed)."""
    if spans is None:
        return
    ok = isinstance(spans, list) and spans and all(
        isinstance(x, list) and len(x) == 2 and _is_count(x[0]) and _is_count(x[1]) and x[1]
        for x in spans)
    inside = isinstance(position, dict) and "index" in position
    if not ok or not inside or spans[0][0] != position["shard"] or \
            sum(x[1] for x in spans) <= position["index"]:
        raise ValueError(f"{name}={spans!r:.200}: expected null or [[piece, samples], ...] of "
                         f"the block that position {position!r} is inside")


def _check_start(start: "StreamPosition | dict", expected: dict) -> dict:
    """`start` as a state dict, after checking that it was saved from this very stream."""
    if isinstance(start, StreamPosition):
        start = start.state_dict(blocks=True)
    # blocks kept: a checkpoint taken before a worker's first new batch still names its block
    state = StreamPosition.from_state(start).state_dict(blocks=True)
    for name, want in expected.items():
        if name in state and state[name] != want:
            raise ValueError(
                f"start.{name}={state[name]!r}, but this loader has {name}={want!r}: a stream "
                "position resumes only the stream it was saved from (same shards, seed, "
                "shuffle_buffer, resampled, num_workers, rank, world_size and epoch)")
    return state


def make_loader(urls: str | Sequence[str], *, tokenizer: "Tokenizer", transform: ImageTransform,
                batch_size: int, context_length: int, num_workers: int = 2,
                shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
                resampled: bool = False, caption: str = "random", epoch: int = 0,
                drop_last: bool = True, pin_memory: bool = False,
                start: "StreamPosition | dict | None" = None, visual: str = "patches",
                max_regions: int = 36, region_labels: Sequence[str] | None = None,
                region_dim: int | None = None) -> DataLoader:
    """A DataLoader of `Batch`es for one rank and one epoch.

    `urls`: a spec or URL list (see shards.expand_urls). shuffle_buffer > 0 shuffles the shard
    order (per epoch, same on all ranks); shuffle_buffer > 1 also reads each worker's samples in
    blocks of that size and permutes each block; <= 1 reads samples in order. `caption`:
    "random" (one of the json `captions` per sample, else the txt) or "first" (the txt, else
    the first caption). All randomness derives from (seed, epoch, rank, worker) and, for
    captions and crops, the sample: the same arguments give the same batches. Make a new loader
    per epoch (or call `loader.dataset.set_epoch(e)`). Batches of len 0 carry only skip counts.

    `start`: a `StreamPosition` (or its state_dict) saved from a loader with the same settings
    and epoch; the loader then yields exactly the batches that loader would have yielded after
    the ones recorded. Track a loader with `StreamPosition.for_loader(loader)`. A start with a
    `plan` (vlp/data/elastic.py: the rest of an epoch re-dealt to this loader's workers) makes
    each worker read its planned pieces instead of its share of the shards, for that epoch.

    `visual` (model.visual_tokens): "patches" (pixel_values only), "regions" (Batch.region_*
    from each sample's regions.npz; pixel_values (B, 0)) or "roi_align" (pixel_values and
    Batch.region_boxes/labels/mask from the json objects, mapped through the eval geometry of
    `transform` even when it is a training transform). A sample keeps its first `max_regions`
    regions, in file order. `region_labels`: the dataset's label names; in roi_align the json
    `label` is looked up in it (-100 when absent or unknown), in regions npz labels outside it
    become -100. `region_dim` (regions): the feature dimension D; by default that of the first
    usable regions.npz in shard order (`region_feature_dim`); files with another D are
    bad_regions.
    """
    if caption not in CAPTION_MODES:
        raise ValueError(f"caption={caption!r}: expected one of {CAPTION_MODES}")
    _check_visual(visual, max_regions, region_labels)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    urls = expand_urls(urls)
    if not resampled:
        check_shards_vs_workers(len(urls), world_size, num_workers)
    if visual == "regions" and region_dim is None:
        region_dim = region_feature_dim(urls)
        if region_dim is None:
            raise ConfigError(_no_regions_message(urls))
    if start is not None:
        start = _check_start(start, {
            "epoch": epoch, "num_workers": num_workers, "rank": rank, "world_size": world_size,
            "num_shards": len(urls), "resampled": resampled, "shuffle_buffer": shuffle_buffer,
            "seed": seed})
    dataset = ShardDataset(urls, tokenizer=tokenizer, transform=transform, batch_size=batch_size,
                           context_length=context_length, shuffle_buffer=shuffle_buffer,
                           seed=seed, rank=rank, world_size=world_size, resampled=resampled,
                           caption=caption, epoch=epoch, drop_last=drop_last, start=start,
                           visual=_Visual(visual, max_regions, region_dim,
                                          None if region_labels is None else tuple(region_labels)))
    # batch_size=None: batches are built (and tokenized) in the workers.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=pin_memory,
                      worker_init_fn=_init_worker if num_workers else None)


def _no_regions_message(urls: Sequence[str]) -> str:
    return (f"visual='regions' needs region features ({{key}}.{REGIONS_EXT} in each sample; "
            f"format: vlp/data/regions.py), but none was found in the first {PROBE_SAMPLES} "
            f"samples of {urls[0]}. The shapes world has them from format v2 on: write it "
            "with `vlp data synth --out DIR` (a data.synth_dir written before v2 lacks them: "
            "regenerate it); for other data, extract them first (bottom-up-attention npz files "
            "load as they are), or use model.visual_tokens=patches or roi_align.")


def _init_worker(worker_id: int) -> None:
    """Loader workers decode and tokenize; torch ops there must not start their own thread
    pools, which would fight the training process for the same cores. They also ignore
    SIGTERM/SIGINT: launchers (deepspeed's, torchrun) and Ctrl-C signal the whole process tree,
    and the training process must still have its workers while it saves a checkpoint; they
    exit when it shuts the loader down (or dies: torch's workers watch their parent)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- evaluation / text
def iter_eval_samples(urls: str | Sequence[str], transform: ImageTransform,
                      skips: SkipCounter | None = None, *, visual: str = "patches",
                      max_regions: int = 36, region_labels: Sequence[str] | None = None,
                      region_dim: int | None = None) -> Iterator[dict]:
    """Every usable sample, in shard order, in this process: `{"key", "pixel_values" (3, H, W),
    "captions" (json captions, else [txt]), "json"}`. Bad samples and shards are skipped and
    counted in `skips` (pass one in to read the counts).

    `visual` and the region settings as in `make_loader`; with "regions" or "roi_align" each
    sample also has "regions" (a `Regions`; batch them with `collate_regions`), and with
    "regions" "pixel_values" is an empty (0,) tensor (the image is not decoded)."""
    _check_visual(visual, max_regions, region_labels)
    urls = expand_urls(urls)
    if visual == "regions" and region_dim is None:
        region_dim = region_feature_dim(urls)
        if region_dim is None:
            raise ConfigError(_no_regions_message(urls))
    spec = _Visual(visual, max_regions, region_dim,
                   None if region_labels is None else tuple(region_labels))
    geometry = transform.as_eval() if visual == "roi_align" else None
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_tar_samples(urls, skips.shard_error):
        try:
            meta, _, captions, image, regions = parse_sample(sample, spec, geometry)
        except SkipSample as skip:
            skips.add(skip.reason)
            continue
        out = {"key": sample["__key__"], "captions": captions, "json": meta}
        if visual == "patches":
            out["pixel_values"] = transform(image)
        else:
            out["pixel_values"] = torch.zeros(0) if image is None else geometry(image)
            out["regions"] = regions
        yield out


def iter_captions(urls: str | Sequence[str], skips: SkipCounter | None = None) -> Iterator[str]:
    """All captions of all samples (json `captions` when present, else the txt), in shard order;
    images are not decoded. For training a tokenizer."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_tar_samples(expand_urls(urls), skips.shard_error):
        try:
            _, captions = _read_captions(sample, read_json_member(sample))
        except SkipSample as skip:
            skips.add(skip.reason)
            continue
        if not captions:
            skips.add("missing_caption")
            continue
        yield from captions
