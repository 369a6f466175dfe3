"""Initialise vlp's text embeddings and Transformer layers from a local Hugging Face BERT folder.

Where it sits: `model.init_text_from=DIR` (the single-stream VL-BERT model) and
`model.text.init_from=DIR` (a dual tower's or combined model's text tower, vlp/models/towers.py)
both build a `BertEmbed` and a post-LN `Transformer(norm_first=False)` of BERT's sizes
(`bert_shape`) and copy BERT's weights into them with `load_bert_weights`, the one loader; the
MLM head's weights come back to the caller, which owns that head. Nothing here reaches
the network: DIR holds config.json and model.safetensors (or model.safetensors.index.json and its
shards, or pytorch_model.bin), as `save_pretrained` writes them.

The mapping, per layer i (HF BertLayer -> our Block; both prefixes "bert." and none accepted):
    attention.self.{query,key,value}   -> attn.qkv       (concatenated on the output axis, q|k|v)
    attention.output.dense             -> attn.proj
    attention.output.LayerNorm         -> ln_1           (post-LN: ln_1(x + attn(x)))
    intermediate.dense                 -> mlp.fc1
    output.dense                       -> mlp.fc2
    output.LayerNorm                   -> ln_2           (post-LN: ln_2(x + mlp(x)))
and embeddings.{word,position,token_type}_embeddings / embeddings.LayerNorm -> BertEmbed's
token_embed / pos_embed / type_embed / ln.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from vlp.config import ConfigError
from vlp.data.jsonfiles import read_config_json, typed_fields
from vlp.modeldir import read_checkpoint
from vlp.models.embed import BertEmbed
from vlp.models.encoder import Transformer

# HF hidden_act -> our activation name (make_activation). Others (e.g. "gelu_fast", "silu")
# would load but compute something else, so they are refused.
BERT_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "quick_gelu": "quick_gelu",
                    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
# transformers' BertConfig defaults, which HF itself applies when config.json omits the key
# (older BERT folders lack layer_norm_eps / pad_token_id)
_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
             "type_vocab_size": 2, "pad_token_id": 0}

_MLM_PREFIX = "cls.predictions."
# tables whose first rows are enough for a smaller embedding (positions < context_length,
# token type 0 only)
_LEADING_ROWS = ("embed.pos_embed.weight", "embed.type_embed.weight")


def read_bert_config(folder: str | Path) -> dict:
    """What vlp needs from `folder`/config.json.

    Returns {vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
    hidden_act, layer_norm_eps, max_position_embeddings, type_vocab_size, pad_token_id} under
    HF's names, plus "act": our activation name for `hidden_act` (see BERT_ACTIVATIONS). The
    first five are required; the others default as in transformers' BertConfig.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"BERT folder {str(folder)!r} does not exist; "
                                "model.init_text_from must name a local folder with "
                                "config.json and weights")
    if not path.is_file():
        raise FileNotFoundError(f"BERT folder {str(folder)!r} has no config.json")
    raw = read_config_json(path)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    if raw.get("model_type", "bert") != "bert":
        raise ConfigError(f"{path}: model_type={raw['model_type']!r}; only BERT ('bert') "
                         "checkpoints load into BertEmbed + Transformer")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: position_embedding_type="
                         f"{raw['position_embedding_type']!r}; only 'absolute' is supported")
    cfg = typed_fields(raw, {k: 0 for k in _REQUIRED}, str(path))
    cfg.update(typed_fields(raw, _DEFAULTS, str(path)))
    if cfg["hidden_act"] not in BERT_ACTIVATIONS:
        raise ConfigError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported; valid: "
                         f"{', '.join(BERT_ACTIVATIONS)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(f"{path}: hidden_size={cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads={cfg['num_attention_heads']}")
    cfg["act"] = BERT_ACTIVATIONS[cfg["hidden_act"]]
    return cfg


def mlp_ratio_for(hidden_size: int, intermediate_size: int) -> float:
    """The float r with int(hidden_size * r) == intermediate_size (MLP's hidden size rule)."""
    r = intermediate_size / hidden_size
    if int(hidden_size * r) != intermediate_size:  # rounding fell just below: step up one ulp
        r = math.nextafter(r, math.inf)
    return r


def bert_shape(cfg: dict) -> dict:
    """read_bert_config's dict -> the encoder keys of vlp's configs (EncoderConfig's width,
    layers, heads, mlp_ratio, act, norm_eps) of the same Transformer, post-LN."""
    return {"width": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"],
            "mlp_ratio": mlp_ratio_for(cfg["hidden_size"], cfg["intermediate_size"]),
            "act": cfg["act"], "norm_eps": cfg["layer_norm_eps"], "norm_first": False}


def bert_modules(cfg: dict) -> tuple[BertEmbed, Transformer]:
    """Randomly initialised BertEmbed + post-LN Transformer of the sizes in `cfg`
    (read_bert_config's dict)."""
    embed = BertEmbed(cfg["vocab_size"], cfg["hidden_size"], cfg["max_position_embeddings"],
                      cfg["type_vocab_size"], cfg["layer_norm_eps"], cfg["pad_token_id"])
    transformer = Transformer(cfg["hidden_size"], cfg["num_hidden_layers"],
                              cfg["num_attention_heads"],
                              mlp_ratio_for(cfg["hidden_size"], cfg["intermediate_size"]),
                              cfg["act"], cfg["layer_norm_eps"], norm_first=False)
    return embed, transformer


def read_bert_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `folder` (CPU; read by modeldir.read_checkpoint, which
    runs nothing from a pickle), LayerNorm gamma/beta renamed to weight/bias (the original
    Google-converted checkpoints, e.g. bert-base-uncased's, use them; transformers renames them
    the same way when it loads)."""
    sd = read_checkpoint(folder, "BERT folder")
    out = {}
    for k, v in sd.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _bert_prefix(sd: dict[str, torch.Tensor], folder: Path) -> str:
    for prefix in ("bert.", ""):
        if prefix + "embeddings.word_embeddings.weight" in sd:
            return prefix
    sample = ", ".join(sorted(sd)[:5])
    raise ConfigError(f"BERT folder {str(folder)!r}: no 'bert.embeddings.word_embeddings.weight' "
                     f"or 'embeddings.word_embeddings.weight' in the checkpoint (first keys: "
                     f"{sample}); is it a BERT checkpoint?")


def _pairs(prefix: str, layers: int) -> list[tuple[str, list[str]]]:
    """(our key, [HF keys concatenated on dim 0 into it]), embeddings first; our keys are
    relative to "embed." / "transformer."."""
    e = prefix + "embeddings."
    pairs = [("embed.token_embed.weight", [e + "word_embeddings.weight"]),
             ("embed.pos_embed.weight", [e + "position_embeddings.weight"]),
             ("embed.type_embed.weight", [e + "token_type_embeddings.weight"]),
             ("embed.ln.weight", [e + "LayerNorm.weight"]),
             ("embed.ln.bias", [e + "LayerNorm.bias"])]
    for i in range(layers):
        h, ours = f"{prefix}encoder.layer.{i}.", f"transformer.blocks.{i}."
        for p in ("weight", "bias"):
            # Attention views qkv's output as (3, heads, head_size): rows [0, C) are q, [C, 2C)
            # k, [2C, 3C) v, each split into heads in order, as HF splits query/key/value.
            pairs += [(ours + f"attn.qkv.{p}",
                       [h + f"attention.self.{n}.{p}" for n in ("query", "key", "value")]),
                      (ours + f"attn.proj.{p}", [h + f"attention.output.dense.{p}"]),
                      (ours + f"ln_1.{p}", [h + f"attention.output.LayerNorm.{p}"]),
                      (ours + f"mlp.fc1.{p}", [h + f"intermediate.dense.{p}"]),
                      (ours + f"mlp.fc2.{p}", [h + f"output.dense.{p}"]),
                      (ours + f"ln_2.{p}", [h + f"output.LayerNorm.{p}"])]
    return pairs


def load_bert_weights(embed: BertEmbed, transformer: Transformer,
                      folder: str | Path) -> dict:
    """Copy the BERT checkpoint in `folder` into `embed` and `transformer` (in place, keeping
    their device and dtype). `transformer` must be post-LN (norm_first=False) with BERT's layer
    count; every shape is checked before anything is copied.

    Returns {
      "loaded": int, number of HF tensors used (5 embedding + 16 per layer),
      "unused": sorted list of the checkpoint's other keys (pooler, NSP head, MLM head, ...),
      "mlm_head": {name: tensor} of the MLM head's weights with "cls.predictions." removed:
          "transform.dense.weight/bias", "transform.LayerNorm.weight/bias", "bias" (the output
          bias over the vocabulary) and "decoder.weight" only where it is stored (usually it is
          tied to the word embeddings and left out); {} when the checkpoint has no MLM head.
    }
    """
    folder = Path(folder)
    if transformer.norm_first:
        raise ValueError("BERT weights need a post-LN Transformer: build it with "
                         "norm_first=False (pre-LN blocks would compute something else)")
    sd = read_bert_state_dict(folder)
    prefix = _bert_prefix(sd, folder)
    n_layers = len(transformer.blocks)
    layer_prefix = prefix + "encoder.layer."
    n_theirs = 1 + max((int(k[len(layer_prefix):].split(".")[0])
                        for k in sd if k.startswith(layer_prefix)), default=-1)
    if n_theirs != n_layers:
        raise ConfigError(f"BERT folder {str(folder)!r} has {n_theirs} layers, the Transformer "
                         f"{n_layers}; build it with layers={n_theirs}")
    ours = {"embed." + k: v for k, v in embed.state_dict(keep_vars=True).items()}
    ours.update({"transformer." + k: v
                 for k, v in transformer.state_dict(keep_vars=True).items()})

    plan = []
    for our_key, hf_keys in _pairs(prefix, n_layers):
        absent = [k for k in hf_keys if k not in sd]
        if absent:
            raise ConfigError(f"BERT folder {str(folder)!r}: checkpoint has no {absent[0]!r} "
                             f"(needed for our {our_key})")
        theirs = torch.cat([sd[k] for k in hf_keys]) if len(hf_keys) > 1 else sd[hf_keys[0]]
        if our_key in _LEADING_ROWS and ours[our_key].shape[0] < theirs.shape[0] \
                and ours[our_key].shape[1:] == theirs.shape[1:]:
            # a shorter position table (a text tower's context_length) or fewer token types
            # (one segment) than BERT's: the rows it has are BERT's first ones
            theirs = theirs[: ours[our_key].shape[0]]
        if ours[our_key].shape != theirs.shape:
            raise ConfigError(f"BERT folder {str(folder)!r}: shape mismatch at {our_key} <- "
                             f"{' + '.join(hf_keys)}: ours {tuple(ours[our_key].shape)} vs "
                             f"theirs {tuple(theirs.shape)}")
        plan.append((our_key, hf_keys, theirs))
    left = sorted(set(ours) - {our_key for our_key, _, _ in plan})
    if left:  # a module changed without this mapping: loading would silently leave them random
        raise ValueError(f"no BERT weights map to {', '.join(left)}; update _pairs in "
                         f"{__name__}")

    used = set()
    with torch.no_grad():
        for our_key, hf_keys, theirs in plan:
            ours[our_key].copy_(theirs)
            used.update(hf_keys)
    unused = sorted(k for k in sd if k not in used)
    mlm = {k[len(_MLM_PREFIX):]: sd[k] for k in unused if k.startswith(_MLM_PREFIX)}
    return {"loaded": len(used), "unused": unused, "mlm_head": mlm}


def text_encoder_from_bert(folder: str | Path) -> tuple[BertEmbed, Transformer]:
    """(BertEmbed, post-LN Transformer) of the sizes in `folder`/config.json, holding its
    weights. Use: `x = embed(ids, token_type_ids)`;
    `transformer(x, build_attention_mask("bidirectional", L, padding_mask=attention_mask))`
    equals HF BertModel's last_hidden_state (in eval mode; ours has no dropout)."""
    embed, transformer = bert_modules(read_bert_config(folder))
    load_bert_weights(embed, transformer, folder)
    return embed, transformer


# BERT's MLM head (cls.predictions.*) -> an MLMHead's (vlp/models/single_stream.py) parameters;
# the decoder is the word embeddings (tied), loaded with the embeddings
_MLM_HEAD_PAIRS = (("dense.weight", "transform.dense.weight"),
                   ("dense.bias", "transform.dense.bias"),
                   ("norm.weight", "transform.LayerNorm.weight"),
                   ("norm.bias", "transform.LayerNorm.bias"), ("bias", "bias"))


def load_bert_mlm_head(head: nn.Module, mlm: dict[str, torch.Tensor], source: str) -> str:
    """Copy BERT's MLM head (`mlm`: load_bert_weights' "mlm_head") into `head` (an MLMHead),
    in place; one line for the log. Nothing is copied, and the line says why, when the
    checkpoint has no MLM head (a BertModel) or the head's input width is not BERT's (a fusion
    of another width in front of it)."""
    if not all(theirs in mlm for _, theirs in _MLM_HEAD_PAIRS):
        return f"{source} has no MLM head (cls.predictions): the MLM head starts fresh"
    ours = dict(head.named_parameters())
    misfit = next((f"{k} {tuple(ours[k].shape)} vs {tuple(mlm[t].shape)}"
                   for k, t in _MLM_HEAD_PAIRS if ours[k].shape != mlm[t].shape), None)
    if misfit:
        return (f"{source}'s MLM head does not fit (mlm_head.{misfit}: the fusion width is not "
                "BERT's): the MLM head starts fresh")
    with torch.no_grad():
        for k, theirs in _MLM_HEAD_PAIRS:
            ours[k].copy_(mlm[theirs])
    return f"loaded BERT's MLM head (transform and output bias) from {source}"
