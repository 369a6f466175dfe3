"""Hugging Face CLIP <-> vlp dual tower, both directions, from local files only.

`vlp convert hf-clip SRC OUT` reads a `CLIPModel` folder as `save_pretrained` writes it
(config.json; model.safetensors, its sharded index or pytorch_model.bin; tokenizer.json or
vocab.json + merges.txt; optional preprocessor_config.json) and writes a vlp model directory
that `vlp.load` reads. `vlp convert to-hf-clip DIR OUT` writes a vlp dual tower back as a
`CLIPModel` folder. transformers is not imported: its files are plain JSON and safetensors.

The two architectures line up as (HF CLIPModel -> vlp DualTower):
    vision: embeddings -> pre_layrnorm -> pre-LN layers -> [CLS] -> post_layernorm -> projection
            PatchEmbed -> ln_pre (model.vision.pre_norm) -> blocks -> ln_f -> [CLS] -> proj
            (ln_f normalises every token, HF only the pooled one: the same pooled output)
    text:   embeddings -> causal pre-LN layers -> final_layer_norm -> first eos -> projection
            TextEmbed -> causal blocks -> ln_f -> last real token (pool=eos) -> proj
HF pools text at the first `eos_token_id` in the ids (argmax of the ids for legacy configs with
eos_token_id=2, the same token when end-of-text is the largest id); ours at the mask's last
token, which is that eos when the mask ends there (the tokenizer's masks and
Tokenizer.attention_mask for bare ids do).

Per layer i (HF encoder.layers.i -> our transformer.blocks.i):
    self_attn.{q,k,v}_proj -> attn.qkv (rows q|k|v)    self_attn.out_proj -> attn.proj
    layer_norm1 -> ln_1    layer_norm2 -> ln_2          mlp.fc1 / mlp.fc2 -> mlp.fc1 / mlp.fc2
HF's patch conv has no bias: loading sets ours to zero; exporting folds ours into the patch
position embeddings (conv(x) + b + pos = conv(x) + (pos + b), exact up to rounding).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from vlp import modeldir
from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.data.jsonfiles import read_config_json, typed_fields
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from vlp.models import DualTower
from vlp.models.bert_init import mlp_ratio_for
from vlp.models.pretrained import Pretrained
from vlp.tokenizer import Tokenizer, load_tokenizer

# HF hidden_act -> our activation (make_activation); others would compute something else
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "relu": "relu",
                  "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "relu": "relu",
                     "gelu_tanh": "gelu_pytorch_tanh"}

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, which HF applies itself
# when config.json leaves a key out
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                  "num_hidden_layers": 12, "num_attention_heads": 8,
                  "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
                  "pad_token_id": 1}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
                    "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}

# PIL resample codes in preprocessor_config.json -> ImageTransform's interpolation
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_TO_RESAMPLE = {v: k for k, v in _RESAMPLE.items()}


# ------------------------------------------------------------------------------------ reading
def read_clip_config(folder: str | Path) -> dict:
    """`folder`/config.json as {"text": {...}, "vision": {...}, "projection_dim",
    "logit_scale_init_value"}, HF's defaults filled in, checked for what vlp can load."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json; expected a Hugging Face "
                                "CLIPModel folder (save_pretrained)")
    raw = read_config_json(path)
    if raw.get("model_type") != "clip":
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r}; only 'clip' "
                         "(transformers.CLIPModel) converts")
    cfg = typed_fields(raw, _CLIP_DEFAULTS, str(path))
    for part, defaults in (("text", _TEXT_DEFAULTS), ("vision", _VISION_DEFAULTS)):
        sub = raw.get(f"{part}_config") or {}
        if not isinstance(sub, dict):
            raise ValueError(f"{path}: {part}_config must be an object, got {sub!r}")
        cfg[part] = typed_fields(sub, defaults, f"{path}: {part}_config")
        c = cfg[part]
        if c["hidden_act"] not in HF_ACTIVATIONS:
            raise ValueError(f"{path}: {part}_config.hidden_act={c['hidden_act']!r} is not "
                             f"supported; valid: {', '.join(HF_ACTIVATIONS)}")
        if c["hidden_size"] % c["num_attention_heads"]:
            raise ValueError(f"{path}: {part}_config.hidden_size={c['hidden_size']} is not "
                             f"divisible by num_attention_heads={c['num_attention_heads']}")
    v = cfg["vision"]
    if v["num_channels"] != 3:
        raise ValueError(f"{path}: vision_config.num_channels={v['num_channels']}; vlp's patch "
                         "embedding takes RGB (3)")
    if v["image_size"] % v["patch_size"]:
        raise ValueError(f"{path}: vision_config.image_size={v['image_size']} is not a "
                         f"multiple of patch_size={v['patch_size']}")
    return cfg


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """read_clip_config's dict -> the vlp ModelConfig of the same architecture."""
    v, t = cfg["vision"], cfg["text"]
    vision = VisionConfig(width=v["hidden_size"], layers=v["num_hidden_layers"],
                          heads=v["num_attention_heads"],
                          mlp_ratio=mlp_ratio_for(v["hidden_size"], v["intermediate_size"]),
                          act=HF_ACTIVATIONS[v["hidden_act"]], norm_eps=v["layer_norm_eps"],
                          image_size=v["image_size"], patch_size=v["patch_size"],
                          pos_embed="learned", pool="cls", pre_norm=True)
    text = TextConfig(width=t["hidden_size"], layers=t["num_hidden_layers"],
                      heads=t["num_attention_heads"],
                      mlp_ratio=mlp_ratio_for(t["hidden_size"], t["intermediate_size"]),
                      act=HF_ACTIVATIONS[t["hidden_act"]], norm_eps=t["layer_norm_eps"],
                      context_length=t["max_position_embeddings"], mask="causal", pool="eos",
                      vocab_size=t["vocab_size"])
    return ModelConfig(embed_dim=cfg["projection_dim"], vision=vision, text=text,
                       init_logit_scale=float(cfg["logit_scale_init_value"]))


