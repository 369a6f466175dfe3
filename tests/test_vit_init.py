"""Vision towers from ImageNet ViTs: `vlp convert hf-vit` against transformers' ViTModel
(random models of two shapes saved to a temp folder), timm state dicts checked through the key
mapping of transformers' own timm conversion script, vision-tower directories through
vlp/modeldir.py, `model.vision.init_from` in the dual-tower and combined recipes (and a real
`vlp pretrain`), and wrong checkpoints refused in one line naming the file and the key."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlp import modeldir
from vlp.cli import main
from vlp.config import ConfigError, VisionConfig, load_config
from vlp.convert.hf_vit import from_hf_vit
from vlp.models.pretrained import Pretrained
from vlp.models.towers import VisionTower, init_vision_tower, read_vision_tower, \
    save_vision_tower
from vlp.recipes.combined import CombinedRecipe
from vlp.recipes.dual_tower import DualTowerRecipe, resolve_tower_inits
from vlp.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

# two shapes: 4.x names as save_pretrained writes them, a classifier, exact GELU, qkv biases;
# ViTModel with its pooler, an MLP ratio that is no integer, gelu_new, no qkv bias
SHAPES = {
    "cls_w64": dict(cls="ViTForImageClassification", hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8,
                    hidden_act="gelu", num_labels=5),
    "model_w48": dict(cls="ViTModel", hidden_size=48, num_hidden_layers=3,
                      num_attention_heads=3, intermediate_size=100, image_size=40, patch_size=10,
                      hidden_act="gelu_new", qkv_bias=False, layer_norm_eps=1e-6),
}


def _random_hf(name: str):
    spec = dict(SHAPES[name])
    cls = getattr(transformers, spec.pop("cls"))
    torch.manual_seed(0)
    model = cls(transformers.ViTConfig(**spec)).eval()
    # HF initialises LayerNorms to (1, 0), biases and the class token to 0: perturb every tensor
    # so a swapped LayerNorm, bias, q/k/v slice or position would show in the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _backbone(model):
    return model.vit if hasattr(model, "vit") else model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """name -> (the HF model, its save_pretrained folder)."""
    out = {}
    for name in SHAPES:
        model = _random_hf(name)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _parity(model, tower_dir, image_size, g=None):
    vision, state, config = read_vision_tower(tower_dir)
    assert config["architecture"] == "vision_tower" and "proj.weight" not in state
    tower = VisionTower(vision, embed_dim=8)
    init_vision_tower(tower, tower_dir)
    pixels = torch.randn(3, 3, image_size, image_size, generator=g)
    with torch.no_grad():
        want = _backbone(model)(pixel_values=pixels).last_hidden_state
        got = tower.eval().forward_features(pixels)
    assert got.shape == want.shape
    return (got - want).abs().max().item(), tower


@pytest.mark.parametrize("names", ["saved", "in_memory", "pytorch_model.bin"])
@pytest.mark.parametrize("shape", SHAPES)
def test_hf_vit_parity(hf_folders, shape, names, tmp_path, capsys):
    """Our ViT from `vlp convert hf-vit` gives ViTModel's last_hidden_state (every token, after
    the final LayerNorm) within 1e-4 on the same pixels. names: the folder as save_pretrained
    writes it (4.x names), transformers 5's in-memory names, or a pytorch_model.bin (read with
    weights_only=True)."""
    model, folder = hf_folders[shape]
    src = folder
    if names != "saved":
        src = tmp_path / "hf"
        src.mkdir()
        (src / "config.json").write_text((folder / "config.json").read_text())
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if names == "in_memory":
            save_file(state, str(src / "model.safetensors"))
        else:
            saved = load_file(str(folder / "model.safetensors"))
            torch.save(saved, src / "pytorch_model.bin")
    assert main(["convert", "hf-vit", str(src), str(tmp_path / "tower")]) == 0
    assert "wrote" in capsys.readouterr().out
    diff, tower = _parity(model, tmp_path / "tower", SHAPES[shape]["image_size"],
                          torch.Generator().manual_seed(1))
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    cfg = tower.cfg
    spec = SHAPES[shape]
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.image_size) == (
        spec["hidden_size"], spec["num_hidden_layers"], spec["num_attention_heads"],
        spec["patch_size"], spec["image_size"])
    assert int(cfg.width * cfg.mlp_ratio) == spec["intermediate_size"]
    assert cfg.pool == "cls" and not cfg.pre_norm and cfg.pos_embed == "learned"
    written = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert written["source"]["converted_from"] == "hf-vit"
    assert written["transform"]["mean"] == [0.5, 0.5, 0.5]  # ViTImageProcessor's default
    assert not (tmp_path / "tower" / "tokenizer.json").exists()


# ------------------------------------------------------------------ timm
def _hf_keys_from_timm(timm: dict, layers: int, width: int) -> dict:
    """timm ViT names -> transformers' ViTForImageClassification names, as transformers'
    models/vit/convert_vit_timm_to_pytorch.py maps them (create_rename_keys, read_in_q_k_v),
    written out here as the independent reference for our mapping."""
    rename = {"cls_token": "vit.embeddings.cls_token", "pos_embed":
              "vit.embeddings.position_embeddings",
              "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
              "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
              "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    for i in range(layers):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for p in ("weight", "bias"):
            rename[b + f"norm1.{p}"] = h + f"layernorm_before.{p}"
            rename[b + f"attn.proj.{p}"] = h + f"attention.output.dense.{p}"
            rename[b + f"norm2.{p}"] = h + f"layernorm_after.{p}"
            rename[b + f"mlp.fc1.{p}"] = h + f"intermediate.dense.{p}"
            rename[b + f"mlp.fc2.{p}"] = h + f"output.dense.{p}"
    out = {rename[k]: v for k, v in timm.items() if "attn.qkv" not in k}
    for i in range(layers):
        w, bias = timm[f"blocks.{i}.attn.qkv.weight"], timm[f"blocks.{i}.attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[f"vit.encoder.layer.{i}.attention.attention.{n}.weight"] = \
                w[j * width:(j + 1) * width]
            out[f"vit.encoder.layer.{i}.attention.attention.{n}.bias"] = \
                bias[j * width:(j + 1) * width]
    return out


def _random_timm(width=48, layers=2, patch=8, grid=4, mlp=96, classes=7) -> dict:
    """A timm VisionTransformer state dict (names from timm's vision_transformer.py: cls_token,
    pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}, norm, head) with random values."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": r(1, 1, width), "pos_embed": r(1, grid * grid + 1, width),
          "patch_embed.proj.weight": r(width, 3, patch, patch),
          "patch_embed.proj.bias": r(width), "norm.weight": 1 + r(width), "norm.bias": r(width),
          "head.weight": r(classes, width), "head.bias": r(classes)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                   b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                   b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                   b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                   b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
                   b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
    return sd


