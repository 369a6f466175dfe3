"""Frozen towers and layer-wise learning rates (vlp/engine/optim.py): what trains at which lr,
read back from the real DeepSpeed engine's optimizer and checked against the formula worked by
hand; frozen towers out of the optimizer (its state shrinks) and bit-identical after real
`vlp pretrain` and `vlp finetune` runs; the keys' validation."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlp.cli import main
from vlp.config import ConfigError, FusionConfig, ModelConfig, PretrainConfig, TextConfig, \
    TrainConfig, VisionConfig, load_config, to_dict
from vlp.engine import dist
from vlp.engine.engine import Engine
from vlp.engine.optim import build_param_groups
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.models.single_stream import SingleStream
from vlp.models.towers import DualTower
from vlp.objectives import clip_loss

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def world():
    return dist.init()


def _model_cfg(vision_layers=3, text_layers=2) -> ModelConfig:
    return ModelConfig(embed_dim=16,
                       vision=VisionConfig(width=16, layers=vision_layers, heads=2, image_size=16,
                                           patch_size=8),
                       text=TextConfig(width=16, layers=text_layers, heads=2, context_length=8))


def _dual(seed=0, **kw) -> DualTower:
    torch.manual_seed(seed)
    return DualTower(_model_cfg(**kw), vocab_size=50)


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.randint(1, 50, (n, 8), generator=g),
            torch.ones(n, 8, dtype=torch.long))


def _step(engine, seed):
    img, txt, scale = engine(*_batch(seed))
    engine.backward(clip_loss(img, txt, scale)["contrastive_loss"])
    engine.step()


def _optimizer_state_numel(engine) -> int:
    """Elements of AdamW's moments, whatever DeepSpeed wraps around the torch optimizer."""
    opt = engine.ds.optimizer
    base = getattr(opt, "optimizer", opt)
    return sum(t.numel() for state in base.state.values() for k, t in state.items()
               if k in ("exp_avg", "exp_avg_sq"))


# ------------------------------------------------------------------ layer-wise lr
# Worked by hand for a vision tower of 3 blocks and a text tower of 2, layer_decay d = 0.5:
# embeddings d^(L+1), block i (0-based) d^(L-i), what follows the blocks (final norm,
# projection) and the logit scale 1.
HAND = [(r"visual\.(embed|ln_pre)\.", 0.5 ** 4), (r"visual\.transformer\.blocks\.0\.", 0.5 ** 3),
        (r"visual\.transformer\.blocks\.1\.", 0.5 ** 2),
        (r"visual\.transformer\.blocks\.2\.", 0.5 ** 1),
        (r"visual\.(transformer\.ln_f|proj)\.", 1.0),
        (r"text\.embed\.", 0.5 ** 3), (r"text\.transformer\.blocks\.0\.", 0.5 ** 2),
        (r"text\.transformer\.blocks\.1\.", 0.5 ** 1), (r"text\.(transformer\.ln_f|proj)\.", 1.0),
        (r"logit_scale$", 1.0)]


def _hand_scale(name: str, table) -> float:
    hits = [s for pattern, s in table if re.match(pattern, name)]
    assert len(hits) == 1, f"{name} matched {len(hits)} rules"
    return hits[0]


@pytest.mark.parametrize("stage", [0, 2])
def test_layer_decay_lrs_match_the_formula(world, stage):
    """After one optimizer step the schedule is at step 1 of warmup (4 steps, lr 0.1): 0.05.
    Every parameter's group lr is 0.05 x its hand-worked multiplier, and the first step really
    moved each parameter by its own lr (Adam's first update is lr * g / (|g| + eps), |.| = lr
    where the gradient is not tiny, with no weight decay and no clipping)."""
    train = TrainConfig(steps=10, warmup_steps=4, lr=0.1, min_lr=0.0, weight_decay=0.0,
                        grad_clip=0.0, eps=1e-12, precision="fp32", batch_size=4,
                        layer_decay=0.5, deepspeed=str(CONFIGS / f"zero{stage}.json"))
    model = _dual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, train, world)
    _step(engine, 0)
    seen = set()
    for lr, names in engine.param_group_lrs():
        for name in names:
            assert lr == pytest.approx(0.05 * _hand_scale(name, HAND), rel=1e-12), name
            seen.add(name)
    assert seen == {n for n, _ in _dual().named_parameters()}
    assert engine.lr == pytest.approx(0.05)  # the log's lr: the schedule's, unscaled
    after = engine.full_state_dict()
    lr0 = 0.025  # step 0 of warmup: 0.1 * 1/4
    for name in before:
        moved = (after[name] - before[name]).abs().max().item()
        assert moved == pytest.approx(lr0 * _hand_scale(name, HAND), rel=1e-3), name
    engine.release()


