"""The webdataset input pipeline: shard URLs -> `Batch`es, with bad input skipped and counted.

In each DataLoader worker:

    shard list (shuffled per epoch | wds.ResampledShards)
      -> this rank's shards[rank::world_size] -> this worker's [worker::num_workers]
      -> iter_tar_samples (unreadable shard: counted as shard_error)
      -> shuffle buffer (raw bytes, cheap)
      -> parse json, pick caption, decode image (bad sample: counted by reason)
      -> ImageTransform -> collate + tokenize -> Batch (carries the counts since the last Batch)

Skip reasons: corrupt_image, missing_image, missing_caption, bad_json (per sample) and
shard_error (per shard that failed to open or read to its end; samples after the failure point
cannot be counted). A worker whose stream ends with counts not yet sent yields one empty Batch
(len 0) carrying them, so summing `batch.skipped` over all batches gives exact totals.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.batch import Batch
from vlp.data.shards import check_shards_vs_workers, expand_urls, iter_tar_samples
from vlp.data.transforms import ImageTransform, to_pil_rgb

if TYPE_CHECKING:
    from vlp.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # looked up in this order
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "bad_json", "shard_error")
CAPTION_MODES = ("random", "first")


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
class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _read_json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError):
        raise _Skip("bad_json") from None
    if not isinstance(meta, dict):
        raise _Skip("bad_json")
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


def _decode_image(raw: dict) -> Image.Image:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise _Skip("missing_image")
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()  # Image.open only reads the header; truncated data fails here
        # Converted here, not in the transform, so an odd mode is a counted skip, not a crash.
        return to_pil_rgb(image)
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, bomb...)
        raise _Skip("corrupt_image") from None


def _parse(raw: dict) -> tuple[dict, str, list[str], Image.Image]:
    """(json, txt, captions, image) or _Skip. Cheap checks first: no decode for a sample that
    is skipped anyway."""
    meta = _read_json(raw)
    txt, captions = _read_captions(raw, meta)
    if not captions:
        raise _Skip("missing_caption")
    return meta, txt, captions, _decode_image(raw)


# --------------------------------------------------------------------------- training stream
def _seed(*parts) -> int:
    """A 64-bit seed from ints/strings; stable across processes (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ShardDataset(IterableDataset):
    """Iterable of `Batch`es for one rank; each DataLoader worker reads its own shards.

    Built by `make_loader`; kept picklable (spawn start method) by holding only plain
    settings, the tokenizer and the transform.
    """

    def __init__(self, urls: list[str], *, tokenizer: "Tokenizer", transform: ImageTransform,
                 batch_size: int, context_length: int, shuffle_buffer: int, seed: int,
                 rank: int, world_size: int, resampled: bool, caption: str, epoch: int,
                 drop_last: bool):
        super().__init__()
        self.urls = list(urls)
        self.tokenizer, self.transform = tokenizer, transform
        self.batch_size, self.context_length = batch_size, context_length
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.resampled, self.caption, self.drop_last = resampled, caption, drop_last
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Takes effect at the next iter(loader) (workers are re-created every epoch)."""
        self.epoch = epoch

    def worker_urls(self, worker: int, num_workers: int) -> Iterable[str]:
        """This rank's and worker's shard URLs for the current epoch."""
        if self.resampled:
            # Every reader draws from all shards with its own seed (OpenCLIP's resampled mode):
            # an endless stream, so no split and no shard-count constraint.
            seed = _seed(self.seed, self.epoch, self.rank, worker)
            shards = wds.ResampledShards(self.urls, seed=seed, deterministic=True,
                                         worker_seed=lambda: 0)
            return (s["url"] for s in shards)
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            # Same permutation on every rank (seed and epoch only), so the slices are disjoint.
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(urls)
        return urls[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skips = SkipCounter()
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "samples"))
        # An endless resampled stream over unreadable shards must fail, not spin.
        raw = iter_tar_samples(self.worker_urls(worker, num_workers), skips.shard_error,
                               max_failures_in_a_row=100 if self.resampled else None)
        if self.shuffle_buffer > 1:
            shuffle_rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, "buffer"))
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              rng=shuffle_rng)(raw)
        pending: list[tuple[str, torch.Tensor, str]] = []
        for sample in raw:
            try:
                _, txt, captions, image = _parse(sample)
            except _Skip as skip:
                skips.add(skip.reason)
                continue
            text = rng.choice(captions) if self.caption == "random" else (txt or captions[0])
            pending.append((sample["__key__"], self.transform(image, rng=rng), text))
            if len(pending) == self.batch_size:
                yield self._collate(pending, skips.pop())
                pending = []
        # A partial last batch under drop_last is expected (not a skip): it is not counted.
        if pending and not self.drop_last:
            yield self._collate(pending, skips.pop())
        if skips.counts:
            yield self._collate([], skips.pop())  # stats-only batch: len 0

    def _collate(self, items: list[tuple[str, torch.Tensor, str]],
                 skipped: dict[str, int]) -> Batch:
        if items:
            keys, pixels, texts = zip(*items)
            pixel_values = torch.stack(pixels)
        else:
            keys, texts = (), ()
            size = self.transform.image_size
            pixel_values = torch.zeros(0, 3, size, size)
        input_ids, attention_mask = self.tokenizer(list(texts), self.context_length)
        return Batch(pixel_values, input_ids, attention_mask, list(keys), skipped)


def make_loader(urls: str | Sequence[str], *, tokenizer: "Tokenizer", transform: ImageTransform,
                batch_size: int, context_length: int, num_workers: int = 2,
                shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
                resampled: bool = False, caption: str = "random", epoch: int = 0,
                drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of `Batch`es for one rank and one epoch.

    `urls`: a spec or URL list (see shards.expand_urls). shuffle_buffer > 0 shuffles the shard
    order (per epoch, same on all ranks) and samples within a buffer of that size (per worker);
    0 reads in order. `caption`: "random" (one of the json `captions` per sample, else the txt)
    or "first" (the txt, else the first caption). All randomness derives from
    (seed, epoch, rank, worker): the same arguments give the same batches. Make a new loader
    per epoch (or call `loader.dataset.set_epoch(e)`). Batches of len 0 carry only skip counts.
    """
    if caption not in CAPTION_MODES:
        raise ValueError(f"caption={caption!r}: expected one of {CAPTION_MODES}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    urls = expand_urls(urls)
    if not resampled:
        check_shards_vs_workers(len(urls), world_size, num_workers)
    dataset = ShardDataset(urls, tokenizer=tokenizer, transform=transform, batch_size=batch_size,
                           context_length=context_length, shuffle_buffer=shuffle_buffer,
                           seed=seed, rank=rank, world_size=world_size, resampled=resampled,
                           caption=caption, epoch=epoch, drop_last=drop_last)
    # batch_size=None: batches are built (and tokenized) in the workers.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=pin_memory,
                      worker_init_fn=_one_thread if num_workers else None)


def _one_thread(worker_id: int) -> None:
    """Loader workers decode and tokenize; torch ops there must not start their own thread
    pools, which would fight the training process for the same cores."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- evaluation / text
def iter_eval_samples(urls: str | Sequence[str], transform: ImageTransform,
                      skips: SkipCounter | None = None) -> Iterator[dict]:
    """Every usable sample, in shard order, in this process: `{"key", "pixel_values" (3, H, W),
    "captions" (json captions, else [txt]), "json"}`. Bad samples and shards are skipped and
    counted in `skips` (pass one in to read the counts)."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_tar_samples(expand_urls(urls), skips.shard_error):
        try:
            meta, _, captions, image = _parse(sample)
        except _Skip as skip:
            skips.add(skip.reason)
            continue
        yield {"key": sample["__key__"], "pixel_values": transform(image),
               "captions": captions, "json": meta}


def iter_captions(urls: str | Sequence[str], skips: SkipCounter | None = None) -> Iterator[str]:
    """All captions of all samples (json `captions` when present, else the txt), in shard order;
    images are not decoded. For training a tokenizer."""
    skips = skips if skips is not None else SkipCounter()
    for sample in iter_tar_samples(expand_urls(urls), skips.shard_error):
        try:
            _, captions = _read_captions(sample, _read_json(sample))
        except _Skip as skip:
            skips.add(skip.reason)
            continue
        if not captions:
            skips.add("missing_caption")
            continue
        yield from captions