# ------------------------------------------------------------------------------------ mapping
def _pairs(vision_layers: int, text_layers: int) -> list[tuple[str, list[str]]]:
    """(our key, [HF keys concatenated on dim 0 into it]) for every weight but the patch
    conv's bias (HF has none)."""
    pairs = [("visual.embed.proj.weight", ["vision_model.embeddings.patch_embedding.weight"]),
             ("visual.embed.cls_token", ["vision_model.embeddings.class_embedding"]),
             ("visual.embed.pos_embed", ["vision_model.embeddings.position_embedding.weight"]),
             ("visual.proj.weight", ["visual_projection.weight"]),
             ("text.embed.token_embed.weight", ["text_model.embeddings.token_embedding.weight"]),
             ("text.embed.pos_embed", ["text_model.embeddings.position_embedding.weight"]),
             ("text.proj.weight", ["text_projection.weight"]),
             ("logit_scale", ["logit_scale"])]
    for p in ("weight", "bias"):
        pairs += [(f"visual.ln_pre.{p}", [f"vision_model.pre_layrnorm.{p}"]),
                  (f"visual.transformer.ln_f.{p}", [f"vision_model.post_layernorm.{p}"]),
                  (f"text.transformer.ln_f.{p}", [f"text_model.final_layer_norm.{p}"])]
    for ours, theirs, layers in (("visual", "vision_model", vision_layers),
                                 ("text", "text_model", text_layers)):
        for i in range(layers):
            o, h = f"{ours}.transformer.blocks.{i}.", f"{theirs}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                # Attention views qkv's output as (3, heads, head_size): rows q, then k, then v
                pairs += [(o + f"attn.qkv.{p}", [h + f"self_attn.{n}_proj.{p}" for n in "qkv"]),
                          (o + f"attn.proj.{p}", [h + f"self_attn.out_proj.{p}"]),
                          (o + f"ln_1.{p}", [h + f"layer_norm1.{p}"]),
                          (o + f"ln_2.{p}", [h + f"layer_norm2.{p}"]),
                          (o + f"mlp.fc1.{p}", [h + f"mlp.fc1.{p}"]),
                          (o + f"mlp.fc2.{p}", [h + f"mlp.fc2.{p}"])]
    return pairs