@pytest.mark.parametrize("layout", ["file", "hub_folder"])
def test_timm_state_dict_matches_hf_through_the_timm_conversion_mapping(layout, tmp_path,
                                                                        capsys):
    """A timm ViT state dict converts to our tower; the same weights mapped to transformers'
    names as transformers' timm conversion script maps them load strictly into
    ViTForImageClassification, whose last_hidden_state ours reproduces (1e-4)."""
    width, layers, heads, patch, grid = 48, 2, 4, 8, 4
    sd = _random_timm(width, layers, patch, grid)
    if layout == "file":
        src = tmp_path / "vit.safetensors"
        save_file(sd, str(src))
        args = ["--heads", str(heads)]
    else:  # timm's hub layout: the heads come from its config's model_args
        src = tmp_path / "timm"
        src.mkdir()
        save_file(sd, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({
            "architecture": "vit_tiny_patch8_32", "num_classes": 7, "global_pool": "token",
            "model_args": {"num_heads": heads},
            "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                               "interpolation": "bicubic"}}))
        args = []
    assert main(["convert", "hf-vit", str(src), str(tmp_path / "tower"), *args]) == 0
    config = transformers.ViTConfig(hidden_size=width, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=96,
                                    image_size=patch * grid, patch_size=patch, num_labels=7,
                                    layer_norm_eps=1e-6)  # timm's LayerNorm eps
    # the 4.x names the script writes, loaded as any saved folder is (transformers 5 renames
    # them on load); every weight must be used and none missing
    ref = tmp_path / "hf_from_timm"
    config.save_pretrained(ref)
    save_file(_hf_keys_from_timm(sd, layers, width), str(ref / "model.safetensors"))
    hf, info = transformers.ViTForImageClassification.from_pretrained(ref,
                                                                      output_loading_info=True)
    assert not any(info.values()), info
    hf.eval()
    diff, tower = _parity(hf, tmp_path / "tower", patch * grid)
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    assert tower.cfg.norm_eps == 1e-6 and tower.cfg.heads == heads
    written = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert written["source"]["converted_from"] == "timm-vit"
    if layout == "hub_folder":
        assert written["transform"]["mean"] == [0.485, 0.456, 0.406]


def test_timm_refusals(tmp_path, capsys):
    sd = _random_timm()
    cases = {
        "no_heads": (sd, [], "pass --heads N"),
        "layer_scale": ({**sd, "blocks.0.ls1.gamma": torch.ones(48)}, ["--heads", "4"],
                        "'blocks.0.ls1.gamma': layer scale"),
        "registers": ({**sd, "reg_token": torch.zeros(1, 4, 48)}, ["--heads", "4"],
                      "'reg_token': register tokens"),
        "unknown": ({**sd, "blocks.1.attn.extra": torch.zeros(3)}, ["--heads", "4"],
                    "unexpected weight 'blocks.1.attn.extra'"),
        "no_class_position": ({**sd, "pos_embed": torch.zeros(1, 16, 48)}, ["--heads", "4"],
                              "pos_embed has 16 positions"),
    }
    for name, (state, args, message) in cases.items():
        src = tmp_path / f"{name}.safetensors"
        save_file(state, str(src))
        assert main(["convert", "hf-vit", str(src), str(tmp_path / name), *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and str(src) in err and "\n" not in err, (name, err)
        assert not (tmp_path / name).exists()
    torch.save(sd, tmp_path / "vit.pth")
    assert main(["convert", "hf-vit", str(tmp_path / "vit.pth"), str(tmp_path / "o")]) == 2
    assert ".safetensors only" in capsys.readouterr().err


# ------------------------------------------------------------------ wrong checkpoints
def test_wrong_hf_checkpoints_are_refused_in_one_line(hf_folders, tmp_path, capsys):
    """Missing, unexpected and misshapen weights, a pickle that would run code, and another
    model_type: exit status 2 and one line naming the file and the first offending key; the
    pickle's payload never runs."""
    _, folder = hf_folders["cls_w64"]
    good = load_file(str(folder / "model.safetensors"))
    config = (folder / "config.json").read_text()

    def folder_with(name, weights=None, cfg=config, pickle_obj=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        if pickle_obj is not None:
            torch.save(pickle_obj, d / "pytorch_model.bin")
        return d

    key = "vit.encoder.layer.1.intermediate.dense.weight"
    marker = tmp_path / "pwned"

    class Payload:  # what a hostile pytorch_model.bin holds: a call to os.system on load
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {
        "missing": (folder_with("missing", {k: v for k, v in good.items() if k != key}),
                    "model.safetensors: missing weight 'layers.1.mlp.fc1.weight'"),
        "unexpected": (folder_with("unexpected", {**good, "vit.encoder.layer.0.extra.weight":
                                                  torch.zeros(2)}),
                       "model.safetensors: unexpected weight 'layers.0.extra.weight'"),
        "shape": (folder_with("shape", {**good, key: torch.zeros(200, 64)}),
                  "model.safetensors: transformer.blocks.1.mlp.fc1.weight has shape (200, 64), "
                  "the config's tower needs (256, 64)"),
        "pickle": (folder_with("pickle", pickle_obj={**good, "x": Payload()}),
                   "pytorch_model.bin: refused: not a plain tensor checkpoint"),
        "deit": (folder_with("deit", good, config.replace('"model_type": "vit"',
                                                          '"model_type": "deit"')),
                 "model_type='deit'"),
    }
    for name, (src, message) in cases.items():
        assert main(["convert", "hf-vit", str(src), str(tmp_path / f"out_{name}")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert message in err and str(src) in err and "\n" not in err, (name, err)
        assert not (tmp_path / f"out_{name}").exists()
    assert not marker.exists()  # nothing was unpickled but tensors
    assert main(["convert", "hf-vit", str(cases["pickle"][0]), str(tmp_path / "o2")]) == 2
    assert "GLOBAL posix.system" in capsys.readouterr().err  # what the file asked for


def test_vision_tower_directory_errors(tmp_path):
    """init_vision_tower names the file and the first weight that does not fit."""
    cfg = VisionConfig(width=32, layers=1, heads=2, image_size=32, patch_size=8)
    path = save_vision_tower(VisionTower(cfg, 8), tmp_path / "t", {"image_size": 32})
    folder = modeldir.read(path, ("vision_tower",))
    assert folder.architecture == "vision_tower" and folder.vision_config().width == 32
    with pytest.raises(modeldir.ModelDirError, match="has no tokenizer"):
        folder.tokenizer()
    weights = folder.weights()
    for name, state, message in (
            ("extra", {**weights, "embed.extra": torch.zeros(1)},
             "unexpected weight 'embed.extra'"),
            ("short", {k: v for k, v in weights.items() if k != "transformer.ln_f.bias"},
             "missing weight 'transformer.ln_f.bias'"),
            ("shape", {**weights, "embed.pos_embed": torch.zeros(1, 5, 32)},
             r"embed.pos_embed has shape \(1, 5, 32\), the tower needs \(1, 17, 32\)")):
        save_file(state, str(path / "model.safetensors"))
        with pytest.raises(modeldir.ModelDirError,
                           match=f"{path / 'model.safetensors'}: {message}"):
            init_vision_tower(VisionTower(cfg, 8), path)
    with pytest.raises(ValueError, match="vision.width=32 but model.vision.width=64"):
        init_vision_tower(VisionTower(VisionConfig(width=64, layers=1, heads=2, image_size=32),
                                      8), path)
    # a vision tower is no model vlp.load (or anything reading whole models) takes
    with pytest.raises(modeldir.ModelDirError, match="architecture 'vision_tower' is not "
                                                     "usable here"):
        modeldir.read(path)


# ------------------------------------------------------------------ model.vision.init_from
def _tokenizer():
    return train_tokenizer(["a red circle left of a blue square"] * 4, vocab_size=60)


def test_init_from_in_the_dual_tower_and_combined_recipes(hf_folders, tmp_path):
    """model.vision.init_from: the recipes' models start with exactly the directory's weights
    (a converted ViT, or another dual tower's image tower); the shape is taken where left at
    the defaults, a conflicting key is refused by name."""
    _, folder = hf_folders["cls_w64"]
    tower_dir = from_hf_vit(folder, tmp_path / "tower")
    tok = _tokenizer()
    cfg = load_config(overrides=[f"model.vision.init_from={tower_dir}", "model.embed_dim=16",
                                 "model.text.width=32", "model.text.heads=2",
                                 "model.text.layers=1"])
    resolved, changed = resolve_tower_inits(cfg)
    assert "model.vision.width=64" in changed and "model.vision.image_size=32" in changed
    assert resolve_tower_inits(resolved) == (resolved, [])  # resolving again changes nothing
    assert cfg.model.vision.width == 128  # the given config is left as it was
    with pytest.raises(ConfigError, match="model.vision.width=128 but .*has width=64"):
        DualTowerRecipe(cfg, tok, 1)  # a recipe takes resolved configs only (pretrain's)

    _, want, _ = read_vision_tower(tower_dir)
    recipe = DualTowerRecipe(resolved, tok, 1)
    model = recipe.build_model()
    got = {k[len("visual."):]: v for k, v in model.state_dict().items()
           if k.startswith("visual.") and k != "visual.proj.weight"}
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    fresh = recipe.build_model(pretrained=False)  # what the loop loads trained weights into
    assert not torch.equal(fresh.visual.embed.pos_embed, want["embed.pos_embed"])

    # from a dual-tower model directory's image tower, into the combined recipe's towers
    dual = Pretrained(model, tok, recipe.eval_transform).save(tmp_path / "dual")
    combined_cfg = load_config(overrides=[
        "recipe=combined", f"model.vision.init_from={dual}", "model.vision.image_size=32",
        "model.text.mask=bidirectional", "model.text.pool=cls", "model.text.width=32",
        "model.text.heads=2", "model.text.layers=1", "model.fusion.width=32",
        "model.fusion.heads=2", "model.fusion.layers=1"])
    combined = CombinedRecipe(resolve_tower_inits(combined_cfg)[0], tok, 1).build_model()
    for k, v in model.visual.state_dict().items():
        if k != "proj.weight":
            assert torch.equal(combined.towers.visual.state_dict()[k], v), k

    bad = load_config(overrides=[f"model.vision.init_from={tower_dir}", "model.vision.width=96",
                                 "model.vision.heads=4"])
    with pytest.raises(ConfigError, match=r"model.vision.width=96 but .*config.json has "
                                          r"width=64: drop the override"):
        resolve_tower_inits(bad)
    with pytest.raises(ConfigError, match="model.vision.init_from='x' starts a tower of "
                                          "recipe=dual_tower or combined"):
        load_config(overrides=["recipe=single_stream", "model.vision.init_from=x"])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        resolve_tower_inits(load_config(overrides=["model.vision.init_from=no_such_dir"]))


def test_vlp_pretrain_starts_from_a_converted_vit(hf_folders, tmp_path):
    """A real `vlp pretrain model.vision.init_from=DIR`: after one step at a vanishing learning
    rate the run's image tower is still the directory's (a fresh one would be far off)."""
    from vlp.data.synth import generate

    shapes = tmp_path / "shapes"
    generate(shapes, images=48, val_images=8, benchmark_images=0, shard_size=24,
             progress=False, image_size=32)
    _, folder = hf_folders["cls_w64"]
    tower_dir = from_hf_vit(folder, tmp_path / "tower")
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 "data.val=", "eval.at_end=false", "train.steps=1", "train.batch_size=8",
                 "train.save_every=0", "train.lr=1e-12", "train.min_lr=0",
                 "train.warmup_steps=0", "tokenizer.vocab_size=100", "data.num_workers=0",
                 "model.embed_dim=16", "model.text.width=32", "model.text.layers=1",
                 "model.text.heads=2", f"model.vision.init_from={tower_dir}",
                 "model.vision.image_size=32"]) == 0
    trained = load_file(str(out / "model" / "model.safetensors"))
    _, want, _ = read_vision_tower(tower_dir)
    for k, v in want.items():
        torch.testing.assert_close(trained["visual." + k], v, rtol=0, atol=1e-8)
    assert modeldir.read(out / "model").model_config().vision.width == 64


def test_swin_directory_into_the_dual_tower(tmp_path):
    """A Swin vision-tower directory: the dual tower and the combined model take its arch,
    stages and window (the run's image size stays) and load its weights."""
    swin = VisionConfig(arch="swin", width=16, stage_depths=(2, 2), stage_heads=(2, 4),
                        window_size=4, patch_size=4, image_size=32, pool="mean")
    src = VisionTower(swin, 8)
    path = save_vision_tower(src, tmp_path / "swin", {"image_size": 32})
    cfg = load_config(overrides=[f"model.vision.init_from={path}", "model.embed_dim=16",
                                 "model.text.width=32", "model.text.heads=2",
                                 "model.text.layers=1"])
    resolved, changed = resolve_tower_inits(cfg)
    v = resolved.model.vision
    assert (v.arch, list(v.stage_depths), list(v.stage_heads), v.window_size, v.pool) == (
        "swin", [2, 2], [2, 4], 4, "mean")
    assert v.image_size == 64 and "model.vision.arch='swin'" in changed
    model = DualTowerRecipe(resolved, _tokenizer(), 1).build_model()
    for k, want in src.state_dict().items():
        if k != "proj.weight":
            assert torch.equal(model.visual.state_dict()[k], want), k
    assert torch.isfinite(model.encode_image(torch.randn(1, 3, 64, 64))).all()
    combined_cfg, _ = resolve_tower_inits(load_config(overrides=[
        "recipe=combined", f"model.vision.init_from={path}", "model.text.mask=bidirectional",
        "model.text.pool=cls", "model.text.width=32", "model.text.heads=2",
        "model.text.layers=1", "model.fusion.width=32", "model.fusion.heads=2",
        "model.fusion.layers=1"]))
    combined = CombinedRecipe(combined_cfg, _tokenizer(), 1).build_model()
    for k, want in src.state_dict().items():
        if k != "proj.weight":
            assert torch.equal(combined.towers.visual.state_dict()[k], want), k


def test_vit_directory_at_another_image_size(hf_folders, tmp_path):
    """A ViT trained at 32 px starts a tower at 48 px (or at the default 64 when the run sets
    it): its learned grid is resampled (bicubic, class position kept), everything else is the
    directory's; left unset, the image size is the directory's."""
    from vlp.models.embed import resample_pos_embed

    _, folder = hf_folders["cls_w64"]
    tower_dir = from_hf_vit(folder, tmp_path / "tower")
    _, want, _ = read_vision_tower(tower_dir)
    base = [f"model.vision.init_from={tower_dir}", "model.embed_dim=16", "model.text.width=32",
            "model.text.heads=2", "model.text.layers=1"]
    # 48 px (set, and not the default); 64 px, the default, set explicitly; unset: 32 px
    for size, given in ((48, None), (64, {"model.vision.image_size"}), (32, set())):
        overrides = base + ([f"model.vision.image_size={size}"] if given != set() else [])
        cfg, _ = resolve_tower_inits(load_config(overrides=overrides), given=given)
        assert cfg.model.vision.image_size == size
        model = DualTowerRecipe(cfg, _tokenizer(), 1).build_model()
        got = model.visual.state_dict()
        torch.testing.assert_close(got["embed.pos_embed"], resample_pos_embed(
            want["embed.pos_embed"], size // 8, 1), rtol=0, atol=0)
        for k in want:
            if k != "embed.pos_embed":
                assert torch.equal(got[k], want[k]), k
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, size, size))).all()
    # given=None: 48 differs from the default, so the run set it; the default means "unset"
    cfg, changed = resolve_tower_inits(load_config(overrides=base))
    assert cfg.model.vision.image_size == 32 and "model.vision.image_size=32" in changed


def test_model_init_from_ignores_the_towers_history(hf_folders, tmp_path):
    """A model directory trained from model.vision.init_from keeps that key in its config;
    `vlp pretrain model.init_from=DIR` takes DIR's weights and does not read the (here
    deleted) directory its image tower once started from."""
    import shutil

    from vlp.data.synth import generate

    _, folder = hf_folders["cls_w64"]
    tower_dir = from_hf_vit(folder, tmp_path / "tower")
    tok = _tokenizer()
    cfg, _ = resolve_tower_inits(load_config(overrides=[
        f"model.vision.init_from={tower_dir}", "model.embed_dim=16", "model.text.width=32",
        "model.text.heads=2", "model.text.layers=1"]))
    recipe = DualTowerRecipe(cfg, tok, 1)
    dual = Pretrained(recipe.build_model(), tok, recipe.eval_transform).save(tmp_path / "dual")
    assert modeldir.read(dual).model_config().vision.init_from == str(tower_dir)
    shutil.rmtree(tower_dir)
    shapes = tmp_path / "shapes"
    generate(shapes, images=48, val_images=8, benchmark_images=0, shard_size=24,
             progress=False, image_size=32)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 "data.val=", "eval.at_end=false", "train.steps=1", "train.batch_size=8",
                 "train.save_every=0", "train.lr=1e-12", "train.min_lr=0",
                 "train.warmup_steps=0", "data.num_workers=0", f"model.init_from={dual}"]) == 0
    trained, start = (load_file(str(d / "model.safetensors")) for d in (out / "model", dual))
    for k, v in start.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-8)
