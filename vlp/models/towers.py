"""Towers built from the embeddings and the one Transformer.

DualTower (CLIP style): an image encoder (ViT or Swin, `model.vision.arch`) and a text encoder,
each followed by a linear projection into a shared embedding space, and a learnable logit scale
(temperature).

A vision-tower directory (`save_vision_tower` / `init_vision_tower`, written and read through
vlp/modeldir.py) holds one image encoder on its own, e.g. converted from a Hugging Face ViT or
Swin: config.json {"format_version", "architecture": "vision_tower", "vision": VisionConfig,
"transform": image settings, "source"} and model.safetensors, the VisionTower's state dict
without its projection `proj.weight` (a published backbone has none; the model it initialises
keeps its own). `model.vision.init_from` starts an image tower from one, or from the image tower
of a dual-tower or combined model directory; `model.text.init_from` starts the text tower from
a Hugging Face BERT folder (`init_towers`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlp import modeldir
from vlp.config import EncoderConfig, ModelConfig, TextConfig, VisionConfig, to_dict
from vlp.data.transforms import ImageTransform
from vlp.models.bert_init import load_bert_mlm_head, load_bert_weights
from vlp.models.embed import BertEmbed, PatchEmbed, TextEmbed, resample_pos_embed
from vlp.models.encoder import Transformer, build_attention_mask, set_drop_path
from vlp.models.swin import SwinFeatures, build_swin


def build_transformer(cfg: EncoderConfig) -> Transformer:
    return Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps)


class VisionTower(nn.Module):
    """The image encoder, chosen by `cfg.arch`: a ViT (PatchEmbed + the one Transformer; tokens
    with the class token first) or a Swin Transformer (vlp/models/swin.py; its final stage's
    tokens, no class token), then a linear projection of the pooled tokens."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "swin":
            self.swin = build_swin(cfg)
            self.width = self.swin.out_width
        elif cfg.arch == "vit":
            self.embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.width, class_token=True,
                                    pos_embed=cfg.pos_embed, stem=cfg.stem,
                                    stem_channels=cfg.stem_channels)
            # CLIP's ln_pre; an Identity (no parameters) otherwise, so older checkpoints load
            self.ln_pre = (nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm
                           else nn.Identity())
            self.transformer = build_transformer(cfg)
            set_drop_path(self.transformer.blocks, cfg.drop_path_rate)
            self.width = cfg.width
        else:
            raise ValueError(f"unknown model.vision.arch {cfg.arch!r}; choose vit or swin")
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width ** -0.5)

    def blocks(self) -> list:
        """The encoder's blocks in forward order (a Swin's across its stages)."""
        return self.swin.blocks() if self.cfg.arch == "swin" else list(self.transformer.blocks)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if self.cfg.arch == "swin":
            self.swin.set_grad_checkpointing(enabled)
        else:
            self.transformer.grad_checkpointing = enabled

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> token states: vit (B, 1 + num_patches, width), class token first;
        swin (B, h * w, width of the last stage), its final grid row-major."""
        if self.cfg.arch == "swin":
            return self.swin(pixel_values)
        return self.transformer(self.ln_pre(self.embed(pixel_values)))

    def forward_stages(self, pixel_values: torch.Tensor) -> SwinFeatures:
        """swin only: every stage's tokens with their grids and strides, and the final tokens
        (SwinFeatures: `feature_map(s)` for RoIAlign, `positions()` for 2-D positions)."""
        if self.cfg.arch != "swin":
            raise ValueError("forward_stages needs model.vision.arch=swin (a ViT has one stage: "
                             "forward_features)")
        return self.swin.forward_stages(pixel_values)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.arch == "swin":
            pooled = tokens.mean(dim=1)  # Swin's average pool (HF's SwinModel pooler_output)
        else:
            pooled = tokens[:, 0] if self.cfg.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return self.proj(pooled)  # (B, embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixel_values))


# what must agree between a vision-tower directory and the tower it initialises. The image size
# may differ (a ViT's learned positions are resampled to the new grid on load; Swin's weights do
# not depend on it), and so may Swin's window (its tables are resampled). A LayerNorm eps is no
# weight, but a different one computes something else.
_ARCH_KEYS = {"vit": ("width", "layers", "heads", "mlp_ratio", "act", "norm_eps", "patch_size",
                      "pos_embed", "pre_norm", "stem", "stem_channels"),
              "swin": ("width", "stage_depths", "stage_heads", "mlp_ratio", "act", "norm_eps",
                       "patch_size")}
# the kinds of model directory an image tower can start from: their config says its shape and
# their model.safetensors holds it (a dual tower's, a combined model's, under "visual.")
VISION_SOURCES = ("vision_tower", "dual_tower", "combined")


def save_vision_tower(tower: VisionTower, out: str | Path, transform: dict | ImageTransform,
                      source: dict | None = None) -> Path:
    """Write `tower` (without its projection) as a vision-tower directory `out` through
    vlp.modeldir; `transform` is the image settings (an ImageTransform or its to_dict())."""
    if isinstance(transform, dict):
        transform = ImageTransform.from_dict(transform)
    state = {k: v for k, v in tower.state_dict().items() if k != "proj.weight"}
    config = {"vision": to_dict(replace(tower.cfg, init_from="")), "source": source or {}}
    return modeldir.write(out, "vision_tower", config, state, None, transform)


def read_vision_tower(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor], dict]:
    """(VisionConfig, weights without the projection, the whole config.json) of the image
    encoder in `path`: a vision-tower directory, or a dual tower's / combined model's
    directory (its `visual.` weights)."""
    folder = modeldir.read(path, VISION_SOURCES)
    vision = folder.vision_config()
    weights = folder.weights()
    if folder.architecture != "vision_tower":
        weights = {k[len("visual."):]: v for k, v in weights.items()
                   if k.startswith("visual.") and k != "visual.proj.weight"}
    return vision, weights, folder.config


def vision_tower_config(path: str | Path) -> VisionConfig:
    """The VisionConfig of the image encoder in `path` (see read_vision_tower), without
    reading its weights."""
    return modeldir.read(path, VISION_SOURCES).vision_config()


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == \
        (list(b) if isinstance(b, (list, tuple)) else b)


def adopt_shape(cfg, wanted: dict, prefix: str, source: str, keep: tuple[str, ...] = (),
                given: set[str] | None = None):
    """`cfg` (a dataclass config) with the `wanted` values of a checkpoint's shape taken where
    the run did not set the key, returned with a "prefix.key=value" list of what changed. A key
    the run set to another value than the checkpoint's is refused by name (`keep`: keys the run
    may set freely, e.g. the image size). `given`: the dotted keys the run set (the command
    line's and config file's); None: a value other than the dataclass default counts as set."""
    default = type(cfg)()
    changes, changed = {}, []
    for key, want in wanted.items():
        have = getattr(cfg, key)
        if _same(have, want):
            continue
        explicit = (f"{prefix}.{key}" in given if given is not None
                    else not _same(have, getattr(default, key)))
        if not explicit:
            changes[key] = want
            changed.append(f"{prefix}.{key}={list(want) if isinstance(want, tuple) else want!r}")
        elif key not in keep:
            raise modeldir.ModelDirError(
                f"{prefix}.{key}={have!r} but {source} has {key}={want!r}: drop the override "
                f"(the checkpoint's shape is taken) or start from other weights")
    return replace(cfg, **changes), changed


def adopt_vision_shape(cfg: VisionConfig, path: str | Path, given: set[str] | None = None
                       ) -> tuple[VisionConfig, list[str]]:
    """model.vision with the shape of the image encoder in `path` (arch and _ARCH_KEYS; a ViT's
    image size and Swin's window where the run does not set them; Swin's pooling), and what
    changed. A Swin's image size stays the run's: its weights do not depend on it. `given`: as
    adopt_shape's."""
    saved = vision_tower_config(path)
    source = str(Path(path) / modeldir.CONFIG)
    wanted = {"arch": saved.arch, **{k: getattr(saved, k) for k in _ARCH_KEYS[saved.arch]}}
    if saved.arch == "swin":
        wanted.update(window_size=saved.window_size, pool="mean")
        keep = ("window_size",)
    else:
        wanted.update(image_size=saved.image_size)
        keep = ("image_size",)
    return adopt_shape(cfg, wanted, "model.vision", source, keep, given)