# ours -> HF for the tensors whose shapes differ only by leading singleton axes
_TO_HF_SHAPE = {"visual.embed.cls_token": lambda t: t.reshape(-1),  # (1, 1, W) -> (W,)
                "visual.embed.pos_embed": lambda t: t[0],  # (1, N, W) -> (N, W)
                "text.embed.pos_embed": lambda t: t[0],  # (1, L, W) -> (L, W)
                "logit_scale": lambda t: t.reshape(())}  # (1,) -> ()


def dual_tower_from_hf_state(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                             source: str) -> DualTower:
    """A DualTower of `cfg` holding the HF-named weights `sd` (every key checked before any
    copy; `source` names the file in errors). Unused keys other than position_ids buffers
    are reported in a warning."""
    model = DualTower(cfg)
    ours = model.state_dict()
    pairs = _pairs(cfg.vision.layers, cfg.text.layers)
    new: dict[str, torch.Tensor] = {}
    for our_key, hf_keys in pairs:
        absent = [k for k in hf_keys if k not in sd]
        if absent:
            raise ValueError(f"{source}: no {absent[0]!r} in the checkpoint (needed for our "
                             f"{our_key}); is it a CLIPModel of this config?")
        theirs = torch.cat([sd[k].reshape(-1) for k in hf_keys]) if len(hf_keys) > 1 \
            else sd[hf_keys[0]]
        # equal up to leading singleton axes ((W,) vs (1, 1, W)); q|k|v rows by element count
        fits = theirs.numel() == ours[our_key].numel() if len(hf_keys) > 1 else \
            theirs.squeeze().shape == ours[our_key].squeeze().shape
        if not fits:
            shapes = " + ".join(f"{k} {tuple(sd[k].shape)}" for k in hf_keys)
            raise ValueError(f"{source}: shape mismatch at {our_key} {tuple(ours[our_key].shape)}"
                             f" <- {shapes}")
        new[our_key] = theirs.reshape(ours[our_key].shape).float()
    new["visual.embed.proj.bias"] = torch.zeros_like(ours["visual.embed.proj.bias"])
    left = sorted(set(ours) - set(new))
    if left:  # a module changed without this mapping: loading would leave them random
        raise ValueError(f"no CLIP weights map to {', '.join(left)}; update _pairs in {__name__}")
    used = {k for _, hf_keys in pairs for k in hf_keys}
    unused = sorted(k for k in sd if k not in used and not k.endswith("position_ids"))
    if unused:
        warnings.warn(f"{source}: {len(unused)} checkpoint tensors not used: {unused[:5]}",
                      stacklevel=2)
    model.load_state_dict(new)
    return model


def hf_state_from_dual_tower(model: DualTower) -> dict[str, torch.Tensor]:
    """HF CLIPModel-named fp32 tensors of `model` (the patch conv's bias folded into the patch
    position embeddings; fixed sin-cos positions written as the learned table they equal)."""
    ours = model.state_dict()
    ours["visual.embed.pos_embed"] = model.visual.embed.pos_embed.detach()  # also a sincos buffer
    out: dict[str, torch.Tensor] = {}
    for our_key, hf_keys in _pairs(model.cfg.vision.layers, model.cfg.text.layers):
        t = ours[our_key].detach().float()
        parts = t.chunk(len(hf_keys), dim=0) if len(hf_keys) > 1 else [t]  # q|k|v rows
        for k, part in zip(hf_keys, parts):
            out[k] = _TO_HF_SHAPE.get(our_key, lambda x: x)(part).contiguous().clone()
    bias = ours["visual.embed.proj.bias"].float()
    out["vision_model.embeddings.position_embedding.weight"][1:] += bias  # not the class token
    return out