def _finetuned(vision_layers=2, text_layers=2) -> FinetunedModel:
    spec = {"architecture": "dual_tower", "model": to_dict(_model_cfg(vision_layers, text_layers)),
            "fusion": to_dict(FusionConfig(width=0, layers=1, heads=2))}
    torch.manual_seed(0)
    encoder = JointEncoder(spec, vocab_size=50)
    return FinetunedModel(encoder, torch.nn.Linear(encoder.width, 3))


def test_head_lr_mult_and_decay_in_a_finetuning_model():
    """A fine-tuning model: the head at lr x head_lr_mult, the towers decayed by their own
    depths, the fresh fusion layers and projections at lr."""
    train = TrainConfig(lr=1.0, layer_decay=0.5, head_lr_mult=10.0)
    model = _finetuned(vision_layers=2, text_layers=1)
    hand = [(r"head\.", 10.0),
            (r"backbone\.core\.towers\.visual\.(embed|ln_pre)\.", 0.5 ** 3),
            (r"backbone\.core\.towers\.visual\.transformer\.blocks\.0\.", 0.5 ** 2),
            (r"backbone\.core\.towers\.visual\.transformer\.blocks\.1\.", 0.5),
            (r"backbone\.core\.towers\.visual\.(transformer\.ln_f|proj)\.", 1.0),
            (r"backbone\.core\.towers\.text\.embed\.", 0.5 ** 2),
            (r"backbone\.core\.towers\.text\.transformer\.blocks\.0\.", 0.5),
            (r"backbone\.core\.towers\.text\.(transformer\.ln_f|proj)\.", 1.0),
            (r"backbone\.core\.towers\.logit_scale$", 1.0),
            (r"backbone\.core\.(segment|fusion|mlm_head|itm_head|text_proj|image_proj)\.", 1.0),
            (r"backbone\.(ground_proj|roi_pool)\.", 1.0)]
    groups = build_param_groups(model, train)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        for name in g["names"]:
            assert g["lr"] == _hand_scale(name, hand), name
        # weight decay exclusions kept: no 1-d tensor, position or class token decays
        for name, p in zip(g["names"], g["params"]):
            excluded = p.ndim < 2 or "pos_embed" in name or "cls_token" in name
            assert g["weight_decay"] == (0.0 if excluded else train.weight_decay), name


def test_swin_blocks_count_across_stages():
    """Swin stages (2, 2): blocks 1..4 across stages, the merging with the block after it."""
    cfg = ModelConfig(embed_dim=8, vision=VisionConfig(arch="swin", width=8, stage_depths=(2, 2),
                                                       stage_heads=(2, 2), window_size=2,
                                                       patch_size=4, image_size=16, pool="mean"),
                      text=TextConfig(width=8, layers=1, heads=2, context_length=8))
    torch.manual_seed(0)
    model = DualTower(cfg, vocab_size=50)
    d = 0.5
    hand = [(r"visual\.swin\.embed\.", d ** 5),
            (r"visual\.swin\.stages\.0\.(blocks|rel_pos)\.0\.", d ** 4),
            (r"visual\.swin\.stages\.0\.(blocks|rel_pos)\.1\.", d ** 3),
            (r"visual\.swin\.(merges\.0|stages\.1\.(blocks|rel_pos)\.0)\.", d ** 2),
            (r"visual\.swin\.stages\.1\.(blocks|rel_pos)\.1\.", d),
            (r"visual\.(swin\.norm|proj)\.", 1.0),
            (r"text\.embed\.", d ** 2), (r"text\.transformer\.blocks\.0\.", d),
            (r"text\.(transformer\.ln_f|proj)\.", 1.0), (r"logit_scale$", 1.0)]
    for g in build_param_groups(model, TrainConfig(lr=1.0, layer_decay=d)):
        for name in g["names"]:
            assert g["lr"] == _hand_scale(name, hand), name
    # lock_image_unlocked_layers=1: only the last block (and the norm, projection) trains
    model = DualTower(cfg, vocab_size=50)
    build_param_groups(model, TrainConfig(lock_image=True, lock_image_unlocked_layers=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and
                 n.startswith("visual.")}
    assert trainable == {n for n, _ in model.named_parameters()
                         if re.match(r"visual\.(swin\.stages\.1\.(blocks|rel_pos)\.1\.|"
                                     r"swin\.norm\.|proj\.)", n)}


def test_plain_groups_are_the_weight_decay_split():
    """No lock, no multiplier: the two groups of before (decay, no decay) at train.lr."""
    from vlp.engine.optim import param_groups

    model = _dual()
    groups = build_param_groups(model, TrainConfig(lr=0.3, weight_decay=0.2))
    plain = param_groups(model, 0.2)
    assert [[id(p) for p in g["params"]] for g in groups] == \
        [[id(p) for p in g["params"]] for g in plain]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.3, 0.2), (0.3, 0.0)]


