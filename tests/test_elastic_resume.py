"""Elastic resume: `--resume latest` on another number of processes or loader workers continues
the epoch; no sample is read twice or lost.

- The data layer alone (vlp/data/elastic.py through ShardSource.resume): readers of one layout
  stop at many points, the rest is re-dealt to another layout (and again to a third); the keys
  before and after are every usable key exactly once, skip counts add up, and with shard sizes
  known every new reader gets the same number of whole batches.
- Real runs (`vlp pretrain` under torchrun/python on gloo): 2 -> 1 processes under ZeRO-2 and
  1 process x 2 workers -> 2 processes x 1 worker under ZeRO-3, stopping mid-epoch (a partly
  read block); the keys the source handed the loop (VLP_DEBUG_KEYS) before and after the
  restart are one epoch exactly. A resume that takes no step re-saves the checkpoint in the new
  layout: its optimizer state (AdamW moments, step) and weights equal the old layout's.
"""
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from launch import ROOT, command, env, train_log
from safetensors.torch import load_file
from test_data import good, tok  # noqa: F401
from test_data_position import uneven  # noqa: F401
# 8 shards x 32 samples (each with its _stats.json) and one tokenizer for every run
from test_distributed_train import shapes  # noqa: F401

from vlp.config import ConfigError
from vlp.data import accumulate
from vlp.data.elastic import deal, piece_size, unread_pieces
from vlp.data.pipeline import make_loader, skipped_samples
from vlp.data.shards import iter_tar_samples
from vlp.data.sources import ShardSource
from vlp.data.transforms import ImageTransform

BATCH, BLOCK = 2, 4


# --------------------------------------------------------------------------- the data layer
def sources(urls, tok, world, workers, **kw):  # noqa: F811
    """One ShardSource per rank of a `world` x `workers` layout (drop_last off: every usable
    sample of an epoch comes out)."""
    def maker(rank):
        def make(epoch, start):
            return make_loader(urls, tokenizer=tok, transform=ImageTransform(32, train=True),
                               batch_size=BATCH, context_length=16, num_workers=workers,
                               shuffle_buffer=BLOCK, seed=0, rank=rank, world_size=world,
                               epoch=epoch, start=start, drop_last=False, **kw)
        return make
    return [ShardSource(maker(r), urls=urls, batch_size=BATCH,
                        resampled=kw.get("resampled", False)) for r in range(world)]


def take(source, limit=None) -> list[str]:
    """Keys of the next `limit` batches (all that are left: None) of the source's epoch."""
    keys, n = [], 0
    while limit is None or n < limit:
        batch = source.next()
        if batch is None:
            break
        keys += batch.keys
        n += 1
    return keys


def roundtrip(x):
    return json.loads(json.dumps(x))


def with_stats(urls, folder: Path) -> list[str]:
    """Copies of the shards with img2dataset-style `_stats.json` (successes = samples)."""
    folder.mkdir(exist_ok=True)
    out = []
    for url in urls:
        dst = folder / Path(url).name
        shutil.copy(url, dst)
        n = sum(1 for _ in iter_tar_samples([url], lambda url, exn: None))  # up to a cut
        (folder / (dst.stem + "_stats.json")).write_text(json.dumps({"successes": n}))
        out.append(str(dst))
    return out


LAYOUTS = [  # (world, workers, batches each rank takes before the stop), ... the last drains
    [(1, 1, 3), (2, 1, None)],
    [(2, 2, 2), (1, 1, None)],
    [(1, 2, 1), (3, 1, None)],
    [(2, 1, 1), (1, 3, None)],
    [(1, 0, 5), (2, 2, None)],  # num_workers=0: the loader reads in the main process
    [(2, 2, 1), (3, 1, 1), (1, 2, None)],  # re-dealt twice within one epoch
    [(1, 1, 0), (2, 1, None)],  # stopped before the first batch
]


@pytest.mark.parametrize("stats", [False, True], ids=["round-robin", "balanced"])
@pytest.mark.parametrize("layouts", LAYOUTS, ids=lambda ls: "->".join(f"{w}x{n}"
                                                                    for w, n, _ in ls))