def init_vision_tower(tower: VisionTower, path: str | Path) -> VisionConfig:
    """Load the image encoder in `path` (a vision-tower directory, or a dual tower's / combined
    model's) into `tower`, everything but its projection. The architecture must match
    (`_ARCH_KEYS`, named when not); the image size may differ (a ViT's learned positions are
    resampled bicubically to the tower's grid, the class position kept) and so may Swin's window
    (its relative position tables are resampled). Every weight must fit: the first missing,
    unexpected or misshapen one is named with the file. Returns the directory's VisionConfig."""
    saved, state, _ = read_vision_tower(path)
    source = Path(path) / modeldir.WEIGHTS
    if saved.arch != tower.cfg.arch:
        raise modeldir.ModelDirError(f"{path}: a {saved.arch} tower cannot initialise "
                                     f"model.vision.arch={tower.cfg.arch}")
    for key in _ARCH_KEYS[saved.arch]:
        a, b = getattr(saved, key), getattr(tower.cfg, key)
        if not _same(a, b):
            raise modeldir.ModelDirError(
                f"{path}: vision.{key}={a!r} but model.vision.{key}={b!r}; set "
                f"model.vision.{key}={a!r} to start from these weights")
    pos = state.get("embed.pos_embed")
    if saved.arch == "vit" and saved.pos_embed == "learned" and pos is not None \
            and tower.cfg.image_size != saved.image_size:
        grid = tower.cfg.image_size // tower.cfg.patch_size
        old_grid = saved.image_size // saved.patch_size
        if pos.ndim == 3 and pos.shape[1] == old_grid * old_grid + 1:  # else named below
            state = {**state, "embed.pos_embed": resample_pos_embed(pos, grid, 1)}
    ours = tower.state_dict()
    for key, value in state.items():
        if key not in ours:
            raise modeldir.ModelDirError(f"{source}: unexpected weight {key!r}: the "
                                         f"{tower.cfg.arch} tower has no such parameter")
        # Swin's relative position tables are resampled to the window on load
        if value.shape != ours[key].shape and not key.endswith("rel_pos_embed"):
            raise modeldir.ModelDirError(f"{source}: {key} has shape {tuple(value.shape)}, the "
                                         f"tower needs {tuple(ours[key].shape)}")
    absent = [k for k in ours if k not in state and k != "proj.weight"]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise modeldir.ModelDirError(f"{source}: missing weight {absent[0]!r}{more}")
    tower.load_state_dict(state, strict=False)
    return saved


