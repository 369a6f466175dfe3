"""ImageNet ViTs -> a vlp vision-tower directory, from local files only.

`vlp convert hf-vit SRC OUT` reads
- a Hugging Face `ViTModel` / `ViTForImageClassification` folder as `save_pretrained` writes
  it (config.json with model_type "vit"; model.safetensors, its sharded index or
  pytorch_model.bin; optional preprocessor_config.json), or
- a timm ViT state dict: a `.safetensors` file, or a folder as timm pushes to the hub
  (config.json with "architecture" and "pretrained_cfg", model.safetensors),
and writes OUT as a vision-tower directory (vlp/modeldir.py, architecture "vision_tower"):
the `VisionTower` (arch vit, learned positions, [CLS] pooling) without its projection, which
`model.vision.init_from=OUT` starts a dual tower's or combined model's image tower from.
Classifier heads and ViTModel's pooler (tanh(dense([CLS])), not part of last_hidden_state) are
dropped. transformers and timm are not imported.

Both are pre-LN ViTs with a final LayerNorm over every token, i.e. our PatchEmbed -> blocks ->
ln_f. Per layer i (ours: transformer.blocks.i):
    HF 4.x names (what save_pretrained writes)   HF 5.x in memory     timm              ours
    vit.encoder.layer.i.layernorm_before          vit.layers.i. ...    blocks.i.norm1    ln_1
    attention.attention.{query,key,value}         attention.{q,k,v}_proj  attn.qkv       attn.qkv
    attention.output.dense                        attention.o_proj     attn.proj         attn.proj
    layernorm_after                               layernorm_after      norm2             ln_2
    intermediate.dense / output.dense             mlp.fc1 / mlp.fc2    mlp.fc1 / fc2     mlp.fc1/2
and embeddings.{cls_token, position_embeddings, patch_embeddings.projection} / timm's
{cls_token, pos_embed, patch_embed.proj} -> embed.{cls_token, pos_embed, proj}; vit.layernorm /
timm's norm -> transformer.ln_f; timm's norm_pre (CLIP-style) -> ln_pre (pre_norm=true).
q | k | v are stacked in that order on qkv's output rows, heads in order within each, as timm's
fused qkv holds them (transformers' convert_vit_timm_to_pytorch.py splits it the same way).
timm options vlp's tower cannot express are refused by name: register tokens, layer scale,
q/k norms, no class token, positions without the class token (no_embed_class), fc_norm /
attention pooling; LayerNorm eps is timm's 1e-6 and GELU exact unless the folder's config says
otherwise. A timm state dict does not hold the number of heads: it comes from --heads, the
folder's config.json (model_args.num_heads, or the size in the architecture name), else the
conversion stops and asks for --heads.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from vlp import modeldir
from vlp.config import VisionConfig
from vlp.data.jsonfiles import read_config_json, typed_fields
from vlp.data.transforms import ImageTransform
from vlp.models.bert_init import mlp_ratio_for
from vlp.models.towers import VisionTower, save_vision_tower

# transformers' ViTConfig defaults, which HF applies itself when config.json leaves a key out
_HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                "num_channels": 3, "qkv_bias": True}
# HF hidden_act / timm act_layer -> our activation (encoder.make_activation)
_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
# ViTImageProcessor's defaults (mean = std = 0.5, bilinear) and timm's for the original ViTs
_HALF = (0.5, 0.5, 0.5)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
# heads of timm's standard ViT sizes (vit_<size>_patch...): all 64-wide heads but giant's
_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}

# 4.x names (and what 5.x's save_pretrained writes) -> 5.x's in-memory names; the longer
# `attention.output.dense` before `output.dense`
_LEGACY = [("encoder.layer.", "layers."),
           ("attention.attention.query.", "attention.q_proj."),
           ("attention.attention.key.", "attention.k_proj."),
           ("attention.attention.value.", "attention.v_proj."),
           ("attention.output.dense.", "attention.o_proj."),
           ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2.")]


# ------------------------------------------------------------------------------ Hugging Face
def _square(value, key: str, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{path}: {key}={value}; vlp's ViT takes square {key}s")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: {key}={value!r} must be a positive integer")
    return value


def read_vit_config(folder: str | Path) -> dict:
    """`folder`/config.json of a Hugging Face ViT, ViTConfig's defaults filled in, checked for
    what vlp's tower computes the same way."""
    path = Path(folder) / "config.json"
    raw = read_config_json(path)
    if raw.get("model_type") != "vit":
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r}; only 'vit' "
                         "(transformers.ViTModel / ViTForImageClassification) converts (DeiT's "
                         "distillation token, ViTMAE and others differ)")
    cfg = typed_fields(raw, _HF_DEFAULTS, str(path))
    cfg["image_size"] = _square(raw.get("image_size", 224), "image_size", path)
    cfg["patch_size"] = _square(raw.get("patch_size", 16), "patch_size", path)
    if cfg["num_channels"] != 3:
        raise ValueError(f"{path}: num_channels={cfg['num_channels']}; vlp's patch embedding "
                         "takes RGB (3)")
    if cfg["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported; valid: "
                         f"{', '.join(_ACTIVATIONS)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{path}: hidden_size={cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads={cfg['num_attention_heads']}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"{path}: image_size={cfg['image_size']} is not a multiple of "
                         f"patch_size={cfg['patch_size']}")
    return cfg


