"""The DeepSpeed engine in this process (a one-rank gloo world), against a plain PyTorch
reference written here: AdamW + clip_grad_norm_ + the warmup/cosine schedule."""
import copy
import json
from pathlib import Path

import pytest
import torch

from vlp.config import ConfigError, TrainConfig
from vlp.engine import checkpoint, deepspeed_config, dist
from vlp.engine.engine import Engine
from vlp.engine.optim import param_groups
from vlp.engine.schedule import warmup_cosine

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def world():
    return dist.init()


def test_warmup_cosine_by_hand():
    kw = dict(base_lr=1.0, min_lr=0.0, warmup_steps=4, total_steps=14)
    assert [warmup_cosine(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)
    assert warmup_cosine(9, **kw) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(14, **kw) == pytest.approx(0.0)
    assert warmup_cosine(3, base_lr=1.0, min_lr=0.0, warmup_steps=50, total_steps=4) == 1.0


def test_param_groups_exclude_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


# ------------------------------------------------------------------ DeepSpeed config
def test_builtin_default_is_the_zero2_file():
    assert json.loads((CONFIGS / "zero2.json").read_text()) == deepspeed_config.DEFAULT


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_files_fill_autos(stage):
    train = TrainConfig(batch_size=16, grad_accum=3, grad_clip=0.5, precision="bf16",
                        deepspeed=str(CONFIGS / f"zero{stage}.json"))
    cfg = deepspeed_config.build(train, world_size=2)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 16 * 3 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                     "lower_precision_safe_modules": []}
    assert cfg["fp16"]["enabled"] is False
    assert "\"auto\"" not in json.dumps(cfg)


def test_config_conflicts_are_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match=r"gradient_clipping=2.0 conflicts with train.grad_clip"):
        deepspeed_config.build(TrainConfig(grad_clip=1.0, deepspeed=str(path)), 1)
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' block"):
        deepspeed_config.build(TrainConfig(deepspeed=str(path)), 1)
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="stage=4"):
        deepspeed_config.build(TrainConfig(deepspeed=str(path)), 1)
    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config.build(TrainConfig(deepspeed=str(tmp_path / "nope.json")), 1)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config.build(TrainConfig(deepspeed=str(path)), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        deepspeed_config.build(TrainConfig(precision="fp16"), 1)


# ------------------------------------------------------------------ engine vs reference
TRAIN = dict(steps=6, warmup_steps=2, lr=0.05, min_lr=0.001, weight_decay=0.1, grad_clip=0.3,
             precision="fp32")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16),
                               torch.nn.GELU(), torch.nn.Linear(16, 1))


def _batches(n, size=8, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g), torch.randn(size, 1, generator=g))
            for _ in range(n)]


