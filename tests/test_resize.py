"""A trained model at another image size: learned patch positions resampled bicubically (against
F.interpolate of the old grid), the same size the identity bit for bit, sin-cos positions
recomputed, Swin untouched; `vlp.load(DIR, image_size=)`, the fine-tuning joint encoder and a
real `vlp finetune ... model.vision.image_size=96` from a 64-px model."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import vlp
from vlp.cli import main
from vlp.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from vlp.data.transforms import ImageTransform
from vlp.models.embed import PatchEmbed, resample_pos_embed, resize_image_state, sincos_2d
from vlp.models.joint import JointEncoder
from vlp.models.pretrained import Pretrained
from vlp.models.towers import DualTower
from vlp.tokenizer import load_tokenizer


# ------------------------------------------------------------------ the resampling itself
def _reference(pos: torch.Tensor, prefix: int, new: int) -> torch.Tensor:
    """What the issue asks for, written out: the grid as a (1, W, g, g) image through
    F.interpolate(bicubic, align_corners=False), the class position in front as it was."""
    W = pos.shape[-1]
    g = int((pos.shape[1] - prefix) ** 0.5)
    image = pos[0, prefix:].T.reshape(1, W, g, g)  # channel c, row r, col c': token r*g + c'
    out = F.interpolate(image, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], out.reshape(1, W, new * new).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("prefix,old,new", [(1, 8, 12), (1, 8, 5), (0, 4, 7), (1, 3, 16)])
def test_resampled_grid_equals_interpolate(prefix, old, new):
    torch.manual_seed(0)
    pos = torch.randn(1, prefix + old * old, 6)
    got = resample_pos_embed(pos, new, prefix)
    assert got.shape == (1, prefix + new * new, 6)
    assert torch.equal(got, _reference(pos, prefix, new))
    assert torch.equal(got[:, :prefix], pos[:, :prefix])  # the class position kept
    # bicubic weights sum to one: a constant table stays that constant
    flat = torch.full_like(pos, 0.25)
    assert torch.allclose(resample_pos_embed(flat, new, prefix), torch.full(
        (1, prefix + new * new, 6), 0.25), atol=1e-6)


def test_grid_orientation_is_row_major():
    """A table whose channel 0 is the patch's row and channel 1 its column stays so (up to the
    bicubic overshoot at the borders): rows and columns are not swapped."""
    g, new = 4, 8
    rows = torch.arange(g).repeat_interleave(g).float()
    cols = torch.arange(g).repeat(g).float()
    pos = torch.stack([rows, cols], dim=1)[None]  # (1, 16, 2)
    out = resample_pos_embed(pos, new, 0)[0].reshape(new, new, 2)
    assert (out[1:, :, 0] - out[:-1, :, 0] >= -1e-6).all()  # rows grow down
    assert (out[:, 1:, 1] - out[:, :-1, 1] >= -1e-6).all()  # columns grow right
    assert out[:, :, 0].std(dim=1).max() < 1e-5  # a row's value does not change along it


def test_same_size_is_the_identity():
    pos = torch.randn(1, 65, 8)
    assert resample_pos_embed(pos, 8, 1) is pos
    state = {"visual.embed.pos_embed": pos, "visual.proj.weight": torch.randn(4, 8)}
    vision = VisionConfig(image_size=64, patch_size=8)
    out = resize_image_state(state, vision, 64)
    assert out is state and out["visual.embed.pos_embed"] is pos


def _cfg(**vision) -> ModelConfig:
    v = dict(width=16, layers=1, heads=2, image_size=32, patch_size=8)
    return ModelConfig(embed_dim=16, vision=VisionConfig(**{**v, **vision}),
                       text=TextConfig(width=16, layers=1, heads=2, context_length=8))


def test_state_of_every_patch_embed_is_resampled():
    """Towers (with class token) under any prefix and the single stream's patch embedding
    (without) are resampled; text positions and other weights stay the same tensors."""
    torch.manual_seed(0)
    state = {"visual.embed.pos_embed": torch.randn(1, 17, 16),
             "backbone.core.towers.visual.embed.pos_embed": torch.randn(1, 17, 16),
             "core.patch_embed.pos_embed": torch.randn(1, 16, 32),
             "text.embed.pos_embed": torch.randn(1, 17, 16),  # a 17-long text: not an image
             "visual.proj.weight": torch.randn(16, 16)}
    out = resize_image_state(state, _cfg().vision, 48)
    for key, prefix in (("visual.embed.pos_embed", 1),
                        ("backbone.core.towers.visual.embed.pos_embed", 1),
                        ("core.patch_embed.pos_embed", 0)):
        assert torch.equal(out[key], _reference(state[key], prefix, 6)), key
    for key in ("text.embed.pos_embed", "visual.proj.weight"):
        assert out[key] is state[key]
    with pytest.raises(ConfigError, match=r"model.vision.image_size=50 must be a multiple of the "
                                          r"model's patch size 8 \(e.g. 48\)"):
        resize_image_state(state, _cfg().vision, 50)
    with pytest.raises(ValueError, match=r"visual.embed.pos_embed has shape \(1, 17, 16\), not "
                                         r"the positions of a 3x3 grid"):
        resize_image_state(state, _cfg(image_size=24).vision, 48)


def test_sincos_positions_are_recomputed():
    """Sin-cos positions are no weights: a model built at the new size has the new table."""
    torch.manual_seed(0)
    model = DualTower(_cfg(pos_embed="sincos"), vocab_size=40)
    state = model.state_dict()
    assert not any("pos_embed" in k and k.startswith("visual.") for k in state)
    bigger = DualTower(_cfg(pos_embed="sincos", image_size=48), vocab_size=40)
    bigger.load_state_dict(resize_image_state(state, model.cfg.vision, 48))
    table = torch.cat([torch.zeros(1, 16), sincos_2d(16, 6)])[None]
    assert torch.equal(bigger.visual.embed.pos_embed, table)


def _save(model: DualTower, path, tokenizer) -> None:
    Pretrained(model, tokenizer, ImageTransform(model.cfg.vision.image_size)).save(path)


@pytest.fixture(scope="module")
def tokenizer(ft_world, pretrained):
    return load_tokenizer(pretrained("dual_tower") / "tokenizer.json")


def _images(n=3):
    torch.manual_seed(1)
    return [Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy()) for _ in range(n)]


def test_load_at_a_new_size(tmp_path, tokenizer):
    """vlp.load(DIR, image_size=48) of a 32-px tower: 48-px features of the right shape; its
    weights are the saved ones but the resampled position table; the features are those of
    the original weights with that table, on 48-px pixels; the same size changes nothing."""
    torch.manual_seed(0)
    model = DualTower(_cfg(), vocab_size=tokenizer.vocab_size)
    _save(model, tmp_path / "m", tokenizer)
    big = vlp.load(tmp_path / "m", "cpu", image_size=48)
    assert big.transform.image_size == 48 and big.model.cfg.vision.image_size == 48
    images = _images()
    feats = big.encode_image(images)
    assert feats.shape == (3, 16)
    saved, got = model.state_dict(), big.model.state_dict()
    assert set(saved) == set(got)
    for k in saved:
        if k == "visual.embed.pos_embed":
            assert torch.equal(got[k], _reference(saved[k], 1, 6))
        else:
            assert torch.equal(got[k], saved[k]), k
    # by hand: the original module, its PatchEmbed swapped for a 48-px one holding that table
    ref = DualTower(_cfg(), vocab_size=tokenizer.vocab_size)
    ref.load_state_dict(saved)
    ref.visual.embed = PatchEmbed(48, 8, 16)
    ref.visual.embed.load_state_dict({"proj.weight": saved["visual.embed.proj.weight"],
                                      "proj.bias": saved["visual.embed.proj.bias"],
                                      "cls_token": saved["visual.embed.cls_token"],
                                      "pos_embed": _reference(saved["visual.embed.pos_embed"],
                                                              1, 6)})
    pixels = torch.stack([ImageTransform(48)(im) for im in images])
    with torch.no_grad():
        assert torch.allclose(feats, ref.eval().encode_image(pixels), atol=1e-5)
    # the trained size: exactly the plain load
    same = vlp.load(tmp_path / "m", "cpu", image_size=32)
    plain = vlp.load(tmp_path / "m", "cpu")
    assert torch.equal(same.encode_image(images), plain.encode_image(images))
    with pytest.raises(ConfigError, match="model.vision.image_size=44 must be a multiple"):
        vlp.load(tmp_path / "m", "cpu", image_size=44)


def test_swin_loads_at_a_new_size(tmp_path, tokenizer):
    """A Swin tower has relative positions only: at another size the weights are the saved
    ones exactly, and the features come out for the new size (padded windows)."""
    vision = dict(arch="swin", width=8, stage_depths=(2, 2), stage_heads=(2, 2), window_size=4,
                  patch_size=4, image_size=32, pool="mean")
    torch.manual_seed(0)
    model = DualTower(_cfg(**vision), vocab_size=tokenizer.vocab_size)
    _save(model, tmp_path / "swin", tokenizer)
    big = vlp.load(tmp_path / "swin", "cpu", image_size=52)
    assert big.transform.image_size == 52
    got = big.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    images = _images()
    feats = big.encode_image(images)
    assert feats.shape == (3, 16) and torch.isfinite(feats).all()
    with torch.no_grad():  # the same module on 52-px pixels
        want = model.eval().encode_image(torch.stack([ImageTransform(52)(im) for im in images]))
    assert torch.allclose(feats, want, atol=1e-5)


@pytest.mark.parametrize("family", ["patches", "combined"])
def test_joint_encoder_at_a_new_size(pretrained, family):
    """Fine-tuning's joint encoder from a 64-px single stream (patch positions without a class
    token) or combined directory (combined.safetensors) at 96 px."""
    folder = pretrained(family)
    encoder, _, transform = JointEncoder.from_pretrained(folder, image_size=96)
    assert transform.image_size == 96
    assert encoder.spec["model"]["vision"]["image_size"] == 96
    name = "combined.safetensors" if family == "combined" else "model.safetensors"
    key = "towers.visual.embed.pos_embed" if family == "combined" else "patch_embed.pos_embed"
    saved = load_file(str(folder / name))[key]
    assert torch.equal(encoder.core.state_dict()[key],
                       _reference(saved, 1 if family == "combined" else 0, 12))
    with torch.no_grad():
        tokens = encoder.encode_visual({"pixel_values": torch.zeros(1, 3, 96, 96)})
    n = next(iter(tokens.values())).shape[1]
    assert n == (1 + 144 if family == "combined" else 144)


def test_finetune_at_96_from_a_64px_model(ft_world, pretrained, tmp_path, capsys):
    """`vlp finetune vqa ... model.vision.image_size=96` from a 64-px dual tower runs end to
    end; the fine-tuned directory is a 96-px model (config, transform, position table) that
    vlp.load answers with; a size that is no multiple of the patch stops in one line."""
    src = pretrained("dual_tower")
    assert json.loads((src / "config.json").read_text())["model"]["vision"]["image_size"] == 64
    out = tmp_path / "vqa96"
    args = ["finetune", "vqa", "--out", str(out), "--no-progress", f"init_from={src}",
            f"data.synth_dir={ft_world}", "train.steps=2", "train.batch_size=8",
            "train.save_every=0", "data.num_workers=0", "eval.split=val",
            "eval.batch_size=32"]
    assert main([*args, "model.vision.image_size=96"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["backbone"]["model"]["vision"]["image_size"] == 96
    assert config["transform"]["image_size"] == 96
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert weights["backbone.core.towers.visual.embed.pos_embed"].shape == (1, 1 + 144, 32)
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["vqa_acc"] <= 100.0
    model = vlp.load(out / "model", "cpu")
    vocab = json.loads((out / "model" / "answers.json").read_text())
    assert model.answer(ft_world / "benchmarks" / "images" / "000000000001.jpg",
                        "what color is the circle?") in vocab
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "model.vision.image_size=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.vision.image_size=100 must be a multiple" in err
