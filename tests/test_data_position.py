"""vlp.data.pipeline: exact mid-epoch resume (StreamPosition, make_loader(start=...)), block
shuffle, and per-sample randomness. Shards and the tokenizer come from test_data's helpers."""
import itertools
import json
import tarfile

import pytest
import torch

from test_data import good, keys_of, loader, sample_members, tok, write_tar  # noqa: F401
from vlp.data import StreamPosition, accumulate

BATCH, BLOCK = 2, 4


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """4 shards of 14, 2, 3 and 4 samples: whatever the shard shuffle, one of 2 workers gets the
    big one and runs out last. The big shard has 3 bad samples; the 4-sample shard is cut
    inside sample 2 (2 good samples, 1 shard error). Returns (urls, good keys, skip totals)."""
    root = tmp_path_factory.mktemp("uneven")
    urls, good_keys = [], []
    for s, n in enumerate((14, 2, 3, 4)):
        members = []
        for i in range(n):
            key = f"{s}{i:03d}"
            m = sample_members(key, 10 * s + i, listed=s % 2 == 0)
            if s == 0 and i == 3:  # corrupt image
                m[0] = (m[0][0], m[0][1][: len(m[0][1]) // 2])
            elif s == 0 and i == 7:  # undecodable json
                m[2] = (m[2][0], b"{not json")
            elif s == 0 and i == 10:  # no caption anywhere
                m = [m[0], (m[2][0], json.dumps({"key": key}).encode())]
            elif s < 3 or i < 2:
                good_keys.append(key)
            members += m
        path = write_tar(root / f"{s:05d}.tar", members)
        if s == 3:
            with tarfile.open(path) as t:
                info = t.getmember("3002.jpg")
            path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])
        urls.append(str(path))
    counts = {"corrupt_image": 1, "bad_json": 1, "missing_caption": 1, "shard_error": 1}
    return urls, good_keys, counts


def run(urls, tok, start=None, limit=None, **kw):  # noqa: F811
    """[(batch, tracker state after it)] from a loader started at `start`."""
    dl = loader(urls, tok, start=start, **kw)
    tracker = StreamPosition.for_loader(dl)
    out = []
    for batch in itertools.islice(dl, limit):
        tracker.update(batch)
        out.append((batch, tracker.state_dict()))
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for (a, _), (b, _) in zip(got, want):
        assert a.keys == b.keys and a.skipped == b.skipped
        assert (a.worker, a.position) == (b.worker, b.position)
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask)


def totals(batches) -> dict:
    out = {}
    for b, _ in batches:
        accumulate(out, b.skipped)
    return out


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


