"""The ViT's convolutional stem (model.vision.stem=conv; vlp/models/embed.py ConvStem): the
convolutions against the same computation written out with torch.nn.functional, the token grid
a patchify would give, every family that embeds patches, another image size, the refusals, and
a `vlp pretrain` run whose model directory loads back."""
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES
from PIL import Image

import vlp
from vlp.cli import main
from vlp.config import ConfigError, ModelConfig, TextConfig, VisionConfig, load_config
from vlp.convert.hf_clip import hf_config_from_model
from vlp.models.embed import ConvStem, PatchEmbed
from vlp.models.single_stream import SingleStream
from vlp.models.towers import VisionTower
from vlp.tokenizer import train_tokenizer

VIT = dict(width=32, layers=2, heads=2, image_size=32, patch_size=8, stem="conv",
           stem_channels=4)


def test_the_stem_is_its_formula():
    torch.manual_seed(0)
    stem = ConvStem(8, 32, channels=4)
    x = torch.randn(3, 3, 40, 24)
    h = x
    convs = [m for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stem.layers if isinstance(m, torch.nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32]  # doubling, then 1x1 to width
    for conv, norm in zip(convs[:-1], norms):  # 3x3, stride 2, padding 1; GroupNorm(1); GELU
        h = F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1)
        mean = h.mean(dim=(1, 2, 3), keepdim=True)
        var = h.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + norm.eps)
        h = F.gelu(h * norm.weight[None, :, None, None] + norm.bias[None, :, None, None])
    want = F.conv2d(h, convs[-1].weight, convs[-1].bias)
    got = stem(x)
    assert got.shape == (3, 32, 5, 3)  # the grid of an 8-px patchify of 40 x 24
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size=6 must be a power of two"):
        ConvStem(6, 32)


def test_towers_and_the_single_stream_embed_through_it():
    tower = VisionTower(VisionConfig(**VIT), 16)
    assert isinstance(tower.embed.proj, ConvStem)
    assert tower.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)
    plain = VisionTower(VisionConfig(**{**VIT, "stem": "patch"}), 16)
    assert isinstance(plain.embed.proj, torch.nn.Conv2d)  # the default is the patchify
    assert VisionConfig().stem == "patch"
    for tokens in ("patches", "roi_align"):
        cfg = ModelConfig(visual_tokens=tokens, vision=VisionConfig(**VIT))
        stream = SingleStream(cfg, 50, heads=("mlm",))
        assert isinstance(stream.patch_embed.proj, ConvStem), tokens
    # any image size that is a multiple of the patch (positions resampled elsewhere)
    embed = PatchEmbed(48, 8, 32, stem="conv", stem_channels=4)
    assert embed(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 36, 32)


def test_refusals():
    with pytest.raises(ConfigError, match="model.vision.patch_size=6 must be a power of two"):
        load_config(None, ["model.vision.stem=conv", "model.vision.patch_size=6",
                           "model.vision.image_size=60"])
    with pytest.raises(ConfigError, match="a Swin tower has its own patch partition"):
        load_config(None, ["model.vision.arch=swin", "model.vision.pool=mean",
                           "model.vision.stem=conv"])
    with pytest.raises(ConfigError, match="stem_channels=0 must be > 0"):
        load_config(None, ["model.vision.stem=conv", "model.vision.stem_channels=0"])
    with pytest.raises(ConfigError, match=r"model.vision.stem='cnn' is not valid; choose one "
                       r"of \['patch', 'conv'\]"):
        load_config(None, ["model.vision.stem=cnn"])
    tok = train_tokenizer(["a red circle", "a blue square"], vocab_size=60)
    cfg = ModelConfig(vision=VisionConfig(**VIT, pre_norm=True),
                      text=TextConfig(vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="model.vision.stem='conv' cannot be written as a "
                       "CLIPModel"):
        hf_config_from_model(cfg, tok, 1.0, "model")


def test_a_conv_stem_run_trains_and_loads_back(ft_world, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={ft_world}/train",
                 "data.val=", "eval.at_end=false", "train.steps=3", "train.batch_size=8",
                 "train.save_every=0", "tokenizer.vocab_size=200", *FAMILIES["dual_tower"],
                 "model.vision.stem=conv", "model.vision.stem_channels=4"]) == 0
    model = vlp.load(out / "model")
    assert isinstance(model.model.visual.embed.proj, ConvStem)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model" / "model.safetensors"))
    assert "visual.embed.proj.layers.0.weight" in saved  # the stem's weights, as trained
    torch.testing.assert_close(model.model.visual.embed.proj.layers[0].weight,
                               saved["visual.embed.proj.layers.0.weight"])
    image = Image.open(sorted((ft_world / "benchmarks" / "images").iterdir())[0])
    features = model.encode_image([image.convert("RGB")])
    assert features.shape == (1, 32) and torch.isfinite(features).all()
