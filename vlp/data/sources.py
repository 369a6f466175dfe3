"""Data sources: one rank's batches for the training loop, epoch after epoch, with a position
that a resumed run restores so it continues exactly where the checkpoint was taken.

    ShardSource  the resumable webdataset stream (pretraining): vlp/data/pipeline.make_loader,
                 its position every loader worker's place in its shards (StreamPosition); on
                 another number of processes or loader workers the epoch's unread samples are
                 re-dealt to the new readers (vlp/data/elastic.py)
    MapSource    a map-style dataset (a benchmark's records, fine-tuning): a seeded permutation
                 per epoch, split across ranks; its position (epoch, batches taken); resumes
                 on the same number of processes only

VLP_DEBUG_KEYS=PREFIX (off by default, for tests and debugging) appends every batch a source
hands the loop to PREFIX.rank<R> as a JSON line {"epoch", "keys"}.

Both skip len-0 batches (all of their samples unusable) after counting what they skipped, and
return None when this rank's epoch is over; the loop then starts a new epoch on every rank
(when one rank runs out, all do: uneven shards must not leave a rank waiting in a
collective).
"""
from __future__ import annotations

import json
import os
import signal
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vlp.config import ConfigError
from vlp.data.batch import Batch
from vlp.data.elastic import ElasticError, deal, piece_size, unread_pieces
from vlp.data.pipeline import StreamPosition, accumulate, format_skips, piece_fields
from vlp.data.shards import count_samples


