"""Stochastic depth (model.vision.drop_path_rate; vlp/models/encoder.py `drop_path`): whole
samples' residual branches dropped and the rest rescaled, a block against its formula worked by
hand, timm's linear schedule over a ViT's and a Swin's blocks, nothing at eval, the same drops
replayed under activation checkpointing, the config's refusals, and a fine-tuning run's rate."""
import json

import pytest
import torch
from conftest import FAMILIES

from vlp.cli import main
from vlp.config import ConfigError, FinetuneConfig, ModelConfig, VisionConfig, load_config
from vlp.models.encoder import Block, drop_path
from vlp.models.joint import JointEncoder
from vlp.models.single_stream import SingleStream
from vlp.models.towers import VisionTower
from vlp.recipes.init_from import adopt_start

VIT = dict(width=16, layers=4, heads=2, image_size=32, patch_size=8)
SWIN = dict(arch="swin", width=8, stage_depths=(2, 2, 2), stage_heads=(1, 2, 2), window_size=2,
            patch_size=4, image_size=32, pool="mean")


def test_whole_samples_are_dropped_and_the_rest_rescaled():
    torch.manual_seed(0)
    x = torch.randn(20000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    dropped = (y == 0).flatten(1).all(dim=1)
    kept = torch.isclose(y, x / 0.75).flatten(1).all(dim=1)
    assert bool((dropped ^ kept).all())  # each sample: all of it dropped, or all of it scaled
    # a binomial(20000, 0.25) share: 5 standard deviations (0.0031 each) either side
    assert abs(dropped.float().mean().item() - 0.25) < 5 * (0.25 * 0.75 / 20000) ** 0.5
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x


@pytest.mark.parametrize("norm_first", [True, False])
def test_a_block_drops_its_branches_as_the_formula_says(norm_first):
    torch.manual_seed(1)
    block = Block(16, 2, 4.0, "gelu", 1e-5, norm_first=norm_first).train()
    block.drop_path = 0.5
    x = torch.randn(64, 5, 16)
    torch.manual_seed(7)
    got = block(x)
    torch.manual_seed(7)  # the same two draws, in order: attention's branch, then the MLP's
    m1 = torch.empty(64, 1, 1).bernoulli_(0.5) / 0.5
    m2 = torch.empty(64, 1, 1).bernoulli_(0.5) / 0.5
    with torch.no_grad():
        if norm_first:  # x + attn(ln_1 x), then + mlp(ln_2 .)
            h = x + m1 * block.attn(block.ln_1(x))
            want = h + m2 * block.mlp(block.ln_2(h))
        else:  # BERT's post-LN: ln_1(x + attn x), then ln_2(. + mlp .)
            h = block.ln_1(x + m1 * block.attn(x))
            want = block.ln_2(h + m2 * block.mlp(h))
    torch.testing.assert_close(got, want)
    assert 0 < m1.count_nonzero() < 64  # both outcomes occurred
    block.eval()
    with torch.no_grad():
        plain = block.ln_2 if not norm_first else None
        h = x + block.attn(block.ln_1(x)) if norm_first else block.ln_1(x + block.attn(x))
        want = h + block.mlp(block.ln_2(h)) if norm_first else plain(h + block.mlp(h))
        torch.testing.assert_close(block(x), want)


def test_timm_schedule_over_vit_and_swin_blocks():
    vit = VisionTower(VisionConfig(**VIT, drop_path_rate=0.3), 8)
    assert [b.drop_path for b in vit.blocks()] == pytest.approx(
        torch.linspace(0, 0.3, 4).tolist())
    swin = VisionTower(VisionConfig(**SWIN, drop_path_rate=0.2), 8)
    assert [b.drop_path for b in swin.blocks()] == pytest.approx(
        torch.linspace(0, 0.2, 6).tolist())  # one schedule across the stages (Swin's)
    # a single stream's own image encoder: Swin patches, roi_align's ViT
    for tokens, vision in (("patches", SWIN), ("roi_align", VIT)):
        cfg = ModelConfig(visual_tokens=tokens, vision=VisionConfig(**vision, drop_path_rate=0.1))
        stream = SingleStream(cfg, 50, heads=("mlm",))
        blocks = stream.swin.blocks() if tokens == "patches" else stream.visual_encoder.blocks
        assert blocks[-1].drop_path == pytest.approx(0.1) and blocks[0].drop_path == 0.0


@pytest.mark.parametrize("vision", [VIT, SWIN], ids=["vit", "swin"])
def test_eval_ignores_it_and_checkpointing_replays_the_drops(vision):
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(**vision, drop_path_rate=0.5), 8)
    plain = VisionTower(VisionConfig(**vision), 8)
    plain.load_state_dict(tower.state_dict())  # the rate is no weight
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(pixels), plain.eval()(pixels))
    tower.train()

    def grads(checkpointing: bool) -> dict:
        tower.set_grad_checkpointing(checkpointing)
        tower.zero_grad()
        torch.manual_seed(3)
        tower(pixels).square().sum().backward()
        return {n: p.grad.clone() for n, p in tower.named_parameters()}

    without, with_ = grads(False), grads(True)
    for name in without:  # the recomputed forward drew the same masks
        torch.testing.assert_close(with_[name], without[name], rtol=1e-5, atol=1e-6)
    torch.manual_seed(4)
    assert not torch.allclose(tower(pixels), plain.train()(pixels))  # and it does drop


