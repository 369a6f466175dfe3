"""Elastic resume of a shard stream: the unread rest of an epoch, from every reader's saved
position, dealt to another set of readers (another number of processes or loader workers).

    every old rank's StreamPosition.state_dict(blocks=True)
      -> unread_pieces: per old reader (rank, worker), in rank then worker order, the pieces
         (vlp/data/pipeline.py's module docstring) it had not consumed: the unconsumed samples
         of a partly read block, the rest of the shard it was in, its shards not yet begun
      -> deal: contiguous runs of that list, one per new reader, (rank', worker') in order;
         with every shard's size known (img2dataset's `_stats.json`) the runs hold equal
         numbers of whole batches (a piece is cut at a sample offset where needed), else
         whole pieces go round-robin
      -> make_loader(start={..., "plan": this rank's readers' pieces}) on each new rank

Every rank computes the same deal from the same checkpoint, so no rank needs another's answer,
and a second elastic resume works from the plans the first one saved like from whole shards.
Which samples a partly read block consumed follows from its spans and its seeded order
(`pipeline.block_order`), so no shard is read to find out. A resampled stream has no epoch to
complete: it needs none of this (`ShardSource` starts the new readers on fresh draws).
"""
from __future__ import annotations

import itertools
from typing import Iterator

from vlp.data.pipeline import StreamPosition, block_order, make_piece, piece_fields, \
    reader_shards


class ElasticError(ValueError):
    """Saved positions that cannot be re-dealt (one line naming what is wrong)."""


def _offsets(start: int, stop: int | None, skip: frozenset) -> Iterator[int]:
    """The offsets a piece reads, from `start` on (stop None: without end)."""
    o = start
    while stop is None or o < stop:
        if o not in skip:
            yield o
        o += 1


def reader_rest(pieces: list[list], position: dict | None, spans: list | None, *, seed: int,
                epoch: int, rank: int, worker: int) -> list[list]:
    """The pieces of `pieces` (a reader's sequence) that the reader had not consumed at
    `position` (its StreamPosition entry; `spans` the block it is inside, if any)."""
    if position is None:
        return [list(p) for p in pieces]
    if position.get("done"):
        return []
    j, o, k = position["shard"], position["offset"], position["index"]
    if j >= len(pieces):
        raise ElasticError(f"position {position} of reader (rank {rank}, worker {worker}) is "
                           f"past its {len(pieces)} shard(s)")
    if k == 0:  # at a block boundary: everything before (j, o) consumed, nothing after
        shard, start, stop, skip = piece_fields(pieces[j])
        head = make_piece(shard, max(start, o), stop, skip)
        return ([head] if head else []) + [list(p) for p in pieces[j + 1:]]
    if not spans:
        raise ElasticError(
            f"reader (rank {rank}, worker {worker}) stopped inside a block ({position}) and the "
            "checkpoint does not say which shards that block spans (it was written before "
            "elastic resume existed): resume it with the number of processes and "
            "data.num_workers it was written with")
    # the block's samples in read order, as (piece ordinal, offset)
    entries = []
    for i, (pj, count) in enumerate(spans):
        shard, start, stop, skip = piece_fields(pieces[pj])
        first = o if i == 0 else start
        entries += [(pj, x) for x in itertools.islice(_offsets(first, stop, skip), count)]
    order = block_order(seed, epoch, rank, worker, position["block"], len(entries))
    consumed = {entries[order[i]] for i in range(k)}
    rest = []
    for i, (pj, _) in enumerate(spans):
        shard, start, stop, skip = piece_fields(pieces[pj])
        mine = [x for p, x in entries if p == pj]
        taken = {x for p, x in consumed if p == pj}
        # the block read an earlier piece to its end; the last one goes on after the block
        end = stop if i == len(spans) - 1 else mine[-1] + 1
        piece = make_piece(shard, mine[0], end, skip | taken)
        if piece:
            rest.append(piece)
    return rest + [list(p) for p in pieces[spans[-1][0] + 1:]]


def unread_pieces(states: list[dict]) -> list[list]:
    """Every unread piece of the epoch at a checkpoint: `states[r]` is rank r's
    StreamPosition.state_dict(blocks=True), all of one epoch-mode stream."""
    out = []
    for r, state in enumerate(states):
        tracker = StreamPosition.from_state(state)
        s = tracker.settings
        rank = r if s["rank"] is None else s["rank"]
        world = len(states) if s["world_size"] is None else s["world_size"]
        for w, position in enumerate(tracker.positions):
            if tracker.plan is not None:
                pieces = tracker.plan[w]
            else:
                pieces = [[i] for i in reader_shards(
                    s["num_shards"], seed=s["seed"], epoch=tracker.epoch,
                    shuffle_buffer=s["shuffle_buffer"], rank=rank, world_size=world, worker=w,
                    num_workers=tracker.num_workers)]
            out += reader_rest(pieces, position, tracker.blocks[w], seed=s["seed"],
                               epoch=tracker.epoch, rank=rank, worker=w)
    return out


def piece_size(piece: list, shard_size: int) -> int:
    """Samples a piece reads from a shard of `shard_size` samples."""
    _, start, stop, skip = piece_fields(piece)
    end = shard_size if stop is None else min(stop, shard_size)
    return max(0, end - start) - sum(start <= x < end for x in skip)


def _cut(piece: list, m: int) -> tuple[list | None, list | None]:
    """`piece` split after its first m samples."""
    shard, start, stop, skip = piece_fields(piece)
    at = start + m  # the offset of its sample m: moved past every skipped offset up to it
    for x in sorted(skip):
        if x <= at:
            at += 1
        else:
            break
    return make_piece(shard, start, at, skip), make_piece(shard, at, stop, skip)


def deal(pieces: list[list], readers: int, batch_size: int,
         shard_sizes: dict[int, int] | None = None) -> list[list[list]]:
    """`pieces` (in order) dealt to `readers` readers. With the size of every shard they name,
    reader i gets a contiguous run of floor(q(i+1)/n) - floor(qi/n) batches of the q whole
    batches there are (the last one the < batch_size samples left over too); else whole pieces
    round-robin."""
    out: list[list[list]] = [[] for _ in range(readers)]
    if shard_sizes is None or any(piece_fields(p)[0] not in shard_sizes for p in pieces):
        for i, piece in enumerate(pieces):
            out[i % readers].append(piece)
        return out
    sizes = [piece_size(p, shard_sizes[piece_fields(p)[0]]) for p in pieces]
    batches = sum(sizes) // batch_size
    ends = [batch_size * (batches * (i + 1) // readers) for i in range(readers)]
    ends[-1] = sum(sizes)
    reader, filled = 0, 0  # samples dealt so far (to readers up to `reader`)
    for piece, size in zip(pieces, sizes):
        # every piece is dealt, even one the sizes call empty: they only balance the deal
        while piece is not None:
            while reader < readers - 1 and filled >= ends[reader]:
                reader += 1
            room = ends[reader] - filled
            if size <= room or reader == readers - 1:
                out[reader].append(piece)
                filled += size
                break
            head, piece = _cut(piece, room)  # room > 0 here
            out[reader].append(head)
            filled += room
            size -= room
    return out
