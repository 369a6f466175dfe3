"""OpenCLIP state dict (safetensors) + OpenCLIP model config JSON -> vlp dual tower.

`vlp convert open-clip STATE.safetensors OUT --config MODEL.json --tokenizer TOK` loads the
weights of OpenCLIP's `CLIP` (a ViT image tower and its built-in text Transformer: OpenAI's
models and most LAION ones) without importing open_clip. The keys are renamed to Hugging Face
CLIPModel's, as transformers' convert_clip_original_pytorch_to_hf.py does, then loaded by
vlp.convert.hf_clip (one checked loader for both):
    visual.conv1 -> patch_embedding      visual.class_embedding / positional_embedding
    visual.ln_pre -> pre_layrnorm        visual.ln_post -> post_layernorm
    visual.proj (W, D) -> visual_projection.weight (D, W), transposed; text_projection too
    token_embedding, positional_embedding, ln_final -> text_model.embeddings..., final_layer_norm
    resblocks.i: attn.in_proj_{weight,bias} (rows q|k|v) -> self_attn.{q,k,v}_proj,
                 attn.out_proj, ln_1, ln_2 -> layer_norm1/2, mlp.c_fc / c_proj -> mlp.fc1 / fc2
    logit_bias (SigLIP-style training, `init_logit_bias` in the config) -> the dual tower's
                 logit_bias (model.logit_bias=true: vlp trains it with objectives.loss=siglip)
Config options that change the function (layer scale, attentional pooling, no ln_pre, mean
pooling, a bidirectional text mask, a text projection bias, ...) are refused by name. `.pt`
pickles are read only with torch.load(weights_only=True).
"""
from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.convert.hf_clip import dual_tower_from_hf_state
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from vlp.models.bert_init import mlp_ratio_for
from vlp.models.pretrained import Pretrained
from vlp.models.towers import DualTower
from vlp.tokenizer import Tokenizer, clip_bpe, load_tokenizer

_ANY = object()  # a key whose value does not change the inference function
# OpenCLIP's CLIPVisionCfg / CLIPTextCfg / model keys we understand -> the values vlp can
# express (a tuple: any of them), or _ANY; every other key is refused
_TOP = {"embed_dim": _ANY, "vision_cfg": _ANY, "text_cfg": _ANY, "quick_gelu": _ANY,
        "cast_dtype": _ANY, "custom_text": _ANY, "init_logit_scale": _ANY,
        "init_logit_bias": _ANY}
_VISION = {"layers": _ANY, "width": _ANY, "head_width": _ANY, "mlp_ratio": _ANY,
           "patch_size": _ANY, "image_size": _ANY, "patch_dropout": _ANY,
           "output_tokens": _ANY, "norm_kwargs": _ANY, "final_ln_after_pool": _ANY,
           "ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,),
           "pos_embed_type": ("learnable",), "pool_type": ("tok",), "timm_model_name": (None,),
           "global_average_pool": (False,), "input_patchnorm": (False,), "act_kwargs": (None,)}
_TEXT = {"context_length": _ANY, "vocab_size": _ANY, "width": _ANY, "heads": _ANY,
         "layers": _ANY, "mlp_ratio": _ANY, "norm_kwargs": _ANY, "output_tokens": _ANY,
         "hf_tokenizer_name": _ANY, "tokenizer_kwargs": _ANY, "final_ln_after_pool": _ANY,
         "pad_id": _ANY, "ls_init_value": (None,), "embed_cls": (False,),
         "no_causal_mask": (False,), "pool_type": ("argmax", "eos"), "proj_bias": (False,),
         "proj_type": ("linear",), "hf_model_name": (None,), "act_kwargs": (None,)}
# OpenCLIP's defaults for the keys a model JSON may leave out
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "heads": 8, "mlp_ratio": 4.0}


def _check(cfg: dict, allowed: dict, where: str, source: str) -> None:
    for key, value in cfg.items():
        if key not in allowed:
            raise ValueError(f"{source}: unknown OpenCLIP option {where}{key}={value!r}; "
                             f"vlp understands {', '.join(where + k for k in allowed)}")
        valid = allowed[key]
        if valid is not _ANY and value not in valid:
            raise ValueError(f"{source}: {where}{key}={value!r} has no vlp equivalent "
                             f"(supported: {', '.join(map(repr, valid))})")


def _square(value: Any, key: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{source}: {key}={list(value)}: vlp takes square images/patches")
        value = value[0]
    return int(value)


def _eps(cfg: dict) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))  # nn.LayerNorm's default


