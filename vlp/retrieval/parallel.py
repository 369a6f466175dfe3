"""Embedding a corpus with several processes: `vlp index build` under torchrun, deepspeed,
mpirun or srun, on one machine or several (vlp.engine.dist reads who is who).

    rank 0: check build.json, write a token into OUT/parts/   -> every rank reads it back
            (OUT must be one folder for all of them: a shared filesystem across machines)
    all:    count the raw samples of a share of the shards (read, not decoded; once: kept
            in parts/counts.json) -> every shard's count
    rank 0: the chunks not done yet (merged into meta.sqlite, or a rank's finished part),
            dealt as contiguous runs, one share per rank
    all:    embed its runs: .npy files and parts/chunk_*.sqlite per chunk (embed.py)
    rank 0: wait for all, merge the parts into meta.sqlite in chunk order; build the index

Why count first: a chunk is a fixed range of raw samples of the whole shard list (chunk c =
raw samples [c * chunk_size, (c + 1) * chunk_size)), and its batches start at its first
sample, so its vectors are the same bytes whoever embeds it (the size and neighbours of a
batch change the last bits of the encoder's output; measured). A rank starting at chunk c
has to know where raw sample c * chunk_size lies, which takes the sizes of the shards before
it. The counts make a multi-process build equal to a one-process one, chunk for chunk, and
let any number of processes resume any folder (also one left by a one-process run, and the
other way round).

The ranks talk over gloo (a few small objects; no GPU collectives) with a long timeout: the
last exchange waits for the slowest rank's embedding.
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist

from vlp.data.shards import expand_urls
from vlp.engine import dist
from vlp.engine.dist import World
from vlp.retrieval.embed import (COMPLETE_FILE, PARTS_DIR, EmbedReport, Start, check_args,
                                 check_settings, connect, count_raw, done_chunks, embed_chunks,
                                 is_complete, merge_parts, part_rows, settings_for,
                                 total_skips, write_atomic, write_part, write_vectors)

# The last exchange waits while the other ranks embed their share (hours on a big corpus).
WAIT = datetime.timedelta(hours=72)
COUNTS_FILE = "counts.json"
TOKEN_FILE = "world.json"
_joined: list[bool] = []  # [True] while this process is in the group join_world made


def join_world() -> World:
    """This process's place among the launched ones: a one-process world without a launcher;
    with one, a gloo process group (joined here unless the caller already has one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        env = dist.world_from_env()
        return World(torch_dist.get_rank(), torch_dist.get_world_size(), env.local_rank,
                     env.local_size, launched=True)
    world = dist.world_from_env()
    if world.size == 1:
        return world
    os.environ.update(dist.launch_env(os.environ))
    torch_dist.init_process_group("gloo", timeout=WAIT)
    _joined.append(True)
    return dataclasses.replace(world, launched=True)


def leave_world() -> None:
    """Close the process group once this rank's collectives are done. A rank that returns
    while rank 0 still builds the index would otherwise tear gloo down during interpreter
    exit, which can abort the process ("terminate called without an active exception")."""
    if _joined and torch_dist.is_initialized():  # only the group join_world made
        torch_dist.destroy_process_group()
        _joined.clear()


def rank_device(device: str | None, world: World) -> str | None:
    """The device this rank embeds on: with several processes and GPUs, "cuda" (or nothing)
    means this rank's own GPU (local rank), as training places its ranks."""
    if world.size > 1 and torch.cuda.is_available() and device in (None, "", "cuda"):
        gpu = dist.cuda_device(world.local_rank, world.local_size, torch.cuda.device_count())
        return f"cuda:{gpu}"
    return device


_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def _from_main(world: World, work: Callable[[], object]):
    """`work()` run on rank 0 and its result (or its error, raised everywhere) on every rank,
    so a bad setting stops all ranks with one message instead of leaving them waiting."""
    result = None
    if world.is_main:
        try:
            result = ("ok", work())
        except (ValueError, FileNotFoundError) as e:
            result = (type(e).__name__, str(e))
    kind, value = dist.all_gather_object(result, world)[0]
    if kind != "ok":
        raise _ERRORS[kind](value)
    return value


# --------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Run:
    """Chunks [first, stop) for one rank; stop None: to the end of the shard list."""

    first: int
    stop: int | None


def chunk_start(chunk: int, chunk_size: int, counts: Sequence[int]) -> Start:
    """Where chunk `chunk` begins, as the one-process run records it when it finishes the
    chunk before: just after that chunk's last raw sample, in that sample's shard (a shard
    error after it then lands in this chunk, as in one uninterrupted run)."""
    if chunk == 0:
        return Start(0, 0, 0, 0)
    prefix = np.concatenate([[0], np.cumsum(counts)]).tolist()
    last = chunk * chunk_size - 1
    shard = bisect.bisect_right(prefix, last) - 1
    if shard >= len(counts):
        raise ValueError(f"chunk {chunk} starts after the last of {prefix[-1]} samples")
    return Start(chunk, 0, shard, last + 1 - prefix[shard])


def deal(todo: Sequence[int], ranks: int, tail: int | None) -> list[list[Run]]:
    """The chunks to embed, split into `ranks` contiguous shares of (nearly) equal size, each
    share as runs of consecutive chunks; the run ending with chunk `tail` (the last chunk,
    when the build is not complete) goes on to the end of the shard list."""
    shares: list[list[Run]] = []
    for part in np.array_split(np.asarray(todo, dtype=np.int64), ranks):
        runs: list[Run] = []
        for c in part.tolist():
            if runs and runs[-1].stop == c:
                runs[-1] = Run(runs[-1].first, c + 1)
            else:
                runs.append(Run(c, c + 1))
        shares.append([Run(r.first, None) if tail is not None and r.stop == tail + 1 else r
                       for r in runs])
    return shares


def plan(out: Path, text: bool, counts: Sequence[int], chunk_size: int, ranks: int
         ) -> list[list[Run]]:
    """Each rank's runs: every chunk neither merged into meta.sqlite nor finished as a part;
    while the build is not complete, the last chunk too (only the run that reads the end of
    the data knows whether a shard error there adds one more, empty chunk)."""
    db = connect(out)
    try:
        merged = len(done_chunks(db, out, text))
        complete = is_complete(db)
    finally:
        db.close()
    marker = out / PARTS_DIR / COMPLETE_FILE
    n = int(sum(counts))
    chunks = max(1, -(-n // chunk_size))
    if not complete and marker.is_file():
        chunks, complete = json.loads(marker.read_text())["chunks"], True
    todo = [c for c in range(merged, chunks) if part_rows(out, c, text) is None]
    tail = None
    if not complete:
        tail = chunks - 1
        if tail not in todo:
            todo.append(tail)
    return deal(todo, ranks, tail)


# --------------------------------------------------------------------------- the run
def _shared_folder(out: Path, world: World, token: str) -> None:
    """Every rank must see the files rank 0 writes (rank 0 reads every rank's chunks)."""
    seen = False
    for _ in range(50):  # a network filesystem may show a new file a moment later
        try:
            seen = json.loads((out / PARTS_DIR / TOKEN_FILE).read_text())["token"] == token
        except (OSError, ValueError, KeyError):
            seen = False
        if seen:
            break
        time.sleep(0.2)
    blind = [r for r, ok in enumerate(dist.all_gather_object(seen, world)) if not ok]
    if blind:
        raise ValueError(f"--out {out}: rank(s) {blind} cannot see the files rank 0 writes "
                         "there; with several machines --out must be one folder on a shared "
                         "filesystem")


def _counts(out: Path, urls: list[str], world: World, known: dict[int, int]) -> list[int]:
    """Raw samples per shard: those not `known` yet counted by the ranks, a contiguous share
    each; rank 0 keeps them all in parts/counts.json for a rerun."""
    missing = [j for j in range(len(urls)) if j not in known]
    if missing:
        share = np.array_split(np.asarray(missing, dtype=np.int64), world.size)[world.rank]
        mine = {int(j): count_raw(urls[j]) for j in share.tolist()}
        known = dict(known)
        for counted in dist.all_gather_object(mine, world):
            known.update(counted)
        if world.is_main:  # build.json holds the shard list these counts belong to
            write_atomic(out / PARTS_DIR / COUNTS_FILE,
                         (json.dumps({"counts": [known[j] for j in range(len(urls))]}) + "\n")
                         .encode())
    return [known[j] for j in range(len(urls))]


def _saved_counts(out: Path, urls: list[str]) -> dict[int, int]:
    path = out / PARTS_DIR / COUNTS_FILE
    counts = json.loads(path.read_text())["counts"] if path.is_file() else []
    return dict(enumerate(counts)) if len(counts) == len(urls) else {}


def embed_distributed(model_dir: str | Path, data: str | Sequence[str], out: str | Path,
                      world: World, *, model, text: bool = False, chunk_size: int = 4096,
                      batch_size: int = 256, dtype: str = "float32", progress: bool = True,
                      max_chunks: int | None = None) -> EmbedReport:
    """This rank's share of embedding `data` into the index folder `out` (module docstring);
    every rank of `world` calls it with the same arguments. Rank 0 returns the whole build's
    report after merging every rank's chunks; the others their own share's.

    `max_chunks`: each rank stops after writing that many chunks (the build is then
    incomplete; a rerun, with any number of processes, goes on)."""
    check_args(chunk_size, batch_size, dtype)
    model_dir, out = Path(model_dir), Path(out)
    urls = expand_urls(data)
    embed_dim = int(model.model.cfg.embed_dim)
    settings = settings_for(model_dir, urls, chunk_size, text, dtype, embed_dim)

    def prepare():
        (out / "emb").mkdir(parents=True, exist_ok=True)
        (out / PARTS_DIR).mkdir(exist_ok=True)
        check_settings(out, settings)
        token = secrets.token_hex(8)
        write_atomic(out / PARTS_DIR / TOKEN_FILE, json.dumps({"token": token}).encode())
        db = connect(out)
        try:  # what a killed merge left; a complete folder needs no counting
            merge_parts(db, out, text)
            complete = is_complete(db)
        finally:
            db.close()
        return token, _saved_counts(out, urls), complete

    token, known, complete = _from_main(world, prepare)
    _shared_folder(out, world, token)
    sizes = dist.all_gather_object(settings["model"]["size"], world)
    if len(set(sizes)) > 1:
        raise ValueError(f"{model_dir}/model.safetensors differs between ranks (sizes "
                         f"{sizes}): every process must embed with the same weights")
    runs: list[Run] = []
    if not complete:
        counts = _counts(out, urls, world, known)
        n = int(sum(counts))
        runs = _from_main(world, lambda: plan(out, text, counts, chunk_size, world.size)
                          )[world.rank]

    rows = 0

    def write(chunk, skipped, raw_end, shard_end, offset_end):
        nonlocal rows
        write_vectors(out, chunk, model, text, dtype, embed_dim)
        write_part(out, chunk, skipped, raw_end, shard_end, offset_end)
        rows += len(chunk.rows)

    written, left = 0, max_chunks
    for run in runs:
        if left is not None and left <= 0:
            break
        last = "end" if run.stop is None else run.stop - 1
        limit = None if run.stop is None else run.stop - run.first
        if left is not None:
            limit = left if limit is None else min(limit, left)
        end = embed_chunks(urls, chunk_start(run.first, chunk_size, counts), write, model,
                           chunk_size=chunk_size, batch_size=batch_size, local_ids=True,
                           max_chunks=limit, progress=progress and world.is_main,
                           total=n if run.stop is None else min(n, run.stop * chunk_size),
                           desc=f"embed chunks {run.first}-{last} (rank {world.rank} of "
                                f"{world.size})")
        written += end.written
        left = None if left is None else left - end.written
        if end.complete:  # this rank read the end of the data: the chunk count is known now
            write_atomic(out / PARTS_DIR / COMPLETE_FILE,
                         json.dumps({"chunks": end.chunk, "raw": end.raw}).encode())
    per_rank = dist.all_gather_object(written, world)  # also: wait for every rank's chunks
    if not world.is_main:  # its own share (rank 0 reports the build)
        return EmbedReport(rows, written, written)
    db = connect(out)
    try:
        merge_parts(db, out, text)
        done = done_chunks(db, out, text)
        rows = done[-1][1] + done[-1][2] if done else 0
        return EmbedReport(rows, len(done), sum(per_rank), total_skips(db), is_complete(db))
    finally:
        db.close()
