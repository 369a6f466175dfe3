"""GradCache (`train.contrastive_accum=K`, vlp/engine/gradcache.py) against one big batch.

The gradients an optimizer step receives (captured at the optimizer's step, after DeepSpeed's
accumulation and averaging over processes, before clipping: train.grad_clip=0) with K
micro-batches of B must equal those of one batch of K x B (fp32, relative 1e-5):
- 1 process, the real DeepSpeed engine (ZeRO-0, 2 and 3), the dual-tower recipe, CLIP and
  SigLIP losses; with train.grad_accum=2 on top;
- 2 gloo processes x K micro-batches of B against 1 process x one batch of 2 x K x B;
- a model with dropout: only a recomputation under the cached RNG states reproduces the
  gradient of the forward passes the loss was computed from;
- through the training loop: `vlp pretrain train.contrastive_accum=2 train.batch_size=8` logs
  the losses and writes the weights of `train.batch_size=16` on the same samples.
"""
import copy
import io
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from launch import free_port, run, train_log
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vlp.cli import main
from vlp.config import ConfigError, PretrainConfig, TrainConfig, derive, load_config
from vlp.data.batch import Batch
from vlp.data.pipeline import iter_captions, make_loader
from vlp.data.shards import expand_urls
from vlp.data.synth import generate
from vlp.data.transforms import ImageTransform
from vlp.engine import dist, gradcache
from vlp.engine.engine import Engine
from vlp.engine.optim import param_groups
from vlp.models import DualTower
from vlp.objectives import clip_loss
from vlp.recipes.dual_tower import DualTowerRecipe
from vlp.tokenizer import load_tokenizer, train_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
B, K, VOCAB = 4, 3, 40


@pytest.fixture(scope="module")
def world():
    return dist.init()


def _cfg(loss: str) -> PretrainConfig:
    cfg = PretrainConfig()
    m = cfg.model
    m.embed_dim, m.vision.image_size, m.vision.patch_size = 16, 16, 8
    m.vision.width = m.text.width = 16
    m.vision.layers = m.text.layers = 1
    m.vision.heads = m.text.heads = 2
    m.text.context_length = 8
    cfg.objectives.loss = loss
    derive(cfg)  # siglip: the logit bias and its init
    return cfg


def _batches(n: int, size: int, seed: int = 7) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lengths = torch.randint(2, 9, (size,), generator=g)
        mask = (torch.arange(8)[None] < lengths[:, None]).long()
        out.append(Batch(keys=[f"{i}-{j}" for j in range(size)],
                         input_ids=torch.randint(1, VOCAB, (size, 8), generator=g) * mask,
                         attention_mask=mask,
                         pixel_values=torch.randn(size, 3, 16, 16, generator=g)))
    return out


def _cat(batches: list[Batch]) -> Batch:
    return Batch(keys=[k for b in batches for k in b.keys],
                 input_ids=torch.cat([b.input_ids for b in batches]),
                 attention_mask=torch.cat([b.attention_mask for b in batches]),
                 pixel_values=torch.cat([b.pixel_values for b in batches]))


@contextmanager
def _optimizer_grads():
    """Every optimizer step's gradients (whatever optimizer DeepSpeed steps: the module's own
    parameters under ZeRO-0, the flat fp32 partitions under ZeRO 1-3), in step order."""
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append([p.grad.detach().clone() for group in optimizer.param_groups
                      for p in group["params"] if p.grad is not None])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def _engine(recipe, world, batch_size, stage=0, grad_accum=1):
    # lr=0: every step's gradients are taken at the same weights (after one AdamW step,
    # entries of a near-zero gradient move by +-lr on float noise, so later steps would not
    # be comparable)
    train = TrainConfig(steps=10, batch_size=batch_size, grad_accum=grad_accum, lr=0.0,
                        min_lr=0.0, warmup_steps=0, grad_clip=0.0, precision="fp32",
                        deepspeed=str(CONFIGS / f"zero{stage}.json"))
    torch.manual_seed(0)
    model = DualTower(recipe.cfg.model, VOCAB)
    return Engine(model, train, world)


def _big_batch_grads(recipe, world, batches, stage=0, grad_accum=1):
    """Plain accumulation: one backward per (big) batch, the loss of each on its own."""
    engine = _engine(recipe, world, len(batches[0]), stage, grad_accum)
    losses = []
    with _optimizer_grads() as steps:
        for batch in batches:
            loss, _ = recipe.loss(engine, batch)
            losses.append(loss.item())
            engine.backward(loss)
            engine.step()
    return losses, steps


def _cached_grads(recipe, world, groups, stage=0, grad_accum=1):
    """GradCache: each group of micro-batches one contrastive batch (DeepSpeed accumulates
    every micro-batch of grad_accum groups, as the loop sets it up)."""
    engine = _engine(recipe, world, len(groups[0][0]), stage, grad_accum * len(groups[0]))
    losses, boundaries = [], []
    with _optimizer_grads() as steps:
        for group in groups:
            cached = gradcache.CachedStep(recipe, engine, group)
            losses.append(cached.loss.item())
            boundaries.append(cached.backward())
    return losses, steps, boundaries, engine