def vision_config_from_hf(cfg: dict) -> VisionConfig:
    """read_vit_config's dict -> the VisionConfig of the same tower."""
    return VisionConfig(arch="vit", width=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                        heads=cfg["num_attention_heads"],
                        mlp_ratio=mlp_ratio_for(cfg["hidden_size"], cfg["intermediate_size"]),
                        act=_ACTIVATIONS[cfg["hidden_act"]],
                        norm_eps=float(cfg["layer_norm_eps"]), image_size=cfg["image_size"],
                        patch_size=cfg["patch_size"], pos_embed="learned", pool="cls",
                        pre_norm=False)


def _canonical_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ViTForImageClassification's `vit.` prefix, drop its classifier, ViTModel's pooler
    and a masked-image-modeling mask token; rename 4.x keys to 5.x's."""
    out = {}
    for key, value in state.items():
        if key.startswith(("classifier.", "pooler.", "vit.pooler.")) or \
                key.endswith("embeddings.mask_token"):
            continue
        key = key.removeprefix("vit.")
        for old, new in _LEGACY:
            key = key.replace(old, new)
        out[key] = value
    return out


def tower_state_from_hf(state: dict[str, torch.Tensor], vision: VisionConfig,
                        source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF ViT weights -> a VisionTower(vision) state dict without `proj.weight`."""
    hf = _canonical_hf(state)
    take = _taker(hf, source)
    ours = {"embed.cls_token": take("embeddings.cls_token"),
            "embed.pos_embed": take("embeddings.position_embeddings"),
            "embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
            "embed.proj.bias": take("embeddings.patch_embeddings.projection.bias")}
    for p in ("weight", "bias"):
        ours[f"transformer.ln_f.{p}"] = take(f"layernorm.{p}")
    for i in range(vision.layers):
        h, o = f"layers.{i}.", f"transformer.blocks.{i}."
        for p in ("weight", "bias"):
            ours[o + f"ln_1.{p}"] = take(h + f"layernorm_before.{p}")
            ours[o + f"ln_2.{p}"] = take(h + f"layernorm_after.{p}")
            ours[o + f"attn.proj.{p}"] = take(h + f"attention.o_proj.{p}")
            ours[o + f"mlp.fc1.{p}"] = take(h + f"mlp.fc1.{p}")
            ours[o + f"mlp.fc2.{p}"] = take(h + f"mlp.fc2.{p}")
        ours[o + "attn.qkv.weight"] = torch.cat([take(h + f"attention.{n}_proj.weight")
                                                 for n in "qkv"])
        ours[o + "attn.qkv.bias"] = torch.cat([  # qkv_bias=false: zero biases
            take(h + f"attention.{n}_proj.bias") if h + f"attention.{n}_proj.bias" in hf
            else torch.zeros(vision.width) for n in "qkv"])
    take.check_all_used()
    return ours


# ------------------------------------------------------------------------------ timm
def _timm_heads(config: dict, width: int, heads: int | None, where: str) -> int:
    if heads:
        return heads
    args = config.get("model_args") or {}
    if isinstance(args, dict) and isinstance(args.get("num_heads"), int):
        return args["num_heads"]
    name = str(config.get("architecture", ""))
    size = re.match(r"vit_([a-z]+)_", name)
    if size and size.group(1) in _TIMM_HEADS:
        return _TIMM_HEADS[size.group(1)]
    raise ValueError(f"{where}: a timm state dict does not say how many attention heads its "
                     f"{width}-wide blocks have; pass --heads N (timm's ViT-S: 6, ViT-B: 12, "
                     "ViT-L: 16)")


def _timm_options(config: dict, where: str) -> dict:
    """What timm's config.json says about options the weights do not show."""
    args = config.get("model_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}: model_args must be an object")
    act = args.get("act_layer", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}: model_args.act_layer={act!r} is not supported; valid: "
                         f"{', '.join(_ACTIVATIONS)}")
    pool = config.get("global_pool", args.get("global_pool", "token"))
    if pool not in ("token", None):
        raise ValueError(f"{where}: global_pool={pool!r}; vlp's ViT pools the class token "
                         "(global_pool='token')")
    return {"act": _ACTIVATIONS[act]}