class DataSource(ABC):
    epoch: int = 0
    skipped: dict[str, int]  # samples this rank skipped so far, by reason
    num_samples: int | None = None  # samples in an epoch of the whole data, when known

    @abstractmethod
    def next(self) -> Batch | None:
        """The next non-empty batch of this rank's epoch, or None when it is over."""

    @abstractmethod
    def new_epoch(self) -> None:
        """Start the next epoch (on every rank at once; the loop sees to that)."""

    @abstractmethod
    def state(self) -> dict:
        """This rank's position as plain JSON, saved with each checkpoint."""

    @abstractmethod
    def restore(self, state: dict) -> None:
        """Continue from a position `state()` returned (a ConfigError when it does not fit
        this data)."""

    def resume(self, states: list[dict], rank: int, world_size: int) -> str | None:
        """Continue from a checkpoint's positions (`states[r]`: rank r's `state()`) as rank
        `rank` of `world_size`. Returns None when this rank continues its own position
        exactly, else a line for the log saying how the data was re-dealt. This default
        resumes only on the number of processes that saved the states."""
        if len(states) != world_size:
            raise ConfigError(
                f"the checkpoint was written by {len(states)} process(es) and this launch has "
                f"{world_size}: {type(self).__name__} data ({self.describe() or 'this data'}) "
                f"resumes only on the same number of processes; relaunch with {len(states)}")
        self.restore(states[rank])
        return None

    def epoch_progress(self, samples_seen: int) -> float:
        """The epoch the run is in, for the log (fractional for an endless stream)."""
        return self.epoch

    def describe(self) -> str:
        return f"{self.num_samples} samples" if self.num_samples else ""

    def _log_keys(self, batch: Batch, rank: int) -> None:
        """VLP_DEBUG_KEYS (module docstring): the batch's keys, appended to this rank's file."""
        prefix = os.environ.get("VLP_DEBUG_KEYS")
        if prefix:
            with open(f"{prefix}.rank{rank}", "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "keys": list(batch.keys)}) + "\n")


class ShardSource(DataSource):
    """A rank's share of webdataset shards (`make_loader_for(epoch, start)` -> a make_loader
    loader), with the position of every loader worker."""

    def __init__(self, make_loader_for: Callable, *, urls: list[str], batch_size: int,
                 num_samples: int | None = None, resampled: bool = False):
        self._make = make_loader_for
        self.urls, self.batch_size = urls, batch_size
        self.num_shards, self.num_samples, self.resampled = len(urls), num_samples, resampled
        self.skipped: dict[str, int] = {}
        self._open(0, None)

    def _open(self, epoch: int, start: dict | None) -> None:
        self.epoch = epoch
        self._whole_epoch = start is None  # a resumed epoch may have no batch left
        try:
            loader = self._make(epoch, start)
        except ValueError as e:  # a saved data position that does not fit this run's data
            if start is None:
                raise
            raise ConfigError(f"cannot continue the checkpoint's data stream: {e}. Resume with "
                              "the data settings the checkpoint was written with.") from None
        self.position = StreamPosition.for_loader(loader)  # continues `start` when resuming
        self.batches_this_epoch = 0
        self._loader, self._it = loader, None  # workers start at the first `next`

    def next(self) -> Batch | None:
        if self._it is None:
            self._it = iter(self._loader)
        for batch in self._it:
            accumulate(self.skipped, batch.skipped)
            self.position.update(batch)
            if len(batch):
                self.batches_this_epoch += 1
                self._log_keys(batch, self.position.settings["rank"] or 0)
                return batch
        if self.resampled:  # an endless stream; only a crash ends it
            raise RuntimeError("the resampled data stream ended unexpectedly")
        return None

    def new_epoch(self) -> None:
        if self.batches_this_epoch == 0 and self._whole_epoch:
            shards = ", ".join(self.urls[:3]) + (", ..." if len(self.urls) > 3 else "")
            size = f"{self.num_samples} samples in all" if self.num_samples else \
                "no sample count (no _stats.json)"
            raise ConfigError(
                f"a whole epoch of the {self.num_shards} training shard(s) ({shards}; {size}) "
                f"gave this process no full batch of train.batch_size={self.batch_size}; "
                f"skipped: {format_skips(self.skipped)}. Check data.train, or lower "
                "train.batch_size below the samples each process reads")
        self._open(self.epoch + 1, None)

    def state(self) -> dict:
        # with the block spans: an elastic resume from this checkpoint needs them
        return self.position.state_dict(blocks=True)

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or "epoch" not in state:
            raise ConfigError(f"the checkpoint's data position {state!r} is not a shard "
                              "stream's: was it written by another kind of run?")
        self._open(state["epoch"], state)

    def resume(self, states: list[dict], rank: int, world_size: int) -> str | None:
        """The same processes and loader workers: this rank's own position, exactly. Another
        number of either: the epoch's unread samples re-dealt to this launch's readers
        (vlp/data/elastic.py); a resampled stream instead starts them on fresh draws."""
        layout = self.position  # the epoch-0 loader's tracker: this launch's settings
        workers = max(1, layout.num_workers)
        if len(states) == world_size and isinstance(states[rank], dict) and \
                states[rank].get("num_workers") == layout.num_workers:
            self.restore(states[rank])
            return None
        try:
            saved = [StreamPosition.from_state(s) for s in states]
        except ValueError as e:
            raise ConfigError(f"the checkpoint's data positions cannot be read: {e}") from None
        for name in ("num_shards", "resampled", "shuffle_buffer", "seed"):
            values = {t.settings[name] for t in saved} - {None}
            if values - {layout.settings[name]}:
                raise ConfigError(
                    f"cannot re-deal the checkpoint's data stream: it was written with "
                    f"{name}={sorted(values, key=str)[0]!r} and this run has "
                    f"{name}={layout.settings[name]!r}. Resume with the data settings the "
                    "checkpoint was written with")
        epochs = sorted({t.epoch for t in saved})
        if len(epochs) != 1:
            raise ConfigError(f"the checkpoint's data positions are of several epochs {epochs}:"
                              " not a checkpoint vlp wrote")
        epoch = epochs[0]
        before = f"{len(saved)} process(es) x {max(1, saved[0].num_workers)} reader(s)"
        after = f"{world_size} x {workers}"
        if self.resampled:  # endless and drawn with replacement: nothing to complete
            self._open(epoch + 1, None)
            return (f"data: resampled stream, {before} -> {after}: the new readers draw "
                    "afresh (nothing to re-deal)")
        try:
            pieces = unread_pieces(states)
        except ElasticError as e:
            raise ConfigError(f"cannot re-deal the checkpoint's data stream: {e}") from None
        sizes = self._shard_sizes(pieces)
        plan = deal(pieces, world_size * workers, self.batch_size, sizes)
        start = {**layout.state_dict(), "epoch": epoch, "next_worker": 0,
                 "positions": [None] * workers,
                 "plan": plan[rank * workers:(rank + 1) * workers]}
        self._open(epoch, start)
        left = f"{sum(piece_size(p, sizes[p[0]]) for p in pieces)} samples in " if sizes else ""
        how = "equal runs of whole batches" if sizes else \
            "whole pieces round-robin (shard sizes unknown: no _stats.json)"
        return (f"data: epoch {epoch}'s unread {left}{len(pieces)} shard piece(s) re-dealt "
                f"from {before} to {after} ({how})")

    def _shard_sizes(self, pieces: list[list]) -> dict[int, int] | None:
        """Samples per shard named in `pieces`, from `_stats.json`; None when any is unknown."""
        sizes = {}
        for shard in sorted({piece_fields(p)[0] for p in pieces}):
            n = count_samples([self.urls[shard]])
            if n is None:
                return None
            sizes[shard] = n
        return sizes

    def epoch_progress(self, samples_seen: int) -> float:
        if self.resampled and self.num_samples:
            return samples_seen / self.num_samples  # epochs counted in samples
        return self.epoch

    def describe(self) -> str:
        n = f", {self.num_samples} samples" if self.num_samples else ""
        return f"{self.num_shards} train shards{n}"


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample indices for `epoch`: a seeded permutation, split round-robin, every
    rank the same length (the last n % world_size samples of the permutation wait an epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return perm[rank::world_size][:per_rank]


def _ignore_signals(_worker_id: int) -> None:
    # the main process saves a checkpoint on SIGTERM/Ctrl-C; its loader workers must not die
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MapSource(DataSource):
    """A rank's share of a map-style dataset whose items `collate` turns into Batches; each
    epoch a permutation seeded by (seed, epoch), so a resumed run re-derives it and continues
    at the next batch."""

    def __init__(self, dataset: Dataset, collate: Callable, *, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.num_samples = len(dataset)
        if self.num_samples // world_size == 0:
            raise ConfigError(f"the training split has {self.num_samples} samples: fewer than "
                              f"the {world_size} processes")
        self.skipped: dict[str, int] = {}
        self._open(0, 0)

    @property
    def batches_per_epoch(self) -> int:
        return -(-(self.num_samples // self.world_size) // self.batch_size)

    def _open(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        if hasattr(self.dataset, "set_epoch"):  # per-item randomness seeded by the epoch
            self.dataset.set_epoch(epoch)
        order = epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size)
        subset = Subset(self.dataset, order[batch_in_epoch * self.batch_size:].tolist())
        self._loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False,
                                  num_workers=self.num_workers, collate_fn=self.collate,
                                  pin_memory=torch.cuda.is_available(),
                                  worker_init_fn=_ignore_signals if self.num_workers else None)
        self._it = None  # workers start at the first `next`

    def next(self) -> Batch | None:
        if self._it is None:
            self._it = iter(self._loader)
        for batch in self._it:
            self.batch_in_epoch += 1
            accumulate(self.skipped, batch.skipped)
            if len(batch):
                return batch
        return None

    def new_epoch(self) -> None:
        self._open(self.epoch + 1, 0)

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "batch_in_epoch"}:
            raise ConfigError(f"the checkpoint's data position {state!r} is not a benchmark "
                              "dataset's: was it written by another kind of run?")
        self._open(state["epoch"], state["batch_in_epoch"])

