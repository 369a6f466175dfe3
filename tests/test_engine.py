import os

import pytest
import torch

from vlp.config import TrainConfig
from vlp.engine import checkpoint
from vlp.engine.engine import TorchEngine, param_groups
from vlp.engine.schedule import warmup_cosine


def test_warmup_cosine_by_hand():
    kw = dict(base_lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=14)
    assert [warmup_cosine(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine(9, **kw) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(14, **kw) == pytest.approx(0.0)
    assert warmup_cosine(3, base_lr=1.0, min_lr=0.0, warmup_steps=50, total_steps=4) == 1.0


def _engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    return TorchEngine(model, TrainConfig(steps=20, warmup_steps=2, lr=0.1, precision="fp32"))


def _train(engine, steps, seed=123):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = engine.module(x).square().mean()
        engine.backward(loss)
        engine.step()


def test_param_groups_exclude_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    a = _engine()
    _train(a, 6)
    b = _engine()
    _train(b, 3)
    tmp = checkpoint.begin(tmp_path, "step_3")
    b.save_checkpoint(tmp, {"samples_seen": 24})
    checkpoint.commit(tmp_path, "step_3", keep=2)
    c = _engine(seed=99)  # different init: everything must come from the checkpoint
    client = c.load_checkpoint(checkpoint.resolve(tmp_path))
    assert client == {"samples_seen": 24} and c.global_step == 3
    g = torch.Generator().manual_seed(123)
    for _ in range(3):  # replay the same batches the uninterrupted run saw at steps 3..5
        torch.randn(8, 4, generator=g)
    for _ in range(3):
        x = torch.randn(8, 4, generator=g)
        c.backward(c.module(x).square().mean())
        c.step()
    for p, q in zip(a.module.parameters(), c.module.parameters()):
        torch.testing.assert_close(p, q)
    assert a.lr == c.lr


def test_crash_mid_save_keeps_previous(tmp_path):
    e = _engine()
    for name in ("step_1", "step_2"):
        tmp = checkpoint.begin(tmp_path, name)
        e.save_checkpoint(tmp, {"name": name})
        checkpoint.commit(tmp_path, name, keep=5)
    # a crash while writing step_3: the temporary folder exists, half written
    tmp = checkpoint.begin(tmp_path, "step_3")
    (tmp / "state.pt").write_bytes(b"\x00" * 10)
    assert checkpoint.resolve(tmp_path).name == "step_2"
    assert e.load_checkpoint(checkpoint.resolve(tmp_path)) == {"name": "step_2"}


def test_prune_keeps_newest(tmp_path):
    e = _engine()
    for i in range(1, 5):
        tmp = checkpoint.begin(tmp_path, f"step_{i:08d}")
        e.save_checkpoint(tmp, {})
        checkpoint.commit(tmp_path, f"step_{i:08d}", keep=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    with pytest.raises(FileNotFoundError, match="latest"):
        checkpoint.resolve(tmp_path / "nothing-here")
