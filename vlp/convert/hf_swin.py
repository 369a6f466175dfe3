"""Hugging Face Swin -> a vlp vision-tower directory, from local files only.

`vlp convert hf-swin SRC OUT` reads a `SwinModel` or `SwinForImageClassification` folder as
`save_pretrained` writes it (config.json with model_type "swin"; model.safetensors, its sharded
index or pytorch_model.bin; optional preprocessor_config.json) and writes OUT as a vision-tower
directory (`vlp.models.towers.save_vision_tower`, written through vlp/modeldir.py): config.json
{"architecture": "vision_tower", "vision": the VisionConfig, "transform": the image settings,
"source"} and model.safetensors with the tower's weights except its projection.
`init_vision_tower(tower, OUT)` loads it into a `VisionTower` of the same architecture (a dual
tower's image side, say; `model.vision.init_from=OUT`); the classifier head of
SwinForImageClassification is dropped. transformers is not imported.

The architectures line up as (HF -> ours, HF's prefix `swin.` optional; s = stage, j = block):
    embeddings.patch_embeddings.projection   -> swin.embed.proj
    embeddings.norm                          -> swin.embed.norm
    encoder.layers.s.blocks.j.               -> swin.stages.s.blocks.j.
      layernorm_before / layernorm_after     -> ln_1 / ln_2
      attention.{q,k,v}_proj (5.x) or attention.self.{query,key,value} (4.x, and what 5.x's
      save_pretrained writes)                -> attn.qkv (rows q|k|v)
      attention.o_proj / attention.output.dense                    -> attn.proj
      mlp.fc1, mlp.fc2 / intermediate.dense, output.dense          -> mlp.fc1, mlp.fc2
      attention.relative_position_bias.relative_position_bias_table (5.x) /
      attention.self.relative_position_bias_table (4.x) -> swin.stages.s.rel_pos.j.rel_pos_embed
    encoder.layers.s.downsample.{norm,reduction} -> swin.merges.s.{norm,reduction}
    layernorm                                -> swin.norm   (pooler_output: the tokens' mean)
A stored relative_position_index (4.x) is checked against ours. A table trained for a smaller
window (4.x shrank a stage's window to its grid) is placed at the centre of ours: the same
offsets. qkv_bias=false loads zero q/k/v biases.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from vlp.config import VisionConfig
from vlp import modeldir
from vlp.data.transforms import ImageTransform
from vlp.models.swin import relative_position_index
from vlp.models.towers import VisionTower, save_vision_tower

# transformers' SwinConfig defaults, which HF applies itself when config.json leaves a key out
_DEFAULTS = {"image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96,
             "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
             "mlp_ratio": 4.0, "qkv_bias": True, "hidden_act": "gelu",
             "use_absolute_embeddings": False, "layer_norm_eps": 1e-5}
# HF hidden_act -> our activation (encoder.make_activation)
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# ViTImageProcessor's defaults for Swin checkpoints (ImageNet statistics, bicubic)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}

# 4.x names (and what 5.x's save_pretrained writes) -> 5.x's in-memory names
_LEGACY = [("attention.self.query.", "attention.q_proj."),
           ("attention.self.key.", "attention.k_proj."),
           ("attention.self.value.", "attention.v_proj."),
           ("attention.self.relative_position_bias_table",
            "attention.relative_position_bias.relative_position_bias_table"),
           ("attention.self.relative_position_index",
            "attention.relative_position_bias.relative_position_index"),
           ("attention.output.dense.", "attention.o_proj."), ("intermediate.dense.", "mlp.fc1."),
           ("output.dense.", "mlp.fc2.")]


def _square(value, key: str, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{path}: {key}={value}; vlp's Swin takes square {key}s")
        value = value[0]
    return int(value)


def read_swin_config(folder: str | Path) -> dict:
    """`folder`/config.json with SwinConfig's defaults filled in, checked for what vlp loads."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json; expected a Hugging Face SwinModel "
                         "or SwinForImageClassification folder (save_pretrained)")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "swin":
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r}; only 'swin' "
                         "(transformers.SwinModel, Swin V1) converts")
    cfg = {k: v if raw.get(k) is None else raw[k] for k, v in _DEFAULTS.items()}
    cfg["image_size"] = _square(cfg["image_size"], "image_size", path)
    cfg["patch_size"] = _square(cfg["patch_size"], "patch_size", path)
    if cfg["num_channels"] != 3:
        raise ValueError(f"{path}: num_channels={cfg['num_channels']}; vlp's patch embedding "
                         "takes RGB (3)")
    if cfg["use_absolute_embeddings"]:
        raise ValueError(f"{path}: use_absolute_embeddings=true; vlp's Swin has only the "
                         "relative position bias (the Swin papers' default)")
    if cfg["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported; valid: "
                         f"{', '.join(_ACTIVATIONS)}")
    if len(cfg["depths"]) != len(cfg["num_heads"]):
        raise ValueError(f"{path}: depths={cfg['depths']} and num_heads={cfg['num_heads']} "
                         "need one entry per stage each")
    return cfg


def vision_config_from_hf(cfg: dict) -> VisionConfig:
    """read_swin_config's dict -> the VisionConfig of the same tower."""
    return VisionConfig(arch="swin", width=cfg["embed_dim"], stage_depths=tuple(cfg["depths"]),
                        stage_heads=tuple(cfg["num_heads"]), window_size=cfg["window_size"],
                        image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                        mlp_ratio=float(cfg["mlp_ratio"]), act=_ACTIVATIONS[cfg["hidden_act"]],
                        norm_eps=float(cfg["layer_norm_eps"]), pool="mean")


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip SwinForImageClassification's `swin.` prefix, drop its classifier and SimMIM's mask
    token, and rename 4.x keys to 5.x's."""
    out = {}
    for key, value in state.items():
        if key.startswith("classifier.") or key.endswith("mask_token"):
            continue
        key = key.removeprefix("swin.")
        for old, new in _LEGACY:
            if old in key:
                key = key.replace(old, new)
                break
        out[key] = value
    return out