def _assert_same(got_steps, want_steps):
    assert len(got_steps) == len(want_steps) > 0
    for got, want in zip(got_steps, want_steps):
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            # float32 sums in another order: relative 1e-5, entries near zero within 1e-6 of
            # the tensor's largest
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("loss,stage", [("clip", 0), ("clip", 2), ("siglip", 0),
                                        ("siglip", 3)])
def test_one_process_equals_one_big_batch(world, loss, stage):
    recipe = DualTowerRecipe(_cfg(loss), tokenizer=None, world_size=1)
    micro = _batches(2 * K, B)
    groups = [micro[:K], micro[K:]]
    want_losses, want = _big_batch_grads(recipe, world, [_cat(g) for g in groups], stage)
    got_losses, got, boundaries, engine = _cached_grads(recipe, world, groups, stage)
    assert got_losses == pytest.approx(want_losses, rel=1e-6)
    assert boundaries == [True, True] and engine.global_step == 2
    _assert_same(got, want)


def test_with_grad_accum_on_top(world):
    """grad_accum=2 contrastive batches of K micro-batches = 2 accumulated big batches."""
    recipe = DualTowerRecipe(_cfg("clip"), tokenizer=None, world_size=1)
    micro = _batches(2 * K, B)
    groups = [micro[:K], micro[K:]]
    _, want = _big_batch_grads(recipe, world, [_cat(g) for g in groups], grad_accum=2)
    _, got, boundaries, engine = _cached_grads(recipe, world, groups, grad_accum=2)
    assert boundaries == [False, True] and engine.global_step == 1
    _assert_same(got, want)


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = dist.init()
    micro = _batches(2 * K, B)  # every rank makes all 2K, takes its K
    for loss in ("clip", "siglip"):
        recipe = DualTowerRecipe(_cfg(loss), tokenizer=None, world_size=2)
        losses, steps, _, _ = _cached_grads(recipe, world, [micro[rank * K:(rank + 1) * K]])
        out[(loss, rank)] = {"loss": losses[0], "grads": steps}
    import torch.distributed as torch_dist

    torch_dist.destroy_process_group()


def test_two_processes_equal_one_big_batch(world):
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    micro = _batches(2 * K, B)
    for loss in ("clip", "siglip"):
        recipe = DualTowerRecipe(_cfg(loss), tokenizer=None, world_size=1)
        want_losses, want = _big_batch_grads(recipe, world, [_cat(micro)])
        # each rank's loss is its rows' (local-loss form); their mean is the global loss
        mean = (out[(loss, 0)]["loss"] + out[(loss, 1)]["loss"]) / 2
        assert mean == pytest.approx(want_losses[0], rel=1e-6)
        for rank in (0, 1):
            _assert_same(out[(loss, rank)]["grads"], want)


class _DropoutTask:
    """A contrastive task whose forward draws random numbers (dropout, p=0.5)."""

    def __init__(self):
        torch.manual_seed(3)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5),
                                         torch.nn.Linear(8, 5))

    def embed(self, engine, batch):
        img = F.normalize(engine(batch.pixel_values), dim=-1)
        txt = F.normalize(engine(batch.input_ids.float()), dim=-1)
        return (img, txt), (torch.tensor(10.0),)

    def embedding_loss(self, rows, shared):
        return clip_loss(*rows, shared[0])["contrastive_loss"], []


def test_dropout_recomputed_exactly(world):
    task = _DropoutTask()
    g = torch.Generator().manual_seed(5)
    micro = [Batch(keys=[str(i)] * B, pixel_values=torch.randn(B, 6, generator=g),
                   input_ids=torch.randn(B, 6, generator=g)) for i in range(K)]
    # the reference: the same forward passes (same RNG stream) kept with their graphs
    reference = copy.deepcopy(task.model)
    torch.manual_seed(11)
    rows = [task.embed(reference, b)[0] for b in micro]
    loss = task.embedding_loss([torch.cat(r) for r in zip(*rows)], [torch.tensor(10.0)])[0]
    loss.backward()
    want = [[p.grad for group in param_groups(reference, 0.1) for p in group["params"]]]
    after = torch.get_rng_state()

    engine = Engine(task.model, TrainConfig(batch_size=B, grad_accum=K, steps=10, lr=1e-3,
                                            grad_clip=0.0, precision="fp32",
                                            deepspeed=str(CONFIGS / "zero0.json")), world)
    engine.module.train()
    torch.manual_seed(11)
    with _optimizer_grads() as got:
        cached = gradcache.CachedStep(task, engine, micro)
        assert cached.loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert cached.backward()
    _assert_same(got, want)
    assert torch.equal(torch.get_rng_state(), after)  # the stream goes on as after the forwards