# ------------------------------------------------------------------------------------ configs
def hf_config_from_model(cfg: ModelConfig, tokenizer: Tokenizer, logit_scale: float,
                         source: str) -> dict:
    """The CLIPModel config.json of a vlp dual tower; refuses what CLIP cannot express, naming
    the config key (`source`: the model directory, for the message)."""
    v, t = cfg.vision, cfg.text
    refusals = [("model.vision.arch", v.arch, "vit",
                 "CLIPModel's vision tower is a ViT; it has no Swin tower"),
                ("model.vision.pool", v.pool, "cls", "CLIP pools the class token"),
                ("model.vision.stem", v.stem, "patch",
                 "CLIP embeds patches with one linear projection; it has no convolutional stem"),
                ("model.vision.pre_norm", v.pre_norm, True,
                 "CLIP's vision tower always applies a LayerNorm (pre_layrnorm) to the "
                 "embeddings, so a model trained without one cannot be written as CLIP"),
                ("model.text.mask", t.mask, "causal", "CLIP's text tower is causal"),
                ("model.text.pool", t.pool, "eos", "CLIP pools the end-of-text token"),
                ("model.text.norm_first", t.norm_first, True,
                 "CLIP's text blocks are pre-LN with a final LayerNorm; a BERT text tower "
                 "(post-LN, segment embeddings) has no CLIP counterpart")]
    for key, value, valid, why in refusals:
        if value != valid:
            raise ValueError(f"{source}: {key}={value!r} cannot be written as a CLIPModel "
                             f"(only {valid!r}): {why}")
    eos = tokenizer.sep_id
    if eos is None:
        raise ValueError(f"{source}: model.text.pool='eos' but the tokenizer has no end-of-text "
                         "token ([SEP], </s>, <|endoftext|> or <eos>) for eos_token_id")
    if eos == 2 and eos != tokenizer.vocab_size - 1:
        raise ValueError(f"{source}: the tokenizer's end-of-text id is 2, which transformers' "
                         "CLIP reads as a legacy config and pools at argmax(input_ids) instead "
                         "of the first eos; those differ unless eos is the largest id")
    common = {"projection_dim": cfg.embed_dim}
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": _TO_HF_ACTIVATION[t.act], "layer_norm_eps": t.norm_eps,
            "bos_token_id": tokenizer.cls_id, "eos_token_id": eos,
            "pad_token_id": _hf_pad_id(tokenizer), **common}
    vision = {"model_type": "clip_vision_model", "hidden_size": v.width,
              "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
              "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": _TO_HF_ACTIVATION[v.act],
              "layer_norm_eps": v.norm_eps, **common}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "dtype": "float32",
            "logit_scale_init_value": logit_scale, "text_config": text,
            "vision_config": vision, **common}


def _hf_pad_id(tok: Tokenizer) -> int:
    """The pad id to write for transformers. It makes the pad a special token, so a text token
    used as pad (OpenCLIP's "!") would change the ids of real text: pad with end-of-text
    instead (only ids under mask 0 differ, and those never reach the pooled feature)."""
    special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
    return tok.pad_id if tok.hf.id_to_token(tok.pad_id) in special else tok.sep_id