def test_config_refusals():
    with pytest.raises(ConfigError, match=r"drop_path_rate=1.0 must be in \[0, 1\)"):
        load_config(None, ["model.vision.drop_path_rate=1.0"])
    with pytest.raises(ConfigError, match=r"drop_path_rate=-0.1 must be in \[0, 1\)"):
        load_config(None, ["model.vision.drop_path_rate=-0.1"], cls=FinetuneConfig)
    for tokens in ("regions", "patches"):  # no image encoder of its own (ViT patches)
        with pytest.raises(ConfigError, match=f"visual_tokens={tokens}, arch=vit.*no image "
                           "encoder blocks"):
            load_config(None, ["recipe=single_stream", f"model.visual_tokens={tokens}",
                               "model.vision.drop_path_rate=0.1"])
    for ok in (["model.vision.drop_path_rate=0.1"],
               ["recipe=single_stream", "model.visual_tokens=roi_align",
                "model.vision.drop_path_rate=0.1"]):
        load_config(None, ok)


def test_a_finetuning_run_sets_its_own_rate(ft_world, pretrained, tmp_path):
    src = tmp_path / "pre"  # a dual tower of 3 image blocks, pretrained without drop path
    assert main(["pretrain", "--out", str(src), "--no-progress", f"data.train={ft_world}/train",
                 "data.val=", "eval.at_end=false", "train.steps=1", "train.batch_size=8",
                 "train.save_every=0", "tokenizer.vocab_size=200", *FAMILIES["dual_tower"],
                 "model.vision.layers=3"]) == 0
    src = src / "model"
    encoder, _, _ = JointEncoder.from_pretrained(src, drop_path_rate=0.2)
    assert [b.drop_path for b in encoder.image_blocks()] == pytest.approx([0.0, 0.1, 0.2])
    # continued pretraining (model.init_from) takes the directory's shape, the run's rate
    given = set()
    cfg, _ = adopt_start(load_config(None, [f"model.init_from={src}",
                                            "model.vision.drop_path_rate=0.2"], given=given),
                         given)
    assert cfg.model.vision.drop_path_rate == 0.2 and cfg.model.vision.layers == 3
    with pytest.raises(ConfigError, match="has no image encoder blocks to drop"):
        JointEncoder.from_pretrained(pretrained("regions"), drop_path_rate=0.2)
    out = tmp_path / "ret"
    assert main(["finetune", "retrieval", "--out", str(out), "--no-progress",
                 f"init_from={src}", f"data.synth_dir={ft_world}", "train.steps=2",
                 "train.batch_size=8", "eval.at_end=false", "train.save_every=0",
                 "model.vision.drop_path_rate=0.1"]) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["backbone"]["model"]["vision"]["drop_path_rate"] == 0.1