def _reference(batches, train: TrainConfig):
    """Plain PyTorch: what the engine must compute (fp32, one process)."""
    model = _model()
    opt = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                            betas=(train.beta1, train.beta2), eps=train.eps)
    for step, (x, y) in enumerate(batches):
        lr = warmup_cosine(step, base_lr=train.lr, min_lr=train.min_lr,
                           warmup_steps=train.warmup_steps, total_steps=train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def _run(engine, batches):
    norms = []
    for x, y in batches:  # on the engine's device: the suite runs on a CUDA machine too
        x, y = x.to(engine.device), y.to(engine.device)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        if engine.step():
            norms.append(engine.grad_norm())
    return norms


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_matches_plain_pytorch(world, stage):
    train = TrainConfig(**TRAIN, deepspeed=str(CONFIGS / f"zero{stage}.json"))
    batches = _batches(6)
    engine = Engine(_model(), train, world)
    _run(engine, batches)
    assert engine.global_step == 6
    assert engine.lr == pytest.approx(warmup_cosine(6, base_lr=0.05, min_lr=0.001,
                                                    warmup_steps=2, total_steps=6))
    reference = _reference(batches, train)
    got = _weights(engine, stage)
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _weights(engine, stage):
    if stage < 3:
        return {k: v.float().cpu() for k, v in engine.module.state_dict().items()}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ckpt"
        engine.save(folder)
        return engine.consolidated_state_dict(folder)


def test_grad_accumulation_equals_one_big_batch(world):
    big = _batches(3, size=8)
    halves = [(x[i:i + 4], y[i:i + 4]) for x, y in big for i in (0, 4)]
    a = Engine(_model(), TrainConfig(**TRAIN, batch_size=8), world)
    _run(a, big)
    b = Engine(_model(), TrainConfig(**TRAIN, batch_size=4, grad_accum=2), world)
    norms = _run(b, halves)
    assert b.global_step == 3 and len(norms) == 3
    for (k, p), q in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_grad_norm_is_the_pre_clip_norm(world):
    (x, y), = _batches(1)
    model = _model()
    reference = copy.deepcopy(model)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    expected = torch.norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    engine = Engine(model, TrainConfig(**TRAIN), world)
    norms = _run(engine, [(x, y)])
    assert norms[0] == pytest.approx(float(expected), rel=1e-5)
    assert norms[0] > TRAIN["grad_clip"]  # so the reference comparison above exercises clipping


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("stage", [0, 3])
def test_checkpoint_resume_equals_uninterrupted(world, tmp_path, stage):
    train = TrainConfig(**TRAIN, deepspeed=str(CONFIGS / f"zero{stage}.json"))
    batches = _batches(6)
    a = Engine(_model(), train, world)
    _run(a, batches)
    b = Engine(_model(), train, world)
    _run(b, batches[:3])
    tmp = checkpoint.begin(tmp_path, "step_3")
    b.save(tmp)
    checkpoint.commit(tmp_path, "step_3", keep=2)
    c = Engine(_model(seed=99), train, world)  # other weights: all must come from the checkpoint
    c.load(checkpoint.resolve(tmp_path))
    assert c.global_step == 3 and c.lr == pytest.approx(b.lr)
    _run(c, batches[3:])
    want, got = _weights(a, stage), _weights(c, stage)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


def test_crash_mid_save_keeps_previous(world, tmp_path):
    e = Engine(_model(), TrainConfig(**TRAIN), world)
    for i, name in enumerate(("step_1", "step_2")):
        _run(e, _batches(1, seed=i))
        tmp = checkpoint.begin(tmp_path, name)
        e.save(tmp)
        checkpoint.commit(tmp_path, name, keep=5)
    # a crash while writing step_3: the temporary folder exists, half written
    tmp = checkpoint.begin(tmp_path, "step_3")
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 10)
    assert checkpoint.resolve(tmp_path).name == "step_2"
    fresh = Engine(_model(seed=5), TrainConfig(**TRAIN), world)
    fresh.load(checkpoint.resolve(tmp_path))
    assert fresh.global_step == 2


def test_prune_keeps_newest(tmp_path):
    for i in range(1, 5):
        tmp = checkpoint.begin(tmp_path, f"step_{i:08d}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"x")
        checkpoint.commit(tmp_path, f"step_{i:08d}", keep=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    with pytest.raises(FileNotFoundError, match="latest"):
        checkpoint.resolve(tmp_path / "nothing-here")


def test_zero0_native_bf16_writes_the_fp32_masters(world, tmp_path):
    """Issue 18: ZeRO-0 with DeepSpeed's native bf16 keeps the module in bf16 and the fp32
    masters in its optimizer; the consolidated weights (the model directory's) are the masters,
    not the module's bf16 rounding of them."""
    ds = json.loads((CONFIGS / "zero0.json").read_text())
    ds["bf16"] = {"enabled": True}
    ds["torch_autocast"] = {"enabled": False}
    config = tmp_path / "zero0_bf16.json"
    config.write_text(json.dumps(ds))
    train = TrainConfig(**{**TRAIN, "precision": "bf16", "deepspeed": str(config)})
    engine = Engine(_model(), train, world)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 4, dtype=torch.bfloat16).to(engine.device)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    engine.save(tmp_path / "ckpt" / "step")
    weights = engine.consolidated_state_dict(tmp_path / "ckpt" / "step")
    live = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    assert weights.keys() == live.keys()
    for key, w in weights.items():
        assert w.dtype == torch.float32
        assert torch.equal(w.bfloat16(), live[key])  # the module holds these, rounded
    # trained weights are not all bf16 numbers: 16-bit rounding would have lost that
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())