def test_redealt_epoch_reads_every_key_once(uneven, tok, tmp_path, layouts, stats):  # noqa: F811
    urls, good_keys, counts = uneven
    if stats:
        urls = with_stats(urls, tmp_path / "stats")
    seen, skipped, states = [], {}, None
    for world, workers, limit in layouts:
        ranks = sources(urls, tok, world, workers)
        notes = set()
        for rank, source in enumerate(ranks):
            if states is not None:
                notes.add(source.resume(roundtrip(states), rank, world))
            seen += take(source, limit)
            accumulate(skipped, source.skipped)
        if states is not None:
            assert len(notes) == 1 and "re-dealt" in notes.pop()
        states = [source.state() for source in ranks]
    assert sorted(seen) == sorted(good_keys)  # each usable key once: none twice, none lost
    assert skipped == counts  # and the bad samples and the cut shard counted once each


def test_balanced_deal_gives_equal_whole_batches(uneven, tok, tmp_path):  # noqa: F811
    urls, _, _ = uneven
    urls = with_stats(urls, tmp_path / "stats")
    old = sources(urls, tok, 1, 2)
    taken = take(old[0], 3)
    states = [old[0].state()]
    pieces = unread_pieces(states)
    sizes = {i: json.loads(Path(u[:-4] + "_stats.json").read_text())["successes"]
             for i, u in enumerate(urls)}
    assert sum(sizes.values()) == 14 + 2 + 3 + 2  # the cut shard reads 2 samples
    total = sum(piece_size(p, sizes[p[0]]) for p in pieces)
    # every sample read so far is in a batch or was skipped and counted; the rest is unread
    assert total == sum(sizes.values()) - len(taken) - skipped_samples(old[0].skipped)
    assert any(p and p.get("index") for p in states[0]["positions"])  # inside a block
    plan = deal(pieces, 3, BATCH, sizes)
    dealt = [sum(piece_size(p, sizes[p[0]]) for p in reader) for reader in plan]
    q = total // BATCH
    assert dealt == [BATCH * (q // 3), BATCH * (2 * q // 3 - q // 3),
                     total - BATCH * (2 * q // 3)]
    # a cut piece's halves cover it exactly: dealing to more readers loses no offset
    for readers in (2, 5, 9):
        again = [p for reader in deal(pieces, readers, BATCH, sizes) for p in reader]
        assert sum(piece_size(p, sizes[p[0]]) for p in again) == total


def test_same_layout_still_resumes_exactly(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    whole = take(sources(urls, tok, 1, 2)[0])
    first = sources(urls, tok, 1, 2)[0]
    before = take(first, 2)
    second = sources(urls, tok, 1, 2)[0]
    assert second.resume(roundtrip([first.state()]), 0, 1) is None  # no re-deal
    assert before + take(second) == whole


def test_redeal_refuses_other_data_settings(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    old = sources(urls, tok, 1, 1)[0]
    take(old, 1)
    state = old.state()
    new = sources(urls, tok, 2, 1)
    with pytest.raises(ConfigError, match="written with seed=5 and this run has seed=0"):
        new[0].resume([{**state, "seed": 5}], 0, 2)
    # a checkpoint written before blocks were recorded, stopped inside a block
    inside = dict(state)
    del inside["blocks"]
    assert inside["positions"][0]["index"] > 0
    with pytest.raises(ConfigError, match="does not say which shards that block spans"):
        new[0].resume([inside], 0, 2)


def test_resampled_stream_starts_fresh_draws(uneven, tok):  # noqa: F811
    urls, _, _ = uneven
    old = sources(urls, tok, 2, 1, resampled=True)
    first = [take(s, 2) for s in old]
    new = sources(urls, tok, 1, 1, resampled=True)[0]
    note = new.resume([s.state() for s in old], 0, 1)
    assert "draw afresh" in note and new.epoch == 1
    # not a replay of what old rank 0 read first
    assert take(new, 2) != first[0]


def test_benchmark_data_resumes_on_the_same_number_only():
    """Fine-tuning's map-style data is not re-dealt: another process count is refused."""
    from vlp.data.sources import MapSource

    def collate(items):
        from vlp.data.batch import Batch
        return Batch([str(i) for i in items])

    data = list(range(20))
    old = [MapSource(data, collate, batch_size=2, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for source in old:
        source.next()
    states = roundtrip([source.state() for source in old])
    with pytest.raises(ConfigError, match="written by 2 process.* this launch has 1.*resumes "
                                          "only on the same number of processes"):
        MapSource(data, collate, batch_size=2, seed=0).resume(states, 0, 1)
    again = MapSource(data, collate, batch_size=2, seed=0, rank=1, world_size=2)
    assert again.resume(states, 1, 2) is None
    fresh = MapSource(data, collate, batch_size=2, seed=0, rank=1, world_size=2)
    fresh.next()
    assert again.next().keys == fresh.next().keys  # its own position, exactly


# --------------------------------------------------------------------------- real runs
TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=2",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=2",
        "model.text.heads=2", "tokenizer.vocab_size=200", "eval.at_end=false",
        "train.log_every=1", "train.precision=fp32", "train.threads=1", "train.batch_size=8",
        "data.shuffle_buffer=12", "train.save_every=0"]


def pretrain(launcher, nproc, out, keys, *args, timeout=300):
    proc = subprocess.run(command(launcher, nproc, ["pretrain", "--out", str(out),
                                                    "--no-progress", *args]),
                          cwd=ROOT, env={**env(), "VLP_DEBUG_KEYS": str(keys)},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def keys_by_epoch(prefix: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for f in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            out.setdefault(record["epoch"], []).extend(record["keys"])
    return out


def optimizer_moments(folder: Path) -> dict[str, torch.Tensor]:
    """AdamW's state in a DeepSpeed checkpoint, whatever its number of ZeRO partitions: per
    parameter group, each moment as one flat tensor in parameter order (and the step). ZeRO-1/2:
    each rank holds a contiguous slice of the group's flat buffer, so the ranks' slices joined
    are the buffer (then padding). ZeRO-3: each rank holds ceil(numel / ranks) elements of
    every parameter, in order (the layout deepspeed/utils/zero_to_fp32.py merges)."""
    files = sorted(folder.glob("*optim_states.pt"))  # zero_pp_rank_0_..., _1_... in rank order
    assert files, f"no optimizer states in {folder}"
    states = []
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = sd.get("optimizer_state_dict") or sd["base_optimizer_state"]
        states.append(inner["state"])
    model3 = sorted(folder.glob("zero_pp_rank_*_model_states.pt"))  # ZeRO-3 only
    shapes = torch.load(model3[0], map_location="cpu", weights_only=False)["param_shapes"] \
        if model3 else None
    out = {}
    for group in states[0]:
        for key in states[0][group]:
            parts = [state[group][key].flatten() for state in states]
            if key == "step":
                out[f"{group}/step"] = parts[0]
            elif shapes is None:
                out[f"{group}/{key}"] = torch.cat(parts)
            else:
                params, offset = [], 0
                for shape in shapes[group].values():
                    numel = int(torch.Size(shape).numel())
                    chunk = -(-numel // len(parts))
                    params.append(torch.cat([x[offset:offset + chunk] for x in parts])[:numel])
                    offset += chunk
                out[f"{group}/{key}"] = torch.cat(params)
    return out


def assert_same_optimizer(a: Path, b: Path) -> None:
    sa, sb = optimizer_moments(a), optimizer_moments(b)
    assert sa.keys() == sb.keys() and len(sa) == 6  # 2 groups x (step, exp_avg, exp_avg_sq)
    for key in sa:
        if key.endswith("step"):
            assert float(sa[key]) == float(sb[key]) > 0, key
            continue
        n = min(len(sa[key]), len(sb[key]))  # ZeRO-1/2: the padding at the end differs
        assert n >= 0.99 * max(len(sa[key]), len(sb[key])), key
        torch.testing.assert_close(sa[key][:n], sb[key][:n], rtol=0, atol=0, msg=key)
        assert sa[key][:n].abs().sum() > 0, key  # a real state, not a reset one


def redeal_and_check(shapes, tmp_path, before, after, zero, steps_before):
    """`before` = (launcher, processes, workers) for `steps_before` steps; then `after` to the
    end of the epoch and 2 steps into the next; the keys of epoch 0 are every key once."""
    data = [f"data.train={shapes}/train", f"tokenizer.path={shapes}/tokenizer.json",
            f"train.deepspeed={ROOT}/configs/deepspeed/zero{zero}.json", *TINY]
    out, keys = tmp_path / "run", tmp_path / "keys"
    launcher, nproc, workers = before
    pretrain(launcher, nproc, out, keys, *data, f"data.num_workers={workers}",
             f"train.steps={steps_before}")
    stopped = tmp_path / "stopped"
    shutil.copytree(out, stopped)
    seen = keys_by_epoch(keys)[0]
    assert len(seen) == steps_before * nproc * 8
    # the 256 samples, 8 a batch per process: the epoch ends after (256 - seen) / (8 x n) steps
    launcher, nproc2, workers2 = after
    epoch_steps = (256 - len(seen)) // (8 * nproc2)
    stdout = pretrain(launcher, nproc2, out, keys, *data, f"data.num_workers={workers2}",
                      "--resume", "latest", f"train.steps={steps_before + epoch_steps + 2}")
    resumed = [line for line in stdout.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, stdout[-3000:]
    by_epoch = keys_by_epoch(keys)
    all_keys = sorted(k for f in sorted((shapes / "train").glob("*.tar"))
                      for k in _tar_keys(f))
    assert len(all_keys) == 256
    assert sorted(by_epoch[0]) == all_keys, "epoch 0: a key read twice or lost"
    assert len(by_epoch[1]) == 2 * 8 * nproc2 and len(set(by_epoch[1])) == len(by_epoch[1])
    log = train_log(out)
    assert [r["step"] for r in log] == list(range(1, steps_before + epoch_steps + 3))
    assert log[-1]["samples_seen"] == len(seen) + (epoch_steps + 2) * 8 * nproc2
    assert all(r["loss"] == r["loss"] for r in log)  # finite, trains on
    return stopped, data, resumed[0]


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return sorted({m.name.rsplit(".", 1)[0].split(".")[0] for m in t.getmembers()})


def check_state_carried(stopped, data, steps, launcher, nproc, workers, tmp_path):
    """Resume the stopped run in the new layout without a step: the checkpoint it saves again
    (same step) holds the old layout's optimizer state and weights, re-sharded."""
    copy = tmp_path / "carried"
    shutil.copytree(stopped, copy)
    name = f"step_{steps:08d}"
    shutil.copytree(copy / "checkpoints" / name, tmp_path / "old_layout")
    shutil.copy(copy / "model" / "model.safetensors", tmp_path / "old_model.safetensors")
    pretrain(launcher, nproc, copy, tmp_path / "keys2", *data, f"data.num_workers={workers}",
             "--resume", "latest", f"train.steps={steps}")
    state = json.loads((copy / "checkpoints" / name / "trainer_state.json").read_text())
    assert state["world_size"] == nproc
    assert_same_optimizer(tmp_path / "old_layout", copy / "checkpoints" / name)
    old, new = load_file(tmp_path / "old_model.safetensors"), \
        load_file(copy / "model" / "model.safetensors")
    assert old.keys() == new.keys()
    for key in old:
        assert torch.equal(old[key], new[key]), key


def test_two_processes_to_one(shapes, tmp_path):
    # 5 steps x 8 samples: each rank's reader stops inside its 4th block of 12
    stopped, data, line = redeal_and_check(shapes, tmp_path, ("torchrun", 2, 1),
                                           ("python", 1, 1), zero=2, steps_before=5)
    assert "2 -> 1 processes" in line and "re-dealt from 2 process(es) x 1 reader(s) to 1 x 1" \
        in line, line
    assert "DeepSpeed's universal checkpoint" in line, line
    check_state_carried(stopped, data, 5, "python", 1, 1, tmp_path)


def test_one_process_two_workers_to_two_processes(shapes, tmp_path):
    # 4 steps x 8 samples from 2 workers: each stopped inside its 2nd block of 12
    stopped, data, line = redeal_and_check(shapes, tmp_path, ("python", 1, 2),
                                           ("torchrun", 2, 1), zero=3, steps_before=4)
    assert "1 -> 2 processes" in line and "1 process(es) x 2 reader(s) to 2 x 1" in line, line
    check_state_carried(stopped, data, 4, "torchrun", 2, 1, tmp_path)


def test_worker_count_change_alone(shapes, tmp_path):
    """Same processes, other data.num_workers: the data is re-dealt, the engine loads as
    saved."""
    redealt = redeal_and_check(shapes, tmp_path, ("python", 1, 1), ("python", 1, 3), zero=2,
                               steps_before=3)[2]
    assert "re-dealt from 1 process(es) x 1 reader(s) to 1 x 3" in redealt, redealt
    assert "processes" not in redealt.split("data:")[0], redealt  # no engine re-sharding