def transform_from_hf(folder: Path, image_size: int) -> ImageTransform:
    """The eval transform of `folder`/preprocessor_config.json (CLIP's defaults without one).
    vlp resizes the shorter side straight to the crop size: a processor that resizes larger
    and crops (size 256, crop 224) is converted with a warning."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return ImageTransform(image_size, CLIP_MEAN, CLIP_STD)
    p = json.loads(path.read_text())
    crop, size = p.get("crop_size"), p.get("size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    if crop is not None and crop != image_size:
        warnings.warn(f"{path}: crop_size {crop} differs from the model's image_size "
                      f"{image_size}; using {image_size}", stacklevel=2)
    if size is not None and size != image_size and p.get("do_center_crop", True):
        warnings.warn(f"{path}: resizes to {size} then crops {image_size}; vlp's transform "
                      f"resizes the shorter side to {image_size} (a slightly wider view)",
                      stacklevel=2)
    resample = p.get("resample", 3)
    if resample not in _RESAMPLE:
        warnings.warn(f"{path}: resample={resample} is not supported; using bicubic (3)",
                      stacklevel=2)
    return ImageTransform(image_size, p.get("image_mean", CLIP_MEAN), p.get("image_std", CLIP_STD),
                          interpolation=_RESAMPLE.get(resample, "bicubic"))


def _preprocessor_config(t: ImageTransform) -> dict:
    """CLIPImageProcessor settings equal to vlp's eval transform."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": t.image_size}, "resample": _TO_RESAMPLE[t.interpolation],
            "do_center_crop": True, "crop_size": {"height": t.image_size, "width": t.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(t.mean), "image_std": list(t.std), "do_convert_rgb": True}


# ------------------------------------------------------------------------------------ commands
def from_hf_clip(src: str | Path, out: str | Path) -> Path:
    """Convert the Hugging Face CLIPModel folder `src` into the vlp model directory `out`."""
    src = Path(src)
    hf = read_clip_config(src)
    cfg = model_config_from_hf(hf)
    tokenizer = load_tokenizer(src)
    t = hf["text"]
    if tokenizer.vocab_size > t["vocab_size"]:
        raise ValueError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but "
                         f"text_config.vocab_size={t['vocab_size']} embeddings")
    if t["eos_token_id"] == 2:  # legacy: HF pools at argmax(ids), we at the first eos
        if tokenizer.sep_id != tokenizer.vocab_size - 1:
            warnings.warn(f"{src}/config.json: text_config.eos_token_id=2 (legacy) makes HF "
                          "pool at the largest id, which is not <|endoftext|> here; vlp pools "
                          "at the first <|endoftext|>", stacklevel=2)
    elif tokenizer.sep_id != t["eos_token_id"]:
        raise ValueError(f"{src}/config.json: text_config.eos_token_id={t['eos_token_id']} "
                         f"but the tokenizer's end-of-text id is {tokenizer.sep_id}")
    model = dual_tower_from_hf_state(
        modeldir.read_checkpoint(src, "Hugging Face CLIP folder"), cfg, str(src))
    transform = transform_from_hf(src, cfg.vision.image_size)
    return Pretrained(model, tokenizer, transform).save(out)


def to_hf_clip(model_dir: str | Path, out: str | Path) -> Path:
    """Write the vlp dual tower in `model_dir` as a Hugging Face CLIPModel folder `out`:
    config.json, model.safetensors, tokenizer.json + tokenizer_config.json and
    preprocessor_config.json."""
    from safetensors.torch import save_file

    pretrained = Pretrained.from_dir(modeldir.read(model_dir, ("dual_tower", "combined")))
    model, tok = pretrained.model, pretrained.tokenizer
    config = hf_config_from_model(model.cfg, tok, float(model.logit_scale.detach()[0]),
                                  str(model_dir))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # transformers refuses safetensors without the "format" metadata save_pretrained writes
    save_file(hf_state_from_dual_tower(model), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(out / "tokenizer.json")
    name = tok.hf.id_to_token
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": model.cfg.text.context_length,
                  "pad_token": name(_hf_pad_id(tok)), "eos_token": name(tok.sep_id)}
    if tok.cls_id is not None:
        tok_config["bos_token"] = name(tok.cls_id)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(pretrained.transform), indent=2) + "\n")
    return out