# --------------------------------------------------------------------------- the epoch stream
def test_two_ranks_two_workers_see_every_key_once(good, tok):  # noqa: F811
    root, keys, _ = good
    seen = [keys_of(b for b, _ in run(str(root), tok, num_workers=2, rank=r, world_size=2,
                                      batch_size=4)) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(keys)
    assert seen[0] + seen[1] != keys  # shards and samples shuffled


def test_same_sample_same_caption_and_crop_on_any_rank(good, tok):  # noqa: F811
    root, _, _ = good
    alone = {k: (x, ids) for b, _ in run(str(root), tok) for k, x, ids
             in zip(b.keys, b.pixel_values, b.input_ids)}
    rank1 = [(k, x, ids) for b, _ in run(str(root), tok, num_workers=2, rank=1, world_size=2,
                                          shuffle_buffer=3) for k, x, ids
             in zip(b.keys, b.pixel_values, b.input_ids)]
    assert len(rank1) == 20
    for k, x, ids in rank1:
        assert torch.equal(x, alone[k][0]) and torch.equal(ids, alone[k][1])
    # keyed by the sample and the epoch: another epoch crops differently
    other = {k: x for b, _ in run(str(root), tok, epoch=1) for k, x in zip(b.keys, b.pixel_values)}
    assert sum(not torch.equal(x, other[k]) for k, x, _ in rank1) > 10


def test_block_shuffle_in_order_without_buffer(uneven, tok):  # noqa: F811
    urls, good_keys, counts = uneven
    batches = run(urls, tok, shuffle_buffer=0, batch_size=BATCH)
    assert keys_of(b for b, _ in batches) == good_keys and totals(batches) == counts
    # shards in order, each block a permutation of the next BLOCK raw samples
    batches = run(urls, tok, shuffle_buffer=BLOCK, batch_size=BATCH)
    assert sorted(keys_of(b for b, _ in batches)) == sorted(good_keys)
    assert totals(batches) == counts


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("num_workers,drop_last,batch_size", [(0, False, BATCH),
                                                               (2, False, BATCH), (2, True, 5)])
def test_resume_at_every_batch_gives_the_same_stream(uneven, tok,  # noqa: F811
                                                     num_workers, drop_last, batch_size):
    urls, good_keys, counts = uneven
    kw = dict(num_workers=num_workers, shuffle_buffer=BLOCK, batch_size=batch_size,
              drop_last=drop_last)
    full = run(urls, tok, **kw)
    assert totals(full) == counts
    states = [StreamPosition.for_loader(loader(urls, tok, **kw)).state_dict()]
    states += [s for _, s in full]
    if drop_last:  # a worker's last samples dropped: its last skip counts come in a len-0 batch
        assert any(len(b) == 0 for b, _ in full)
    else:
        assert sorted(keys_of(b for b, _ in full)) == sorted(good_keys)
        # the cut points include one inside a block, one at a block boundary, and (2 workers)
        # one after a worker is exhausted while the other goes on
        last = [b.position for b, _ in full]
        assert any(p.get("index", 0) > 0 for p in last)
        assert any(p.get("index") == 0 for p in last)
    if num_workers == 2:
        assert any(sum(p == {"done": True} for p in s["positions"]) == 1 for s in states[:-2])
        assert len({b.worker for b, _ in full}) == 2
    for k, state in enumerate(states):
        rest = run(urls, tok, start=roundtrip(state), **kw)
        assert_same(rest, full[k:])
        assert accumulate(totals(full[:k]), totals(rest)) == counts
    # a real interrupted run: loader A stopped after 4 batches, its workers shut down
    assert run(urls, tok, limit=4, **kw)[-1][1] == states[4]


def test_resume_twice(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    kw = dict(num_workers=2, shuffle_buffer=BLOCK, batch_size=BATCH)
    full = run(urls, tok, **kw)
    first = run(urls, tok, start=full[1][1], limit=3, **kw)
    second = run(urls, tok, start=roundtrip(first[-1][1]), **kw)
    assert_same(first + second, full[2:])
    # a start is for its own epoch: the next epoch of the same loader starts from the beginning
    dl = loader(urls, tok, start=full[1][1], **kw)
    dl.dataset.set_epoch(1)
    assert keys_of(dl) == keys_of(b for b, _ in run(urls, tok, epoch=1, **kw))


def test_resume_resampled(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    kw = dict(num_workers=2, shuffle_buffer=BLOCK, batch_size=BATCH, resampled=True)
    full = run(urls, tok, limit=12, **kw)
    for k in (0, 5, 8):
        assert_same(run(urls, tok, start=roundtrip(full[k - 1][1]) if k else None,
                        limit=12 - k, **kw), full[k:])
    # one shard drawn again and again: each draw crops its samples anew
    crops = {}
    for b, _ in run(urls[1:2], tok, resampled=True, batch_size=4, limit=4):
        for k, x in zip(b.keys, b.pixel_values):
            crops.setdefault(k, []).append(x)
    # (two crops of a 32 px image may coincide; eight do not)
    assert all(len(xs) > 4 and len({x.numpy().tobytes() for x in xs}) > 1
               for xs in crops.values())


def test_state_round_trips_through_json(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    batches = run(urls, tok, num_workers=2, shuffle_buffer=BLOCK, batch_size=BATCH, limit=3)
    state = batches[-1][1]
    assert roundtrip(state) == state
    assert StreamPosition.from_state(roundtrip(state)).state_dict() == state
    assert set(state) == {"epoch", "num_workers", "rank", "world_size", "num_shards",
                          "resampled", "shuffle_buffer", "seed", "next_worker", "positions"}
    assert len(state["positions"]) == 2
    assert all(set(p) == {"block", "shard", "offset", "index"} for p in state["positions"]
               if p is not None and p != {"done": True})


def test_bad_start_names_the_field(good, tok):  # noqa: F811
    root, _, _ = good
    urls = [str(root / f"{s:05d}.tar") for s in range(4)]
    state = run(urls, tok, num_workers=2, rank=0, world_size=2, limit=1)[-1][1]
    kw = dict(num_workers=2, rank=0, world_size=2)
    for change, pattern in [
            (dict(epoch=1), "start.epoch=0, but this loader has epoch=1"),
            (dict(num_workers=1), "start.num_workers=2, but this loader has num_workers=1"),
            (dict(rank=1), "start.rank=0, but this loader has rank=1"),
            (dict(world_size=1), "start.world_size=2, but this loader has world_size=1"),
            (dict(shuffle_buffer=4), "start.shuffle_buffer=16"),
            (dict(seed=1), "start.seed=0, but this loader has seed=1")]:
        with pytest.raises(ValueError, match=pattern):
            loader(urls, tok, start=state, **{**kw, **change})
    with pytest.raises(ValueError, match="start.num_shards=4, but this loader has num_shards=5"):
        loader(urls + urls[:1], tok, start=state, **kw)
    for broken, pattern in [
            ({**state, "positions": state["positions"][:1]}, "start.positions=.*a list of 2"),
            ({**state, "positions": [None, {"shard": 1}]}, r"start.positions\[1\]"),
            ({**state, "next_worker": 2}, "start.next_worker=2 is outside num_workers=2"),
            ({**state, "epoch": -1}, "start.epoch=-1"),
            ({**state, "workers": 2}, "unknown stream position field.*'workers'")]:
        with pytest.raises(ValueError, match=pattern):
            loader(urls, tok, start=broken, **kw)
    loader(urls, tok, start=StreamPosition.from_state(state), **kw)  # a tracker works too
