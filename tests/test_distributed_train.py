"""Real multi-process runs of `vlp pretrain` on CPU (gloo), through the real launchers:
`deepspeed --num_gpus 2 --module vlp pretrain` and `torchrun --nproc_per_node 2 -m vlp pretrain`.

- 2 processes x batch B (ZeRO-2) give the loss curve of 1 process x batch 2B on the same samples.
- A 2-process run killed with SIGKILL after a checkpoint and resumed matches an uninterrupted
  run: step count, optimizer state, the batches of every step (digests of their keys), losses.
"""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from launch import ROOT, kill_after_checkpoint, run, train_log
from safetensors.torch import load_file

from vlp.data.pipeline import iter_captions, make_loader
from vlp.data.shards import expand_urls
from vlp.data.synth import generate
from vlp.data.transforms import ImageTransform
from vlp.tokenizer import load_tokenizer, train_tokenizer

TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=2",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=2",
        "model.text.heads=2", "tokenizer.vocab_size=200", "eval.at_end=false",
        "train.log_every=1", "train.precision=fp32", "train.threads=1"]


def _run(launcher: str, nproc: int, args: list[str], timeout=300):
    return run(launcher, nproc, ["pretrain", *args], timeout)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=256, val_images=16, benchmark_images=0, shard_size=32, progress=False)
    # One tokenizer for all compared runs (HF's WordPiece trainer is not deterministic).
    train_tokenizer(iter_captions(expand_urls(f"{root}/train")), vocab_size=200) \
        .save(root / "tokenizer.json")
    return root


def _members_by_key(shards: list[Path]) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    out: dict = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key = m.name.rsplit(".", 1)[0] if "." in m.name else m.name
                out.setdefault(key, []).append((m, tar.extractfile(m).read()))
    return out


def test_two_processes_match_one_process_on_the_same_samples(shapes, tmp_path):
    steps, batch = 4, 8
    data = ["data.num_workers=1", "data.shuffle_buffer=16", f"data.train={shapes}/train"]
    two = tmp_path / "two"
    launched = _run("deepspeed", 2, ["--out", str(two), "--no-progress", *TINY, *data,
                          f"train.steps={steps}", f"train.batch_size={batch}",
                          "train.save_every=0",
                          f"train.deepspeed={ROOT}/configs/deepspeed/zero2.json"])
    # only rank 0 prints (the header, the end-of-run lines) and writes the log
    assert launched.stdout.count("vlp pretrain: ") == 1, launched.stdout[-3000:]
    assert launched.stdout.count("trained 4 steps") == 1
    # The samples each rank took at each step, from the same pipeline and settings.
    tokenizer = load_tokenizer(two / "tokenizer.json")
    per_rank = []
    for rank in range(2):
        loader = make_loader(f"{shapes}/train", tokenizer=tokenizer,
                             transform=ImageTransform(64, train=True), batch_size=batch,
                             context_length=32, num_workers=1, shuffle_buffer=16, seed=0,
                             rank=rank, world_size=2)
        batches = [b.keys for b in loader if len(b)]
        per_rank.append(batches[:steps])
    # One shard holding, step by step, rank 0's batch then rank 1's: read in order by one
    # process with batch 2B, its steps see exactly the 2-process global batches.
    members = _members_by_key(sorted((shapes / "train").glob("*.tar")))
    combined = tmp_path / "combined"
    combined.mkdir()
    with tarfile.open(combined / "00000.tar", "w") as tar:
        for step in range(steps):
            for rank in range(2):
                for key in per_rank[rank][step]:
                    for info, payload in members[key]:
                        tar.addfile(info, io.BytesIO(payload))
    one = tmp_path / "one"
    _run("python", 1, ["--out", str(one), "--no-progress", *TINY, "data.num_workers=1",
                       "data.shuffle_buffer=0", f"data.train={combined}",
                       f"tokenizer.path={two / 'tokenizer.json'}", f"train.steps={steps}",
                       f"train.batch_size={2 * batch}", "train.save_every=0"])
    loss_two = [r["loss"] for r in train_log(two)]
    loss_one = [r["loss"] for r in train_log(one)]
    assert len(loss_two) == len(loss_one) == steps
    # fp32 on both sides; the only difference is the order of float sums (gathers, reductions)
    assert loss_two == pytest.approx(loss_one, rel=1e-4), (loss_two, loss_one)
    assert loss_two[-1] < loss_two[0]  # and it trains
    assert [r["samples_seen"] for r in train_log(two)] == [2 * batch * (i + 1)
                                                           for i in range(steps)]
    # The model directories, consolidated from 2 ZeRO-2 partitions and from 1, agree too.
    w_two = load_file(two / "model" / "model.safetensors")
    w_one = load_file(one / "model" / "model.safetensors")
    assert w_two.keys() == w_one.keys()
    for key in w_one:
        torch.testing.assert_close(w_two[key], w_one[key], rtol=1e-4, atol=1e-5, msg=key)