def vision_config_from_timm(state: dict[str, torch.Tensor], config: dict, heads: int | None,
                            where: str) -> VisionConfig:
    """The VisionConfig of a timm ViT state dict: sizes read off the tensors, heads and
    options from `config` (timm's config.json, {} for a bare file) or `heads`."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"{where}: no {key!r}: not a timm ViT state dict with a class "
                             "token and learned positions")
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    n_pos = state["pos_embed"].shape[1]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{where}: pos_embed has {n_pos} positions, not a class token's + a "
                         "square grid (timm's no_embed_class / non-square images are not "
                         "supported)")
    heads = _timm_heads(config, width, heads, where)
    if width % heads:
        raise ValueError(f"{where}: width {width} is not divisible by {heads} heads")
    return VisionConfig(arch="vit", width=width, layers=layers, heads=heads,
                        mlp_ratio=mlp_ratio_for(width, state["blocks.0.mlp.fc1.weight"].shape[0]),
                        act=_timm_options(config, where)["act"], norm_eps=1e-6,
                        image_size=grid * patch, patch_size=patch, pos_embed="learned",
                        pool="cls", pre_norm="norm_pre.weight" in state)


def tower_state_from_timm(state: dict[str, torch.Tensor], vision: VisionConfig,
                          source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """timm ViT weights -> a VisionTower(vision) state dict without `proj.weight`."""
    named = {"reg_token": "register tokens", "fc_norm.weight": "fc_norm (average pooling)",
             "attn_pool.latent": "attention pooling", "blocks.0.ls1.gamma": "layer scale",
             "blocks.0.attn.q_norm.weight": "q/k norms", "patch_embed.norm.weight":
             "a patch-embedding norm"}
    for key, what in named.items():
        if key in state:
            raise ValueError(f"{source}: {key!r}: {what}, which vlp's ViT does not have")
    hf = {k: v for k, v in state.items() if not k.startswith("head.")}
    take = _taker(hf, source)
    ours = {"embed.cls_token": take("cls_token"), "embed.pos_embed": take("pos_embed"),
            "embed.proj.weight": take("patch_embed.proj.weight")}
    # timm drops the patch bias when it normalises the embeddings (pre_norm, CLIP-style)
    ours["embed.proj.bias"] = (take("patch_embed.proj.bias") if "patch_embed.proj.bias" in hf
                               else torch.zeros(vision.width))
    for p in ("weight", "bias"):
        ours[f"transformer.ln_f.{p}"] = take(f"norm.{p}")
        if vision.pre_norm:
            ours[f"ln_pre.{p}"] = take(f"norm_pre.{p}")
    for i in range(vision.layers):
        h, o = f"blocks.{i}.", f"transformer.blocks.{i}."
        for p in ("weight", "bias"):
            ours[o + f"ln_1.{p}"] = take(h + f"norm1.{p}")
            ours[o + f"ln_2.{p}"] = take(h + f"norm2.{p}")
            ours[o + f"attn.proj.{p}"] = take(h + f"attn.proj.{p}")
            ours[o + f"mlp.fc1.{p}"] = take(h + f"mlp.fc1.{p}")
            ours[o + f"mlp.fc2.{p}"] = take(h + f"mlp.fc2.{p}")
        ours[o + "attn.qkv.weight"] = take(h + "attn.qkv.weight")
        ours[o + "attn.qkv.bias"] = (take(h + "attn.qkv.bias") if h + "attn.qkv.bias" in hf
                                     else torch.zeros(3 * vision.width))  # qkv_bias=False
    take.check_all_used()
    return ours


class _taker:
    """take(key) -> the tensor, naming the file and the key when it is missing; then
    check_all_used() names the first key nothing took (a ViT with other options)."""

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        self.state, self.source, self.used = state, source, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ValueError(f"{self.source}: missing weight {key!r}")
        self.used.add(key)
        return self.state[key]

    def check_all_used(self) -> None:
        unused = [k for k in self.state if k not in self.used]
        if unused:
            raise ValueError(f"{self.source}: unexpected weight {unused[0]!r}"
                             f"{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}: "
                             "vlp's ViT has no such parameter (a ViT with other options, or "
                             "another model)")


# ------------------------------------------------------------------------------ transforms
def _hf_transform(folder: Path, image_size: int) -> ImageTransform:
    """The eval image settings from preprocessor_config.json (ViTImageProcessor's defaults)."""
    path = folder / "preprocessor_config.json"
    p = json.loads(path.read_text()) if path.is_file() else {}
    resample = p.get("resample", 2)
    if resample not in _RESAMPLE:
        warnings.warn(f"{path}: resample={resample} is not supported; using bicubic (3)",
                      stacklevel=2)
    return ImageTransform(image_size, p.get("image_mean", _HALF), p.get("image_std", _HALF),
                          interpolation=_RESAMPLE.get(resample, "bicubic"))


def _timm_transform(config: dict, image_size: int) -> ImageTransform:
    """The eval image settings from timm's pretrained_cfg (the original ViTs' 0.5 default)."""
    p = config.get("pretrained_cfg") or {}
    interpolation = p.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    return ImageTransform(image_size, p.get("mean", _HALF), p.get("std", _HALF),
                          interpolation=interpolation)


# ------------------------------------------------------------------------------ entry point
def _write(vision: VisionConfig, state: dict[str, torch.Tensor], out: str | Path,
           transform: ImageTransform, source: dict) -> Path:
    tower = VisionTower(vision, embed_dim=1)  # the projection is not saved
    missing, unexpected = tower.load_state_dict(state, strict=False)
    assert missing == ["proj.weight"] and not unexpected, (missing, unexpected)
    return save_vision_tower(tower, out, transform, source=source)


def from_hf_vit(src: str | Path, out: str | Path, heads: int | None = None) -> Path:
    """Convert the Hugging Face ViT folder, timm hub folder or timm `.safetensors` state dict
    `src` into the vision-tower directory `out`. `heads`: a timm ViT's attention heads (not in
    its weights); refused for a Hugging Face folder, whose config says it."""
    src = Path(src)
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ValueError(f"{src}: a timm state dict is read from .safetensors only (or give "
                             "a Hugging Face ViT folder)")
        state = modeldir.read_checkpoint(src, "timm ViT state dict")
        return _from_timm(state, {}, heads, str(src), out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder or .safetensors file (a Hugging Face "
                                "ViT folder or a timm ViT state dict)")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json; expected a Hugging Face ViTModel / "
                                "ViTForImageClassification folder or a timm hub folder")
    raw = read_config_json(config_path)
    if "architecture" in raw and "model_type" not in raw:  # timm's hub layout
        weights = src / modeldir.WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{src}: a timm folder needs model.safetensors")
        state = modeldir.read_checkpoint(weights, "timm ViT state dict")
        return _from_timm(state, raw, heads, str(weights), out)
    if heads:
        raise ValueError(f"{config_path}: --heads is for timm state dicts; this folder's "
                         "config.json says num_attention_heads")
    vision = vision_config_from_hf(read_vit_config(src))
    state = modeldir.read_checkpoint(src, "Hugging Face ViT folder")
    weights = next((str(src / n) for n in (modeldir.WEIGHTS, "model.safetensors.index.json",
                                           "pytorch_model.bin") if (src / n).is_file()), str(src))
    ours = tower_state_from_hf(state, vision, weights)
    _check_shapes(ours, vision, weights)
    return _write(vision, ours, out, _hf_transform(src, vision.image_size),
                  {"converted_from": "hf-vit", "path": str(src)})


def _from_timm(state: dict[str, torch.Tensor], config: dict, heads: int | None, where: str,
               out: str | Path) -> Path:
    vision = vision_config_from_timm(state, config, heads, where)
    ours = tower_state_from_timm(state, vision, where)
    _check_shapes(ours, vision, where)
    return _write(vision, ours, out, _timm_transform(config, vision.image_size),
                  {"converted_from": "timm-vit", "path": where,
                   "architecture": config.get("architecture", ""), "heads": vision.heads})


def _check_shapes(ours: dict[str, torch.Tensor], vision: VisionConfig, source: str) -> None:
    """Name the first weight whose shape does not fit the tower the config describes."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        want = VisionTower(vision, embed_dim=1).state_dict()
    for key, value in ours.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, the config's "
                             f"tower needs {tuple(want[key].shape)}")