def _fit_table(table: torch.Tensor, window: int, where: str) -> torch.Tensor:
    """A ((2w - 1)^2, nh) table for window w <= `window`, placed at the centre of ours."""
    side = round(table.shape[0] ** 0.5)
    full = 2 * window - 1
    if side == full:
        return table
    if side * side != table.shape[0] or side > full or side % 2 == 0:
        raise ValueError(f"{where}: a relative position table of {table.shape[0]} rows does not "
                         f"fit window_size={window} ((2*{window}-1)^2 = {full * full} rows)")
    out = table.new_zeros(full, full, table.shape[1])
    pad = (full - side) // 2
    out[pad:pad + side, pad:pad + side] = table.view(side, side, -1)
    return out.view(full * full, -1)


def tower_state_from_hf(state: dict[str, torch.Tensor], vision: VisionConfig,
                        source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF Swin weights -> a VisionTower(vision) state dict without `proj.weight`."""
    hf = _canonical(state)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"{source}: missing weight {key!r} (expected from the config: "
                             f"depths={list(vision.stage_depths)})")
        used.add(key)
        return hf[key]

    ours = {"swin.embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
            "swin.embed.proj.bias": take("embeddings.patch_embeddings.projection.bias")}
    for p in ("weight", "bias"):
        ours[f"swin.embed.norm.{p}"] = take(f"embeddings.norm.{p}")
        ours[f"swin.norm.{p}"] = take(f"layernorm.{p}")
    for s, depth in enumerate(vision.stage_depths):
        width = vision.width * 2 ** s
        for j in range(depth):
            h, o = f"encoder.layers.{s}.blocks.{j}.", f"swin.stages.{s}.blocks.{j}."
            a = h + "attention."
            for p in ("weight", "bias"):
                ours[o + f"ln_1.{p}"] = take(h + f"layernorm_before.{p}")
                ours[o + f"ln_2.{p}"] = take(h + f"layernorm_after.{p}")
                ours[o + f"attn.proj.{p}"] = take(a + f"o_proj.{p}")
                ours[o + f"mlp.fc1.{p}"] = take(h + f"mlp.fc1.{p}")
                ours[o + f"mlp.fc2.{p}"] = take(h + f"mlp.fc2.{p}")
            ours[o + "attn.qkv.weight"] = torch.cat([take(a + f"{n}_proj.weight")
                                                     for n in "qkv"])
            ours[o + "attn.qkv.bias"] = torch.cat([
                take(a + f"{n}_proj.bias") if a + f"{n}_proj.bias" in hf
                else torch.zeros(width) for n in "qkv"])  # qkv_bias=false: zero biases
            table = take(a + "relative_position_bias.relative_position_bias_table")
            index_key = a + "relative_position_bias.relative_position_index"
            if index_key in hf:  # 4.x stored it: it must be Swin's index, which ours is
                used.add(index_key)
                N = round(hf[index_key].numel() ** 0.5)  # tokens per window
                if not torch.equal(hf[index_key].view(N, N).long(),
                                   relative_position_index(round(N ** 0.5))):
                    raise ValueError(f"{source}: {index_key} is not Swin's relative position "
                                     "index; this checkpoint's attention differs from Swin's")
            ours[f"swin.stages.{s}.rel_pos.{j}.rel_pos_embed"] = _fit_table(
                table, vision.window_size, f"{source}: {a}")
        if s < len(vision.stage_depths) - 1:
            for part, p in (("norm", "weight"), ("norm", "bias"), ("reduction", "weight")):
                ours[f"swin.merges.{s}.{part}.{p}"] = take(
                    f"encoder.layers.{s}.downsample.{part}.{p}")
    unused = sorted(set(hf) - used)
    if unused:
        raise ValueError(f"{source}: {len(unused)} weights vlp's Swin does not have, e.g. "
                         f"{unused[:3]} (a Swin with other options, or another model)")
    return ours


def transform_from_hf(folder: Path, image_size: int) -> ImageTransform:
    """The eval transform from preprocessor_config.json (ImageNet statistics by default)."""
    path = folder / "preprocessor_config.json"
    p = json.loads(path.read_text()) if path.is_file() else {}
    resample = p.get("resample", 3)
    if resample not in _RESAMPLE:
        warnings.warn(f"{path}: resample={resample} is not supported; using bicubic (3)",
                      stacklevel=2)
    return ImageTransform(image_size, p.get("image_mean", _IMAGENET_MEAN),
                          p.get("image_std", _IMAGENET_STD),
                          interpolation=_RESAMPLE.get(resample, "bicubic"))


def from_hf_swin(src: str | Path, out: str | Path) -> Path:
    """Convert the Hugging Face Swin folder `src` into the vision-tower directory `out`."""
    src = Path(src)
    vision = vision_config_from_hf(read_swin_config(src))
    tower = VisionTower(vision, embed_dim=1)  # the projection is not saved
    state = modeldir.read_checkpoint(src, "Hugging Face Swin folder")  # runs nothing from a pickle
    missing, unexpected = tower.load_state_dict(tower_state_from_hf(state, vision, str(src)),
                                                strict=False)
    assert missing == ["proj.weight"] and not unexpected, (missing, unexpected)
    transform = transform_from_hf(src, vision.image_size)
    return save_vision_tower(tower, out, transform.to_dict(),
                             source={"converted_from": "hf-swin", "path": str(src)})