# ------------------------------------------------------------------ frozen towers
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lock_shrinks_the_optimizer_and_keeps_weights(world, tmp_path, stage):
    """lock_image with its last block unlocked: the optimizer holds moments for the trainable
    weights only (2 x fewer floats per frozen weight), and after two steps the frozen weights
    are bit-identical in the consolidated model directory weights (ZeRO-1 checkpoints leave
    frozen weights out; ZeRO-3 partitions them) and in the live gathered weights."""
    def run(lock: bool):
        train = TrainConfig(steps=4, warmup_steps=1, lr=0.01, precision="fp32", batch_size=4,
                            deepspeed=str(CONFIGS / f"zero{stage}.json"), lock_image=lock,
                            lock_image_unlocked_layers=1 if lock else 0)
        model = _dual()
        engine = Engine(model, train, world)
        for s in range(2):
            _step(engine, s)
        engine.save(tmp_path / f"ckpt{lock}")
        out = (_optimizer_state_numel(engine), engine.trainable_params,
               engine.consolidated_state_dict(tmp_path / f"ckpt{lock}"), engine.full_state_dict())
        engine.release()
        return out

    init = _dual().state_dict()
    frozen = [k for k in init if k.startswith("visual.") and not k.startswith(
        ("visual.transformer.blocks.2.", "visual.transformer.ln_f.", "visual.proj."))]
    frozen_numel = sum(init[k].numel() for k in frozen)
    total = sum(v.numel() for v in init.values())
    n_free, trainable_free, _, _ = run(False)
    n_lock, trainable_lock, saved, live = run(True)
    assert trainable_free == total and trainable_lock == total - frozen_numel
    assert n_free - n_lock == 2 * frozen_numel and n_lock >= 2 * trainable_lock
    assert set(saved) == set(init) and set(live) == set(init)
    for k in frozen:
        assert torch.equal(saved[k], init[k]) and torch.equal(live[k], init[k]), k
    for k in set(init) - set(frozen):  # everything else trained
        assert not torch.equal(saved[k], init[k]), k


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_frozen_weights_exact_under_native_bf16(world, tmp_path, stage):
    """DeepSpeed's native bf16 casts the module, frozen weights included, to bf16 (there is no
    fp32 master of a weight outside the optimizer): the model directory's and the gathered
    weights must still be the original fp32 ones, bit for bit."""
    ds = json.loads((CONFIGS / f"zero{stage}.json").read_text())
    ds.pop("torch_autocast", None)
    ds["bf16"] = {"enabled": True}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    train = TrainConfig(steps=4, warmup_steps=1, lr=0.01, precision="bf16", batch_size=4,
                        deepspeed=str(tmp_path / "ds.json"), lock_image=True)
    init = _dual().state_dict()
    engine = Engine(_dual(), train, world)
    assert engine.input_dtype == torch.bfloat16
    for s in range(2):
        img, txt, scale = engine(*[x.to(torch.bfloat16) if x.is_floating_point() else x
                                   for x in _batch(s)])
        engine.backward(clip_loss(img.float(), txt.float(), scale.float())["contrastive_loss"])
        engine.step()
    engine.save(tmp_path / "ckpt")
    saved, live = engine.consolidated_state_dict(tmp_path / "ckpt"), engine.full_state_dict()
    engine.release()
    frozen = [k for k in init if k.startswith("visual.")]
    assert frozen
    for k in frozen:
        assert torch.equal(saved[k], init[k]) and torch.equal(live[k], init[k]), k
    assert not torch.equal(saved["text.proj.weight"], init["text.proj.weight"])


TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=2",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=2",
        "model.text.heads=2", "tokenizer.vocab_size=200", "train.batch_size=16",
        "data.shuffle_buffer=64", "eval.at_end=false", "data.val="]