class TextTower(nn.Module):
    """The text encoder: TextEmbed (token + learned positions) into pre-LN blocks (CLIP's), or,
    with cfg.norm_first=False, BERT's: BertEmbed (word + position + segment embeddings, then a
    LayerNorm) into post-LN blocks, which a BERT checkpoint loads into (init_text_tower)."""

    def __init__(self, cfg: TextConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.norm_first:
            self.embed = TextEmbed(vocab_size, cfg.width, cfg.context_length)
        else:
            # one segment: the text tower only ever uses BERT's token type 0
            self.embed = BertEmbed(vocab_size, cfg.width, cfg.context_length, type_vocab_size=1,
                                   norm_eps=cfg.norm_eps)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act,
                                       cfg.norm_eps, norm_first=cfg.norm_first)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width ** -0.5)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         causal: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids and 1 = real token mask -> (B, L, width) token states. `causal`: causal
        attention even for a bidirectional tower (a prefix-LM decoder over it); `add` (B, L,
        width): added to the embeddings (grounded words: their objects' visual embeddings)."""
        x = self.embed(input_ids)
        if add is not None:
            x = x + add
        if causal or self.cfg.mask == "causal":
            # Sequences are right-padded, so under a causal mask a real token never sees a pad:
            # the plain is_causal path (no mask tensor) is exact and fastest.
            return self.transformer(x, is_causal=True)
        mask = build_attention_mask("bidirectional", x.shape[1], padding_mask=attention_mask)
        return self.transformer(x, attn_mask=mask)

    def forward_head(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "eos":
            # the last real token ([SEP] / end-of-text) of each right-padded sequence. HF CLIP
            # pools at the first eos id (argmax of the ids for legacy eos_token_id=2 configs):
            # the same token when the mask ends at the first eos, as the tokenizer's does and
            # Tokenizer.attention_mask builds for bare ids.
            last = attention_mask.long().sum(dim=1) - 1  # (B,)
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
        elif self.cfg.pool == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.to(tokens.dtype)[..., None]  # (B, L, 1)
            pooled = (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return self.proj(pooled)  # (B, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(input_ids, attention_mask), attention_mask)


def init_text_tower(tower: TextTower, folder: str | Path) -> dict:
    """Load the Hugging Face BERT folder `folder` into a BERT-shaped `tower`
    (norm_first=False; see vlp/models/bert_init.py): word embeddings, the first
    `context_length` positions, the token type 0 row, every layer. The projection stays as it
    is (BERT's pooler and heads are not used). Returns load_bert_weights' report."""
    if tower.cfg.norm_first:
        raise ValueError(f"{folder}: BERT weights need model.text.norm_first=false (BERT's "
                         "post-LN blocks and embedding LayerNorm)")
    return load_bert_weights(tower.embed, tower.transformer, folder)


def init_towers(model: "DualTower", mlm_head: nn.Module | None = None) -> list[str]:
    """Load each tower's `init_from` (model.vision.init_from: a vision-tower, dual-tower or
    combined directory; model.text.init_from: a BERT folder) into `model`, in place, and
    BERT's MLM head into `mlm_head` (the combined model's) when given. Returns one line per
    part loaded (or not), for the log."""
    if model.cfg.init_from:
        # model.init_from loads every weight; the towers' init_from in a directory's config is
        # the history of how that model started, not read again
        return []
    done = []
    vision, text = model.cfg.vision, model.cfg.text
    if vision.init_from:
        saved = init_vision_tower(model.visual, vision.init_from)
        done.append(f"model.vision.init_from: loaded the {saved.arch} image tower of "
                    f"{vision.init_from}")
    if text.init_from:
        report = init_text_tower(model.text, text.init_from)
        done.append(f"model.text.init_from: loaded {report['loaded']} BERT tensors from "
                    f"{text.init_from}")
        if mlm_head is not None:
            done.append(load_bert_mlm_head(mlm_head, report["mlm_head"], text.init_from))
    return done


class DualTower(nn.Module):
    """Image encoder + text encoder + projections + learnable logit scale."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size or cfg.text.vocab_size
        if not vocab_size:
            raise ValueError("DualTower needs a vocabulary size: pass vocab_size= (the "
                             "tokenizer's) or set model.text.vocab_size")
        # a copy: the caller's (validated, saved) config is not changed
        cfg = replace(cfg, text=replace(cfg.text, vocab_size=vocab_size))
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, vocab_size, cfg.embed_dim)
        # Shape (1,), not CLIP's 0-dim: DeepSpeed broadcasts parameters as byte views, which
        # 0-dim tensors cannot give. 0-dim checkpoints still load (_load_from_state_dict).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        if cfg.logit_bias:  # SigLIP's learnable bias; absent otherwise (older directories load)
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in (prefix + "logit_scale", prefix + "logit_bias"):
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.visual.set_grad_checkpointing(enabled)
        self.text.transformer.grad_checkpointing = enabled

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual(pixel_values)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        feats = self.text(input_ids, attention_mask)
        return F.normalize(feats, dim=-1) if normalize else feats

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (image_features (B, D), text_features (B, D), logit scale), features L2-normalised,
        and the logit bias (a scalar) after them when the model has one (SigLIP). Returned from
        the forward so that ZeRO-3, which gathers parameters only inside it, can train them."""
        out = (self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask),
               self.scale())
        return (*out, self.logit_bias[0]) if self.cfg.logit_bias else out