def test_config_refusals():
    with pytest.raises(ConfigError, match="train.contrastive_accum=0 must be > 0"):
        load_config(None, ["train.contrastive_accum=0"])
    with pytest.raises(ConfigError, match="recipe=dual_tower only"):
        load_config(None, ["train.contrastive_accum=2", "recipe=single_stream"])
    from vlp.config import FinetuneConfig

    with pytest.raises(ConfigError, match="fine-tuning"):
        load_config(None, ["train.contrastive_accum=2"], cls=FinetuneConfig)


# ------------------------------------------------------------------ through the training loop
TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=200", "eval.at_end=false",
        "train.log_every=1", "train.precision=fp32", "train.threads=1", "train.save_every=0",
        "data.num_workers=1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc_shapes")
    generate(root, images=128, val_images=8, benchmark_images=0, shard_size=32, progress=False)
    train_tokenizer(iter_captions(expand_urls(f"{root}/train")), vocab_size=200) \
        .save(root / "tokenizer.json")
    return root


def _same_run(a: Path, b: Path, steps: int, samples: int):
    la, lb = train_log(a), train_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, steps + 1))
    assert [r["samples_seen"] for r in la] == [samples * (i + 1) for i in range(steps)]
    assert [r["samples_seen"] for r in lb] == [samples * (i + 1) for i in range(steps)]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    # the gradient's size too (AdamW's update alone hardly depends on it)
    assert [r["grad_norm"] for r in la] == pytest.approx([r["grad_norm"] for r in lb], rel=1e-5)
    wa = load_file(a / "model" / "model.safetensors")
    wb = load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:  # the tolerance of tests/test_distributed_train.py (AdamW after 3 steps)
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_pretrain_loop_equals_the_big_batch(shapes, tmp_path, loss, capsys):
    """`vlp pretrain` (one process, ZeRO-2): 2 micro-batches of 8 per step log the losses and
    write the weights of batches of 16 on the same samples (no shuffle buffer: the stream's
    order is the same whatever the batch size)."""
    args = ["--no-progress", *TINY, f"data.train={shapes}/train", "data.shuffle_buffer=0",
            f"tokenizer.path={shapes}/tokenizer.json", "train.steps=3",
            f"objectives.loss={loss}"]
    big, cached = tmp_path / "big", tmp_path / "cached"
    assert main(["pretrain", "--out", str(big), *args, "train.batch_size=16"]) == 0
    assert main(["pretrain", "--out", str(cached), *args, "train.batch_size=8",
                 "train.contrastive_accum=2"]) == 0
    assert "x 2 contrastive accumulation (GradCache)" in capsys.readouterr().out
    _same_run(big, cached, steps=3, samples=16)


def test_two_processes_through_the_loop(shapes, tmp_path):
    """torchrun, 2 processes x 2 micro-batches of 4 per step (ZeRO-2) against one process x
    batches of 16 holding, step by step, the samples both processes read."""
    steps, micro = 3, 4
    data = ["data.shuffle_buffer=0", f"data.train={shapes}/train",
            f"tokenizer.path={shapes}/tokenizer.json"]
    two = tmp_path / "two"
    run("torchrun", 2, ["pretrain", "--out", str(two), "--no-progress", *TINY, *data,
                        f"train.steps={steps}", f"train.batch_size={micro}",
                        "train.contrastive_accum=2"])
    tokenizer = load_tokenizer(shapes / "tokenizer.json")
    per_rank = []
    for rank in range(2):
        loader = make_loader(f"{shapes}/train", tokenizer=tokenizer,
                             transform=ImageTransform(64, train=True), batch_size=micro,
                             context_length=32, num_workers=1, shuffle_buffer=0, seed=0,
                             rank=rank, world_size=2)
        per_rank.append([b.keys for b in loader if len(b)][:2 * steps])
    members: dict = {}
    for shard in sorted((shapes / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members.setdefault(m.name.rsplit(".", 1)[0], []).append(
                    (m, tar.extractfile(m).read()))
    combined = tmp_path / "combined"
    combined.mkdir()
    with tarfile.open(combined / "00000.tar", "w") as tar:
        for step in range(steps):
            for rank in range(2):
                for keys in per_rank[rank][2 * step:2 * step + 2]:
                    for key in keys:
                        for info, payload in members[key]:
                            tar.addfile(info, io.BytesIO(payload))
    one = tmp_path / "one"
    assert main(["pretrain", "--out", str(one), "--no-progress", *TINY,
                 "data.shuffle_buffer=0", f"data.train={combined}",
                 f"tokenizer.path={shapes}/tokenizer.json", f"train.steps={steps}",
                 "train.batch_size=16"]) == 0
    _same_run(one, two, steps=steps, samples=16)