def read_open_clip_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """An OpenCLIP model config JSON (model_configs/ViT-B-32.json, or a hub folder's
    open_clip_config.json with "model_cfg" and "preprocess_cfg") -> (ModelConfig,
    preprocess_cfg or {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no OpenCLIP model config at {str(path)!r}")
    raw = json.loads(path.read_text())
    preprocess = raw.get("preprocess_cfg", {}) if "model_cfg" in raw else {}
    cfg = raw["model_cfg"] if "model_cfg" in raw else raw
    source = str(path)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"{source}: missing {key!r}; expected an OpenCLIP model config "
                             "(embed_dim, vision_cfg, text_cfg)")
    _check(cfg, _TOP, "", source)
    v = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
    t = {**_TEXT_DEFAULTS, **cfg["text_cfg"]}
    _check(v, _VISION, "vision_cfg.", source)
    _check(t, _TEXT, "text_cfg.", source)
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # OpenCLIP: QuickGELU or nn.GELU
    if v["width"] % v["head_width"]:
        raise ValueError(f"{source}: vision_cfg.width={v['width']} is not a multiple of "
                         f"head_width={v['head_width']}")
    vision = VisionConfig(width=v["width"], layers=v["layers"], heads=v["width"] // v["head_width"],
                          mlp_ratio=mlp_ratio_for(v["width"], int(v["width"] * v["mlp_ratio"])),
                          act=act, norm_eps=_eps(v),
                          image_size=_square(v["image_size"], "vision_cfg.image_size", source),
                          patch_size=_square(v["patch_size"], "vision_cfg.patch_size", source),
                          pos_embed="learned", pool="cls", pre_norm=True)
    text = TextConfig(width=t["width"], layers=t["layers"], heads=t["heads"],
                      mlp_ratio=mlp_ratio_for(t["width"], int(t["width"] * t["mlp_ratio"])),
                      act=act, norm_eps=_eps(t), context_length=t["context_length"],
                      mask="causal", pool="eos", vocab_size=t["vocab_size"])
    scale = float(cfg.get("init_logit_scale", ModelConfig.init_logit_scale))
    bias = cfg.get("init_logit_bias")  # SigLIP-style: OpenCLIP adds a logit_bias parameter
    if bias is not None and not isinstance(bias, (int, float)):
        raise ValueError(f"{source}: init_logit_bias={bias!r} must be a number or null")
    extra = {} if bias is None else {"logit_bias": True, "init_logit_bias": float(bias)}
    return ModelConfig(embed_dim=cfg["embed_dim"], vision=vision, text=text,
                       init_logit_scale=scale, **extra), preprocess


def hf_names(sd: dict[str, torch.Tensor], layers: tuple[int, int]) -> dict[str, torch.Tensor]:
    """OpenCLIP state dict -> the same tensors under HF CLIPModel's names (`layers`: vision,
    text). Keys it does not know stay as they are (reported as unused by the loader)."""
    if "text.token_embedding.weight" in sd:  # CustomTextCLIP keeps the text tower under text.
        sd = {k[len("text."):] if k.startswith("text.") else k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    names = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "logit_scale": "logit_scale"}
    for p in ("weight", "bias"):
        names.update({f"visual.ln_pre.{p}": f"vision_model.pre_layrnorm.{p}",
                      f"visual.ln_post.{p}": f"vision_model.post_layernorm.{p}",
                      f"ln_final.{p}": f"text_model.final_layer_norm.{p}"})
    for ours, theirs, n in (("visual.transformer", "vision_model", layers[0]),
                            ("transformer", "text_model", layers[1])):
        for i in range(n):
            o, h = f"{ours}.resblocks.{i}.", f"{theirs}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                names.update({o + f"attn.out_proj.{p}": h + f"self_attn.out_proj.{p}",
                              o + f"ln_1.{p}": h + f"layer_norm1.{p}",
                              o + f"ln_2.{p}": h + f"layer_norm2.{p}",
                              o + f"mlp.c_fc.{p}": h + f"mlp.fc1.{p}",
                              o + f"mlp.c_proj.{p}": h + f"mlp.fc2.{p}"})
                fused = sd.get(o + f"attn.in_proj_{p}")
                if fused is not None:  # nn.MultiheadAttention's rows: q, then k, then v
                    for name, part in zip("qkv", fused.chunk(3, dim=0)):
                        out[h + f"self_attn.{name}_proj.{p}"] = part
    for key, value in sd.items():
        if key in names:
            out[names[key]] = value
        elif key in ("visual.proj", "text_projection"):  # x @ proj: (W, D) -> Linear's (D, W)
            out["visual_projection.weight" if key == "visual.proj" else
                "text_projection.weight"] = value.t()
        elif "attn.in_proj_" not in key and key != "attn_mask":  # attn_mask: a fixed buffer
            out[key] = value
    return out


def read_open_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenCLIP checkpoint: .safetensors, or a .pt/.bin read with
    torch.load(weights_only=True) (a TorchScript archive, OpenAI's original release, is
    refused: load it in open_clip and save its state_dict as safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no OpenCLIP checkpoint at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # noqa: BLE001 - pickle/zip errors come in many types
        raise ValueError(f"{path}: not a plain tensor checkpoint (torch.load with "
                         f"weights_only=True failed: {exn}); convert it to safetensors in "
                         "open_clip first") from None
    if isinstance(sd, dict) and "state_dict" in sd:  # OpenCLIP training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    prefix = "module."  # saved from DistributedDataParallel
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (clip/simple_tokenizer.py),
    in CLIP's vocabulary order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_bpe_gz(path: str | Path) -> Tokenizer:
    """OpenCLIP's / OpenAI's bpe_simple_vocab_16e6.txt.gz -> the CLIP tokenizer they build
    from it: vocabulary = bytes, bytes + `</w>`, the first 48,894 merges, then
    <|startoftext|> and <|endoftext|> (ids 49406, 49407); pads with id 0 as open_clip does."""
    from tokenizers import models

    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    model = models.BPE({tok: i for i, tok in enumerate(vocab)}, merges, dropout=None,
                       continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                       unk_token="<|endoftext|>")
    return Tokenizer(clip_bpe(model), pad_token=chars[0])  # "!" = id 0, not special


def _with_logit_bias(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str,
                     config: str) -> DualTower:
    """The dual tower of HF-named weights `sd`, with SigLIP's `logit_bias` when the checkpoint
    has one (the CLIP loader, vlp.convert.hf_clip, knows the towers and the scale only)."""
    bias = sd.pop("logit_bias", None)
    if bias is None:
        if cfg.logit_bias:
            raise ValueError(f"{config}: init_logit_bias={cfg.init_logit_bias} but {source} "
                             "has no 'logit_bias' tensor; is it the checkpoint of this config?")
        return dual_tower_from_hf_state(sd, cfg, source)
    if bias.numel() != 1:
        raise ValueError(f"{source}: logit_bias has shape {tuple(bias.shape)}; expected a scalar")
    towers = dual_tower_from_hf_state(sd, replace(cfg, logit_bias=False), source)
    # the weights decide: a checkpoint trained with a bias keeps it even if its config
    # leaves init_logit_bias out
    model = DualTower(replace(cfg, logit_bias=True))
    model.load_state_dict({**towers.state_dict(), "logit_bias": bias.reshape(1).float()})
    return model


def from_open_clip(state: str | Path, out: str | Path, config: str | Path,
                   tokenizer: str | Path) -> Path:
    """Convert an OpenCLIP checkpoint into the vlp model directory `out`. `tokenizer`: a
    bpe_simple_vocab_16e6.txt.gz, a tokenizer.json, or a folder (HF tokenizer files)."""
    cfg, preprocess = read_open_clip_config(config)
    tokenizer = str(tokenizer)
    tok = tokenizer_from_bpe_gz(tokenizer) if tokenizer.endswith(".gz") \
        else load_tokenizer(tokenizer)
    if tok.sep_id is None or tok.sep_id != tok.vocab_size - 1:
        # OpenCLIP pools at argmax(ids) (or its eos id): the first end-of-text when that is the
        # largest id, as in CLIP's vocabulary
        warnings.warn(f"{tokenizer}: <|endoftext|> is not the largest id; OpenCLIP's argmax "
                      "pooling may pick another token than vlp's first end-of-text",
                      stacklevel=2)
    sd = hf_names(read_open_clip_state(state), (cfg.vision.layers, cfg.text.layers))
    model = _with_logit_bias(sd, cfg, str(state), str(config))
    transform = ImageTransform(cfg.vision.image_size, preprocess.get("mean", CLIP_MEAN),
                               preprocess.get("std", CLIP_STD),
                               interpolation=preprocess.get("interpolation", "bicubic"))
    return Pretrained(model, tok, transform).save(out)