def test_pretrain_run_keeps_frozen_blocks(ft_world, tmp_path):
    """A real dual-tower `vlp pretrain` with the image tower locked but its last block, and
    layer decay: the frozen weights leave the run (and a resumed continuation) bit-identical
    to the initial ones (the loop builds the model right after seeding with train.seed), every
    other weight trained; the log's lr is the schedule's."""
    from vlp.engine.schedule import warmup_cosine
    from vlp.tokenizer import load_tokenizer

    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--no-progress", f"data.train={ft_world}/train",
            "train.save_every=2", "train.log_every=1", "train.warmup_steps=2",
            "train.lock_image=true", "train.lock_image_unlocked_layers=1",
            "train.layer_decay=0.7", *TINY]
    assert main([*args, "train.steps=2"]) == 0
    assert main([*args, "train.steps=3", "--resume", "latest"]) == 0
    cfg = load_config(None, [*TINY, "train.lock_image=true"], cls=PretrainConfig)
    torch.manual_seed(cfg.train.seed)
    init = DualTower(cfg.model, load_tokenizer(out / "tokenizer.json").vocab_size).state_dict()
    final = load_file(str(out / "model" / "model.safetensors"))
    assert set(final) == set(init)
    frozen = [k for k in init if k.startswith(("visual.embed.", "visual.transformer.blocks.0."))]
    assert len(frozen) == 4 + 12  # patch proj w/b, cls_token, pos_embed; one block's 12
    for k in init:
        assert torch.equal(final[k], init[k]) == (k in frozen), k
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in log if "lr" in r}
    for step, lr in lrs.items():  # the scheduler's lr after `step` steps
        assert lr == pytest.approx(warmup_cosine(step, base_lr=1e-3, min_lr=1e-5,
                                                 warmup_steps=2, total_steps=3))


def test_finetune_run_keeps_the_frozen_tower(ft_world, pretrained, tmp_path):
    """`vlp finetune vqa` with train.lock_image=true from a dual tower: the fine-tuned model's
    image tower is the pretrained one bit for bit; its text tower trained."""
    out = tmp_path / "vqa"
    src = pretrained("dual_tower")
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress", f"init_from={src}",
                 f"data.synth_dir={ft_world}", "train.steps=3", "train.batch_size=8",
                 "train.save_every=0", "data.num_workers=0", "eval.at_end=false",
                 "train.lock_image=true", "train.head_lr_mult=10",
                 "train.layer_decay=0.8"]) == 0
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    prefix = "backbone.core.towers."
    for k, v in before.items():
        if k.startswith("visual."):
            assert torch.equal(after[prefix + k], v), k
    changed = [k for k in before if k.startswith("text.transformer.")
               and not torch.equal(after[prefix + k], before[k])]
    assert changed


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("overrides,message", [
    (["train.layer_decay=0"], r"train.layer_decay=0.0 is not valid: a number in \(0, 1\]"),
    (["train.layer_decay=1.5"], r"train.layer_decay=1.5 is not valid"),
    (["train.head_lr_mult=0"], r"train.head_lr_mult=0.0 is not valid"),
    (["train.lock_image_unlocked_layers=-1"], r"lock_image_unlocked_layers=-1 must be >= 0"),
    (["train.lock_image_unlocked_layers=1"], r"set train.lock_image=true too"),
    (["train.lock_image=true", "train.lock_image_unlocked_layers=5", "model.vision.layers=4"],
     r"lock_image_unlocked_layers=5 but the image tower has 4 blocks; choose 0..4"),
    (["recipe=single_stream", "train.lock_text=true"], r"recipe=single_stream has no text tower"),
    (["recipe=single_stream", "model.visual_tokens=regions", "train.lock_image=true"],
     r"model.visual_tokens=regions has no image tower"),
    (["train.head_lr_mult=5"], r"pretraining has no task head"),
])
def test_pretrain_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, cls=PretrainConfig)


def test_model_dependent_checks_name_the_key():
    """Fine-tuning's towers come from init_from: checked when the groups are built."""
    with pytest.raises(ConfigError, match=r"lock_image_unlocked_layers=3 but the image tower "
                                          r"\(backbone.core.towers.visual\) has 2 blocks"):
        build_param_groups(_finetuned(vision_layers=2),
                           TrainConfig(lock_image=True, lock_image_unlocked_layers=3))
    cfg = ModelConfig(visual_tokens="regions", fusion=FusionConfig(width=16, layers=1, heads=2))
    stream = SingleStream(cfg, 50, region_feature_dim=8, num_region_labels=0)
    with pytest.raises(ConfigError, match=r"train.lock_image=true: this model has no image "
                                          r"tower to freeze \(its encoder stacks: single_stream\)"):
        build_param_groups(stream, TrainConfig(lock_image=True))
    with pytest.raises(ConfigError, match="head_lr_mult=2.0: this model has no fine-tuning"):
        build_param_groups(_dual(), TrainConfig(head_lr_mult=2.0))


def test_cli_refuses_in_one_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "x"), "train.layer_decay=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.layer_decay=2.0 is not valid" in err