def _optimizer_states(folder: Path) -> dict[str, torch.Tensor]:
    """Adam's state (step, exp_avg, exp_avg_sq) of every rank's ZeRO partition, by a flat
    name. The fp32 master weights are compared through the consolidated model instead: their
    flat partitions end in uninitialised padding."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    files = sorted(folder.glob("*optim_states.pt"))
    assert files, f"no optimizer states in {folder}"
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        walk(f.name, state["optimizer_state_dict"]["state"])
    return flat


def test_sigkill_then_resume_matches_uninterrupted(shapes, tmp_path):
    steps = 10
    args = ["--no-progress", *TINY, f"tokenizer.path={shapes}/tokenizer.json", "data.num_workers=2", "data.shuffle_buffer=32",
            f"data.train={shapes}/train", f"train.steps={steps}", "train.batch_size=8",
            "train.save_every=3", "train.keep_checkpoints=5",
            f"train.deepspeed={ROOT}/configs/deepspeed/zero3.json"]
    whole = tmp_path / "whole"
    _run("torchrun", 2, ["--out", str(whole), *args])

    killed = tmp_path / "killed"
    # SIGKILL to the launcher, both ranks, their loader workers, right after the checkpoint
    kill_after_checkpoint("deepspeed", 2, ["pretrain", "--out", str(killed), *args], killed, 3)
    done = [r["step"] for r in train_log(killed)]
    assert 3 in done and steps not in done  # killed after the checkpoint, before the end

    _run("deepspeed", 2, ["--out", str(killed), "--resume", "latest", *args])
    a, b = train_log(whole), train_log(killed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    # the same batches on every rank at every step, and the same losses
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert b[-1]["samples_seen"] == steps * 2 * 8
    state = json.loads((killed / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json")
                       .read_text())
    assert state["step"] == steps and state["world_size"] == 2
    want = _optimizer_states(whole / "checkpoints" / f"step_{steps:08d}")
    got = _optimizer_states(killed / "checkpoints" / f"step_{steps:08d}")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    # the consolidated model directories agree too
    wa, wb = load_file(whole / "model" / "model.safetensors"), \
        load_file(killed / "model" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7, msg=key)


def test_uneven_shards_end_epochs_together(shapes, tmp_path):
    """3 shards over 2 processes: one process runs out first every epoch. All must start the
    next epoch together instead of one waiting forever in a collective."""
    import shutil

    uneven = tmp_path / "uneven"
    uneven.mkdir()
    for name in ("00000.tar", "00001.tar", "00002.tar"):  # 32 samples each
        shutil.copy(shapes / "train" / name, uneven / name)
    out = tmp_path / "run"
    _run("torchrun", 2, ["--out", str(out), "--no-progress", *TINY, f"data.train={uneven}",
                         f"tokenizer.path={shapes}/tokenizer.json", "data.num_workers=1",
                         "train.batch_size=8", "train.steps=14", "train.save_every=0"],
         timeout=180)
    log = train_log(out)
    assert [r["step"] for r in log] == list(range(1, 15))
    # an epoch is at most 32 samples per process (the process with one shard) = 4 steps
    assert log[-1]["epoch"] >= 3
    assert log[-1]["samples_seen"] == 14 * 2 * 8
