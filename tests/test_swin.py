"""The Swin vision tower (vlp/models/swin.py): windows against a hand-built masked full
attention, Hugging Face `SwinModel` parity through `vlp convert hf-swin`, precisions, activation
checkpointing, uneven sizes, resolution and window changes, and a DeepSpeed ZeRO-3 step of the
Swin dual tower against plain PyTorch."""
import json

import pytest
import torch
import torch.nn.functional as F

from vlp.cli import main
from vlp.config import ConfigError, ModelConfig, TextConfig, TrainConfig, VisionConfig, \
    load_config
from vlp.models import DualTower
from vlp.models.swin import RelativePositionBias, SwinStage, resample_table
from vlp.models.towers import VisionTower, init_vision_tower, read_vision_tower, \
    save_vision_tower
from vlp.objectives import clip_loss

transformers = pytest.importorskip("transformers")


def _swin_cfg(**kw) -> VisionConfig:
    base = dict(arch="swin", width=16, stage_depths=(2, 2, 2), stage_heads=(2, 2, 4),
                window_size=4, patch_size=4, image_size=64, pool="mean")
    return VisionConfig(**{**base, **kw})


# ------------------------------------------------------------------ windows vs full attention
def _full_attention_mask(grid, window, shift, table, table_window):
    """(nh, L, L) additive mask over the whole (H, W) grid, built from the geometry alone: after
    a cyclic shift by `shift`, i may attend j when both fall in the same window and no wrap
    separates them (their offset in the shifted frame is their true offset); the bias is the
    table's entry for that true offset (dy, dx); -inf elsewhere."""
    H, W = grid
    T = table_window
    L = H * W
    r, c = torch.arange(L) // W, torch.arange(L) % W
    rs, cs = (r - shift) % H, (c - shift) % W  # position in the shifted frame
    same_window = ((rs[:, None] // window) == (rs[None, :] // window)) & \
                  ((cs[:, None] // window) == (cs[None, :] // window))
    dy, dx = r[:, None] - r[None, :], c[:, None] - c[None, :]
    no_wrap = (rs[:, None] - rs[None, :] == dy) & (cs[:, None] - cs[None, :] == dx)
    allowed = same_window & no_wrap
    index = ((dy + T - 1) * (2 * T - 1) + (dx + T - 1)).clamp(0, table.shape[0] - 1)
    bias = table[index].permute(2, 0, 1)  # (nh, L, L)
    return bias.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((8, 12), 4), ((6, 9), 3), ((3, 3), 4)])
def test_window_attention_equals_masked_full_attention(grid, window):
    """A stage's plain and shifted blocks = the same blocks on the whole grid with a
    hand-built mask (grids that divide by the window; padding is checked against HF below).
    (3, 3) with window 4: one 3x3 window, no shift, the table's centre."""
    torch.manual_seed(0)
    stage = SwinStage(width=16, depth=2, heads=2, window=window, mlp_ratio=2.0, act="gelu",
                      norm_eps=1e-5).double().eval()
    with torch.no_grad():
        for p in stage.parameters():
            p.normal_(0, 0.5)
    H, W = grid
    x = torch.randn(2, H * W, 16, dtype=torch.float64)
    with torch.no_grad():
        got = stage(x, grid)
        ref = x
        for i, (block, rel_pos) in enumerate(zip(stage.blocks, stage.rel_pos)):
            small = min(grid) <= window
            w, s = (min(grid), 0) if small else (window, window // 2 if i % 2 else 0)
            mask = _full_attention_mask(grid, w, s, rel_pos.rel_pos_embed, window)
            ref = block(ref, mask)  # full attention over all H*W tokens, no windows
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    # and the shifted block really differs from an unshifted one (the mask matters)
    if min(grid) > window:
        plain = stage.blocks[1](stage.blocks[0](
            x, _full_attention_mask(grid, window, 0, stage.rel_pos[0].rel_pos_embed, window)),
            _full_attention_mask(grid, window, 0, stage.rel_pos[1].rel_pos_embed, window))
        assert (plain - got).abs().max() > 1e-3


# ------------------------------------------------------------------ Hugging Face parity
def _random_hf(cls, **cfg):
    """A random HF Swin whose every parameter (tables and norms included) is non-trivial."""
    torch.manual_seed(0)
    model = cls(transformers.SwinConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


SHAPES = {
    # window 4 at image 64: grids 16, 8, 4 (shifted windows in stages 0-1, one window in 2)
    "w4_img64": dict(cls="SwinModel", image_size=64, patch_size=4, embed_dim=16,
                     depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4,
                     sizes=[(64, 64), (80, 80)]),
    # window 7 at image 98: 98 px pad to 100, grids 25 (pad to 28, shift 3), 13 (odd grid
    # merged with padding; pad to 14), 7 (one window); classification head dropped
    "w7_img98": dict(cls="SwinForImageClassification", image_size=98, patch_size=4,
                     embed_dim=24, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=7,
                     num_labels=5, hidden_act="gelu", sizes=[(98, 98), (98, 112)]),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("names", ["saved", "in_memory"])
def test_hf_swin_parity(shape, names, tmp_path, capsys):
    """`vlp convert hf-swin` + init_vision_tower reproduce SwinModel's last_hidden_state and
    pooler_output (1e-4, fp32) on the same pixels, at the config's size and another one.
    names: the folder save_pretrained writes (4.x names), or 5.x's in-memory names."""
    from safetensors.torch import save_file

    spec = dict(SHAPES[shape])
    cls = getattr(transformers, spec.pop("cls"))
    sizes = spec.pop("sizes")
    hf = _random_hf(cls, **spec)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if names == "in_memory":
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
                  str(src / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "hf-swin", str(src), str(tmp_path / "tower")]) == 0
    assert "wrote" in capsys.readouterr().out
    vision, state, config = read_vision_tower(tmp_path / "tower")
    assert config["architecture"] == "vision_tower" and vision.arch == "swin"
    assert vision.window_size == spec["window_size"] and "proj.weight" not in state
    tower = VisionTower(vision, embed_dim=8)
    init_vision_tower(tower, tmp_path / "tower")
    tower.eval()
    g = torch.Generator().manual_seed(1)
    for H, W in sizes:
        # a fresh HF model per size: SwinLayer clamps its own shift_size to 0 for good once it
        # sees a grid <= the window (set_shift_and_window_size), so reuse would change it
        ref_model = cls.from_pretrained(src).eval()
        ref_model = ref_model.swin if hasattr(ref_model, "swin") else ref_model
        pixels = torch.randn(2, 3, H, W, generator=g)
        with torch.no_grad():
            ref = ref_model(pixels)
            tokens = tower.forward_features(pixels)
        assert tokens.shape == ref.last_hidden_state.shape
        torch.testing.assert_close(tokens, ref.last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(tokens.mean(dim=1), ref.pooler_output, rtol=0, atol=1e-4)


def test_stage_feature_maps_match_hf(tmp_path):
    """forward_stages: every stage's map (before merging) equals HF's encoder states with
    output_hidden_states_before_downsampling, with grids and strides for an uneven image."""
    spec = dict(SHAPES["w7_img98"])
    spec.pop("sizes")
    hf = _random_hf(getattr(transformers, spec.pop("cls")), **spec)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-swin", str(tmp_path / "hf"), str(tmp_path / "tower")]) == 0
    vision, _, _ = read_vision_tower(tmp_path / "tower")
    tower = VisionTower(vision, embed_dim=8)
    init_vision_tower(tower, tmp_path / "tower")
    pixels = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        feats = tower.eval().forward_stages(pixels)
        emb, dims = hf.swin.embeddings(pixels)
        ref = hf.swin.encoder(emb, dims, output_hidden_states=True,
                              output_hidden_states_before_downsampling=True)
    assert feats.stage_grids == [(25, 25), (13, 13), (7, 7)] and feats.grid == (7, 7)
    assert feats.strides == [4, 8, 16]
    for s in range(3):
        torch.testing.assert_close(feats.feature_map(s), ref.reshaped_hidden_states[s + 1],
                                   rtol=0, atol=1e-4)
    assert feats.positions().tolist()[:3] == [[0, 0], [0, 1], [0, 2]]
    assert feats.positions().shape == (49, 2) and feats.positions()[-1].tolist() == [6, 6]


def test_convert_refuses_what_it_cannot_load(tmp_path, capsys):
    hf = _random_hf(transformers.SwinModel, image_size=32, patch_size=4, embed_dim=8,
                    depths=[2], num_heads=[2], window_size=4, use_absolute_embeddings=True)
    hf.save_pretrained(tmp_path / "abs")
    capsys.readouterr()  # transformers' progress bar
    assert main(["convert", "hf-swin", str(tmp_path / "abs"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "use_absolute_embeddings=true" in err and len(err.strip().splitlines()) == 1
    cfg = json.loads((tmp_path / "abs" / "config.json").read_text())
    (tmp_path / "abs" / "config.json").write_text(json.dumps({**cfg, "model_type": "swinv2"}))
    assert main(["convert", "hf-swin", str(tmp_path / "abs"), str(tmp_path / "o")]) == 2
    assert "model_type='swinv2'" in capsys.readouterr().err


# ------------------------------------------------------------------ precisions, checkpointing
def _dual(vision: VisionConfig) -> DualTower:
    text = TextConfig(width=16, layers=1, heads=2, context_length=8)
    return DualTower(ModelConfig(embed_dim=16, vision=vision, text=text), vocab_size=50)


def _batch(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    return torch.randn(n, 3, size, size, generator=g), ids, torch.ones(n, 8, dtype=torch.long)


# image 52 (not a multiple of the patch 8... nor of any window): 52 px pad to 56, grid 7 (pad to
# 9 for window 3), merged with padding to 4 (pad to 6), then 2 (one 2x2 window, no shift)
UNEVEN = dict(image_size=52, patch_size=8, window_size=3, stage_depths=(2, 2, 2),
              stage_heads=(1, 2, 2), width=8)


def _loss_and_grads(model, batch, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        img, txt, scale = model(*batch)
        loss = clip_loss(img.float(), txt.float(), scale.float())["contrastive_loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fp32_bf16_and_checkpointing_on_uneven_sizes():
    torch.manual_seed(0)
    model = _dual(_swin_cfg(**UNEVEN))
    batch = _batch(6, 52)
    loss, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss)
    tables = [n for n in grads if n.endswith("rel_pos_embed")]
    assert len(tables) == 6
    for name, g in grads.items():  # every parameter, every table included, gets a gradient
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # activation checkpointing recomputes the blocks: the same loss and gradients
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)
    model.set_grad_checkpointing(False)
    # bf16 autocast: finite, and the features close to fp32's
    loss_bf16, grads_bf16 = _loss_and_grads(model, batch, autocast=True)
    assert torch.isfinite(loss_bf16) and abs(float(loss_bf16 - loss)) < 0.05
    assert all(torch.isfinite(g).all() for g in grads_bf16.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f16 = model.encode_image(batch[0]).float()
    with torch.no_grad():
        f32 = model.encode_image(batch[0])
    assert F.cosine_similarity(f16, f32).min() > 0.99
    # bf16 weights (DeepSpeed's native bf16): the windows' float masks follow the dtype
    model16 = _dual(_swin_cfg(**UNEVEN)).to(torch.bfloat16)
    img = model16.encode_image(batch[0].to(torch.bfloat16))
    img.float().sum().backward()
    assert torch.isfinite(img).all()


def test_training_and_inference_attention_paths_agree():
    """With gradients the learned bias goes through attention_math (written out); without,
    through SDPA (HF parity above): the same tokens."""
    torch.manual_seed(0)
    tower = VisionTower(_swin_cfg(**UNEVEN), 8)
    x = torch.randn(2, 3, 52, 52)
    with torch.no_grad():
        sdpa = tower.forward_features(x)
    math_path = tower.forward_features(x)
    assert math_path.requires_grad
    torch.testing.assert_close(math_path.detach(), sdpa, rtol=0, atol=1e-5)


def test_any_resolution_runs_and_small_windows_read_the_table_centre():
    torch.manual_seed(0)
    tower = VisionTower(_swin_cfg(), 8).eval()
    with torch.no_grad():
        for size in (64, 96, 40, 20):  # 20: grids 5, 3, 2, smaller than the window 4
            assert torch.isfinite(tower(torch.randn(1, 3, size, size))).all()
    # a 3x3 window under a window-4 table = a window-3 table cut from its centre
    big = RelativePositionBias(4, heads=2)
    small = RelativePositionBias(3, heads=2)
    with torch.no_grad():
        small.rel_pos_embed.copy_(big.rel_pos_embed.view(7, 7, 2)[1:6, 1:6].reshape(25, 2))
    torch.testing.assert_close(big(3), small(3), rtol=0, atol=0)


# ------------------------------------------------------------------ window size changes
def test_table_resampling_is_swin_v1s(tmp_path):
    """A tower trained with window 4 initialises one with window 6: tables resampled as Swin
    V1's load_pretrained does (utils.py), everything else copied."""
    torch.manual_seed(0)
    table = torch.randn(49, 3)
    # Swin V1 (microsoft/Swin-Transformer utils.py, load_pretrained), verbatim up to names
    L1, nH1 = table.size()
    S1, S2 = int(L1 ** 0.5), 2 * 6 - 1
    swin_v1 = F.interpolate(table.permute(1, 0).view(1, nH1, S1, S1), size=(S2, S2),
                            mode="bicubic").view(nH1, S2 * S2).permute(1, 0)
    torch.testing.assert_close(resample_table(table, 6), swin_v1, rtol=0, atol=1e-6)
    assert resample_table(table, 4) is table
    smooth = torch.ones(49, 3) * torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(resample_table(smooth, 6), torch.ones(121, 3) * smooth[0])

    src = VisionTower(_swin_cfg(), 8)
    save_vision_tower(src, tmp_path / "w4", {"image_size": 64})
    dst = VisionTower(_swin_cfg(window_size=6, image_size=96), 8)
    init_vision_tower(dst, tmp_path / "w4")
    a, b = src.state_dict(), dst.state_dict()
    for key in a:
        if key.endswith("rel_pos_embed"):
            assert b[key].shape == (121, a[key].shape[1])
            torch.testing.assert_close(b[key], resample_table(a[key], 6))
        elif key != "proj.weight":
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert torch.isfinite(dst(torch.randn(1, 3, 96, 96))).all()
    with pytest.raises(ValueError, match=r"vision.width=16 but model.vision.width=32"):
        init_vision_tower(VisionTower(_swin_cfg(width=32), 8), tmp_path / "w4")


# ------------------------------------------------------------------ config
def test_config_validation(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  vision: {arch: swin, pool: mean, width: 24, "
                    "stage_depths: [2, 2], stage_heads: [3, 6], window_size: 5}\n")
    cfg = load_config(path)
    assert list(cfg.model.vision.stage_depths) == [2, 2] and cfg.model.vision.window_size == 5
    with pytest.raises(ConfigError, match="set model.vision.pool=mean"):
        load_config(path, ["model.vision.pool=cls"])
    path.write_text(path.read_text().replace("[3, 6]", "[3, 5]"))
    with pytest.raises(ConfigError, match=r"stage_heads\[1\]=5 must divide stage 1's width 48"):
        load_config(path)


def test_config_validation_lists(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  vision: {arch: swin, pool: mean, stage_depths: [2, 2]}\n")
    with pytest.raises(ConfigError, match="need one entry per stage"):
        load_config(path)
    # lists on the command line: key=[a,b], each element checked
    swin = ["model.vision.arch=swin", "model.vision.pool=mean"]
    cfg = load_config(None, [*swin, "model.vision.stage_depths=[2, 2]",
                             "model.vision.stage_heads=[4,8]"])
    assert (cfg.model.vision.stage_depths, cfg.model.vision.stage_heads) == ((2, 2), (4, 8))
    with pytest.raises(ConfigError, match="need one entry per stage"):
        load_config(None, [*swin, "model.vision.stage_depths=[2,2]"])
    with pytest.raises(ConfigError, match=r"stage_depths\[1\]='x' has the wrong type; expected "
                       "int"):
        load_config(None, [*swin, "model.vision.stage_depths=[2,x]"])
    with pytest.raises(ConfigError, match=r"stage_depths=2 must be a list of ints, e.g."):
        load_config(None, [*swin, "model.vision.stage_depths=2"])
    with pytest.raises(ConfigError, match=r"stage_depths=\[2, 0\] must be a list of positive"):
        load_config(None, [*swin, "model.vision.stage_depths=[2,0]",
                           "model.vision.stage_heads=[4,8]"])
    # every recipe takes a Swin tower (issue 13 part 2; tests/test_swin_families.py)
    for recipe in ("single_stream", "combined"):
        load_config(None, ["model.vision.arch=swin", "model.vision.pool=mean",
                           f"recipe={recipe}", "model.text.mask=bidirectional"])
    # image sizes that are no multiple of the patch are fine for Swin (padded), not for ViT
    load_config(None, ["model.vision.arch=swin", "model.vision.pool=mean",
                       "model.vision.image_size=60"])
    with pytest.raises(ConfigError, match="multiple of model.vision.patch_size"):
        load_config(None, ["model.vision.image_size=60"])


def test_shipped_swin_configs_build():
    from pathlib import Path

    root = Path(__file__).parent.parent / "configs" / "pretrain"
    for name, params in (("clip_swin_shapes", (0.5e6, 3e6)), ("clip_swin_t", (27e6, 29e6))):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.model.vision.arch == "swin"
        tower = VisionTower(cfg.model.vision, cfg.model.embed_dim)
        n = sum(p.numel() for n_, p in tower.named_parameters() if not n_.startswith("proj"))
        assert params[0] < n < params[1], (name, n)


# ------------------------------------------------------------------ DeepSpeed
@pytest.fixture(scope="module")
def world():
    from vlp.engine import dist

    return dist.init()


@pytest.mark.parametrize("stage,ckpt", [(0, False), (3, True)])
def test_deepspeed_step_matches_plain_pytorch(world, tmp_path, stage, ckpt):
    """Two optimizer steps of the Swin dual tower on a DeepSpeed engine (ZeRO-3 with activation
    checkpointing, and ZeRO-0) give the weights plain PyTorch AdamW gives."""
    from pathlib import Path

    from vlp.engine.engine import Engine
    from vlp.engine.optim import param_groups
    from vlp.engine.schedule import warmup_cosine

    configs = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
    train = TrainConfig(steps=2, warmup_steps=1, lr=0.01, min_lr=0.001, weight_decay=0.1,
                        grad_clip=0.5, precision="fp32", batch_size=4, grad_checkpointing=ckpt,
                        deepspeed=str(configs / f"zero{stage}.json"))
    batches = [_batch(4, 52, seed=s) for s in range(2)]

    def build():
        torch.manual_seed(0)
        return _dual(_swin_cfg(**UNEVEN))

    reference = build()
    opt = torch.optim.AdamW(param_groups(reference, train.weight_decay), lr=train.lr,
                            betas=(train.beta1, train.beta2), eps=train.eps)
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, base_lr=train.lr, min_lr=train.min_lr,
                                        warmup_steps=train.warmup_steps, total_steps=train.steps)
        img, txt, scale = reference(*batch)
        clip_loss(img, txt, scale)["contrastive_loss"].backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad()

    engine = Engine(build(), train, world)
    for batch in batches:
        img, txt, scale = engine(*batch)
        engine.backward(clip_loss(img, txt, scale)["contrastive_loss"])
        engine.step()
    assert engine.global_step == 2
    if stage == 3:
        engine.save(tmp_path / "ckpt")
        got = engine.consolidated_state_dict(tmp_path / "ckpt")
    else:
        got = engine.module.state_dict()
    want, start = reference.state_dict(), build().state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key].float(), value, rtol=1e-4, atol=1e-5, msg=key)
    tables = [k for k in want if k.endswith("rel_pos_embed")]
    assert len(tables) == 6 and all(not torch.equal(want[k], start[k]) for k in tables)


# ------------------------------------------------------------------ end to end
def test_pretrain_swin_dual_tower_end_to_end(tmp_path):
    """`vlp pretrain` with a Swin image tower (a YAML config: key=value cannot give lists):
    train, save, `vlp.load` and encode, a real run on a small shapes world."""
    import vlp
    from PIL import Image

    from vlp.data.synth import generate

    root = tmp_path / "shapes"
    generate(root, images=48, val_images=16, benchmark_images=4, shard_size=12, progress=False)
    cfg = tmp_path / "swin.yaml"
    cfg.write_text("model:\n  embed_dim: 16\n  vision: {arch: swin, pool: mean, image_size: 60, "
                   "patch_size: 4, width: 8, stage_depths: [2, 2], stage_heads: [1, 2], "
                   "window_size: 4}\n  text: {width: 16, layers: 1, heads: 2}\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out), "--no-progress",
                 f"data.train={root}/train", f"data.val={root}/val", "train.steps=2",
                 "train.batch_size=8", "train.save_every=0", "tokenizer.vocab_size=120",
                 "eval.batch_size=16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and 0.0 <= metrics["i2t_R@1"] <= 100.0
    model = vlp.load(out / "model")
    assert model.model.cfg.vision.arch == "swin"
    assert list(model.model.cfg.vision.stage_depths) == [2, 2]
    img = model.encode_image([Image.new("RGB", (60, 60), (200, 30, 30))])
    assert img.shape == (1, 16) and torch.isfinite(img).all()


def test_convert_4x_checkpoints(tmp_path):
    """transformers 4.x files: a stored relative_position_index is checked (a wrong one is
    refused), and a table 4.x shrank to a small stage grid's window lands at our centre."""
    from safetensors.torch import load_file, save_file

    from vlp.convert.hf_swin import from_hf_swin

    hf = _random_hf(transformers.SwinModel, image_size=64, patch_size=4, embed_dim=8,
                    depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=4)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    # what 4.x stored: (16, 16) for window 4, and (4, 4) in stage 3 (window 2, below)
    index = SwinRelativePositionBias(1, (4, 4))._create_relative_position_index()
    for s in range(4):
        for j in range(2):
            state[f"encoder.layers.{s}.blocks.{j}.attention.self.relative_position_index"] = \
                (index if s < 3 else
                 SwinRelativePositionBias(1, (2, 2))._create_relative_position_index()).clone()
    # stage 3 runs on a 2x2 grid: 4.x built its blocks with window 2, a (3*3, heads) table
    small = {j: torch.randn(9, 2) for j in range(2)}
    for j in range(2):
        state[f"encoder.layers.3.blocks.{j}.attention.self.relative_position_bias_table"] = small[j]
    save_file(state, str(path), metadata={"format": "pt"})
    _, ours, _ = read_vision_tower(from_hf_swin(tmp_path / "hf", tmp_path / "tower"))
    for j in range(2):
        table = ours[f"swin.stages.3.rel_pos.{j}.rel_pos_embed"].view(7, 7, 2)
        torch.testing.assert_close(table[2:5, 2:5].reshape(9, 2), small[j], rtol=0, atol=0)
        assert table.abs().sum() == table[2:5, 2:5].abs().sum()  # zeros around it
    state["encoder.layers.1.blocks.0.attention.self.relative_position_index"] = index.flip(0)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not Swin's relative position index"):
        from_hf_swin(tmp_path / "hf", tmp_path / "tower2")
