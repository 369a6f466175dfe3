"""Resuming from a checkpoint runs no code from it (issue 17): a `.pt` whose pickle calls
`os.system` is refused with one line naming it, by the engine and by `vlp pretrain/finetune
--resume` end to end; real checkpoints of every ZeRO stage still resume exactly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp.cli import main
from vlp.config import TrainConfig
from vlp.engine import checkpoint, dist, safe_load
from vlp.engine.dist import without_launcher_vars
from vlp.engine.engine import Engine, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "deepspeed"


class Payload:
    """What the malicious file holds: unpickling it calls os.system(cmd)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def plant(path: Path, marker: Path | str) -> None:
    """Replace checkpoint file `path` by one whose loading runs `touch marker`."""
    torch.save({"module": Payload(f"touch {marker}")}, path)


@pytest.fixture(scope="module")
def world():
    return dist.init()


def test_the_payload_runs_when_unpickled_and_is_refused_here(tmp_path):
    bad, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "pwned"
    plant(bad, marker)
    with pytest.raises(safe_load.RefusedCheckpointError) as e:
        safe_load.load(bad)
    message = str(e.value)
    assert str(bad) in message and "system" in message and "\n" not in message
    assert not marker.exists()
    # the plant is live: what DeepSpeed did before (weights_only=False) runs it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_deepspeed_own_reads_are_weights_only_inside_the_context(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import \
        TorchCheckpointEngine

    bad, marker = tmp_path / "x.pt", tmp_path / "pwned"
    plant(bad, marker)
    original = torch.load
    with safe_load.weights_only_loads():
        with pytest.raises(safe_load.RefusedCheckpointError, match="x.pt: refused"):
            TorchCheckpointEngine().load(str(bad), map_location="cpu")  # weights_only=False
    assert torch.load is original and not marker.exists()


def test_unreadable_file_is_one_line(tmp_path):
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(safe_load.RefusedCheckpointError, match="cannot read") as e:
        safe_load.check_folder(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ engine, every stage
TRAIN = dict(steps=6, warmup_steps=2, lr=0.05, min_lr=0.001, weight_decay=0.1, grad_clip=0.3)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16),
                               torch.nn.GELU(), torch.nn.Linear(16, 1))


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def _run(engine, batches):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(engine(x.to(engine.input_dtype)).float(), y)
        engine.backward(loss)
        engine.step()


def _weights(engine, folder):
    engine.save(folder)
    return engine.consolidated_state_dict(folder)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_resumes_every_stage_and_refuses_a_planted_file(world, tmp_path, stage,
                                                               precision):
    train = TrainConfig(**TRAIN, precision=precision,
                        deepspeed=str(CONFIGS / f"zero{stage}.json"))
    batches = _batches(4)
    whole = Engine(_model(), train, world)
    _run(whole, batches)
    first = Engine(_model(), train, world)
    _run(first, batches[:2])
    folder = tmp_path / "ckpt" / "step_2"
    first.save(folder)
    saved = sorted(p.name for p in folder.glob("*.pt"))
    assert len(saved) == (1 if stage == 0 else 2), saved  # model states (+ ZeRO optimizer)

    resumed = Engine(_model(seed=99), train, world)  # other weights: all from the checkpoint
    resumed.load(folder)
    assert resumed.global_step == 2
    _run(resumed, batches[2:])
    want = _weights(whole, tmp_path / "a" / "x")
    got = _weights(resumed, tmp_path / "b" / "x")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)

    marker = tmp_path / "pwned"
    for name in saved:  # each of DeepSpeed's files, replaced in turn
        bad = tmp_path / f"bad_{name}"
        bad.mkdir()
        for f in folder.iterdir():
            if f.is_file():
                (bad / f.name).write_bytes(f.read_bytes())
        plant(bad / name, marker)
        fresh = Engine(_model(seed=5), train, world)
        with pytest.raises(safe_load.RefusedCheckpointError, match=f"{name}: refused"):
            fresh.load(bad)
        assert not marker.exists()


# ------------------------------------------------------------------ RNG state
def test_rng_state_reads_back_weights_only_and_restores_draws(tmp_path):
    import random

    import numpy as np

    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(safe_load.load(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_state_is_saved_and_restored(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = torch.rand(4, device="cuda")
    set_rng_state(safe_load.load(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(4, device="cuda"), first)


# ------------------------------------------------------------------ the CLI, end to end
TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=200", "train.batch_size=16",
        "data.shuffle_buffer=64", "eval.at_end=false"]


def _resume_in_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = without_launcher_vars(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vlp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _assert_refused(proc, bad: Path, cwd: Path):
    assert not (cwd / "pwned").exists()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if str(bad) in line]
    assert len(lines) == 1 and "refused to load" in lines[0], proc.stderr[-4000:]


def test_pretrain_resume_refuses_a_planted_model_states_file(ft_world, tmp_path):
    out = tmp_path / "run"
    common = ["--out", str(out), "--no-progress", f"data.train={ft_world}/train", "data.val=",
              "train.save_every=2", *TINY]
    assert main(["pretrain", *common, "train.steps=2"]) == 0
    bad = checkpoint.resolve(out / "checkpoints") / "mp_rank_00_model_states.pt"
    plant(bad, "pwned")  # relative: lands in the resumed run's working directory
    proc = _resume_in_subprocess(["pretrain", *common, "train.steps=4", "--resume", "latest"],
                                 cwd=tmp_path)
    _assert_refused(proc, bad, tmp_path)


def test_finetune_resume_refuses_a_planted_model_states_file(ft_world, pretrained, tmp_path):
    out = tmp_path / "vqa"
    common = ["finetune", "vqa", "--out", str(out), "--no-progress",
              f"init_from={pretrained('dual_tower')}", f"data.synth_dir={ft_world}",
              "train.batch_size=8", "train.save_every=2", "eval.batch_size=32",
              "data.num_workers=0", "eval.split=val"]
    assert main([*common, "train.steps=2"]) == 0
    bad = checkpoint.resolve(out / "checkpoints") / "mp_rank_00_model_states.pt"
    plant(bad, "pwned")
    proc = _resume_in_subprocess([*common, "train.steps=4", "--resume", "latest"], cwd=tmp_path)
    _assert_refused(proc, bad, tmp_path)
