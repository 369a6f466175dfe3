"""Typed configuration: dataclasses hold every default once; YAML files and `key=value`
command-line overrides only change them.

Loading is strict (nanoGPT's habit): an unknown key, a value of the wrong type or a value outside
a `Literal` set fails before any work starts, naming the key and what would be valid.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    """The unified Transformer's shape; every tower has one."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu", "relu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-5


@dataclass
class VisionConfig(EncoderConfig):
    """Image tower: PatchEmbed + the unified Transformer (vit), or a Swin Transformer built from
    its blocks (swin: vlp/models/swin.py)."""

    arch: Literal["vit", "swin"] = "vit"
    image_size: int = 64
    patch_size: int = 8
    pos_embed: Literal["learned", "sincos"] = "learned"  # vit only
    # vit only: how pixels become patch tokens. patch: one linear projection per patch (ViT,
    # CLIP); conv: a convolutional stem, log2(patch_size) 3x3 stride-2 convolutions with
    # channels doubling from stem_channels (Xiao et al. 2021; vlp/models/embed.py ConvStem):
    # the same grid, overlapping receptive fields
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: int = 16
    pool: Literal["cls", "mean"] = "cls"  # swin has no class token: pool=mean
    # a LayerNorm on the embeddings before the first block (CLIP's `ln_pre` / HF's
    # `pre_layrnorm`); needed to load or export CLIP weights. vit only (Swin always has one)
    pre_norm: bool = False
    # swin only: `width` is the first stage's, doubled at every stage; `layers` and `heads` are
    # vit's. Images need not be a multiple of the patch or the windows (padded, as Swin does).
    stage_depths: tuple[int, ...] = (2, 2, 6, 2)
    stage_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    # a directory whose image encoder the tower starts from (dual_tower and combined recipes):
    # a vision-tower directory (`vlp convert hf-vit` / `hf-swin`) or a dual-tower / combined
    # model directory. Its shape is taken where these keys keep their defaults; a conflicting
    # one is refused by name. The projection stays fresh.
    init_from: str = ""
    # swin only: the stage whose feature map RoIAlign pools (single-stream `roi_align` regions,
    # grounded objects of VCR / RefCOCO); Python indexing, -1 = the last stage
    roi_stage: int = -1
    # stochastic depth in training: the image encoder's blocks drop each sample's residual
    # branches with probabilities rising linearly from 0 (the first) to this (the last; timm's
    # schedule; Swin-T pretrains with 0.2, ViT-B fine-tunes with 0.1 in BEiT/MAE); no weights,
    # nothing at eval
    drop_path_rate: float = 0.0


@dataclass
class TextConfig(EncoderConfig):
    """Text tower: TextEmbed + the unified Transformer."""

    context_length: int = 32
    # CLIP's text tower: causal attention, pooled at the end-of-text token ([SEP] here).
    mask: Literal["causal", "bidirectional"] = "causal"
    pool: Literal["eos", "cls", "mean"] = "eos"
    vocab_size: int = 0  # 0: taken from the tokenizer when the model is built
    # False: BERT's text tower (word + position + segment embeddings with a LayerNorm, post-LN
    # blocks): what init_from loads into
    norm_first: bool = True
    # a local Hugging Face BERT folder the text tower starts from (dual_tower and combined
    # recipes; the single stream's is model.init_text_from): its shape and tokenizer are taken,
    # and it needs mask=bidirectional and pool=cls (or mean)
    init_from: str = ""


@dataclass
class FusionConfig(EncoderConfig):
    """Single-stream Transformer over `[CLS] text [SEP] visual tokens [END]` (VL-BERT/UNITER).
    With model.init_text_from, width/layers/heads/mlp/act/eps come from the BERT config."""

    norm_first: bool = True  # False: BERT's post-LN (what init_text_from loads)
    max_positions: int = 64  # text positions (>= model.text.context_length)


@dataclass
class ModelConfig:
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature
    max_logit_scale: float = math.log(100.0)  # CLIP clamps exp(scale) at 100
    # SigLIP's learnable logit bias (objectives.loss=siglip turns it on: a dual tower has the
    # parameter only then, so directories written without it keep loading)
    logit_bias: bool = False
    init_logit_bias: float = -10.0  # SigLIP's init (Zhai et al. 2023, Sec. 3.2)
    # single-stream only: the visual tokens. patches: ViLT-style patch embeddings of the image
    # (model.vision.image_size/patch_size); regions: precomputed {key}.regions.npz features
    # with their boxes; roi_align: a patch encoder (model.vision) pooled over the json boxes.
    visual_tokens: Literal["patches", "regions", "roi_align"] = "patches"
    max_regions: int = 36
    fusion: FusionConfig = field(default_factory=FusionConfig)
    init_text_from: str = ""  # a local Hugging Face BERT folder for the text embeddings/layers
    # pretraining: start from this vlp model directory's weights, shape and tokenizer
    # (vlp/recipes/init_from.py says which directories each recipe takes)
    init_from: str = ""


# --------------------------------------------------------------------------------------------
# Data, tokenizer, training, evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    # Shard specs (brace patterns, directories, `::`-joined lists, pipe: URLs). Empty: the
    # shapes world, generated once into `synth_dir`.
    train: str = ""
    val: str = ""
    synth_dir: str = ""  # empty: ~/.cache/vlp/shapes-<seed>-<images>
    synth_images: int = 20000
    synth_seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = False
    caption: Literal["random", "first"] = "random"


@dataclass
class TokenizerConfig:
    path: str = ""  # tokenizer.json or HF tokenizer folder; empty: train one on the captions
    vocab_size: int = 1000
    max_captions: int = 1_000_000  # a trained tokenizer reads at most this many, shard order


@dataclass
class TrainConfig:
    steps: int = 800  # optimizer steps
    batch_size: int = 128  # per process (DeepSpeed's train_micro_batch_size_per_gpu)
    grad_accum: int = 1  # micro-batches per optimizer step (each its own contrastive batch)
    # > 1: K micro-batches form ONE contrastive batch (GradCache: features cached without
    # graphs, the loss over all K x batch_size x processes rows, each micro-batch recomputed
    # with its feature gradients); recipe=dual_tower. An optimizer step takes
    # grad_accum x contrastive_accum micro-batches.
    contrastive_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 disables clipping
    # bf16: autocast with fp32 master weights (DeepSpeed torch_autocast); fp16: DeepSpeed fp16
    # with dynamic loss scaling (GPU only); fp32: none.
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_checkpointing: bool = False  # recompute Transformer blocks in backward (less memory)
    # DeepSpeed JSON (ZeRO stage, offload, communication...); empty: the built-in ZeRO-2 config,
    # the same as configs/deepspeed/zero2.json. Keys vlp sets from train.* must be "auto".
    deepspeed: str = ""
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # steps between checkpoints; 0 disables periodic checkpoints
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    threads: int = 0  # torch intra-op threads per process; 0: the cores / processes per node
    # Frozen towers (vlp/engine/optim.py): out of the optimizer, unchanged bit for bit.
    # lock_image: the whole image tower (OpenCLIP's --lock-image, LiT); with
    # lock_image_unlocked_layers=N its last N blocks (and the final norm and projection) train
    lock_image: bool = False
    lock_image_unlocked_layers: int = 0
    lock_text: bool = False  # the whole text tower (OpenCLIP's --lock-text)
    # Layer-wise lr decay (BEiT): block i of L (0-based) in each tower / single-stream encoder
    # trains at lr * layer_decay^(L - i), its embeddings at lr * layer_decay^(L + 1), everything
    # after the blocks at lr. 1: off
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0  # fine-tuning only: the task head trains at lr * head_lr_mult


@dataclass
class EvalConfig:
    batch_size: int = 256
    at_end: bool = True  # evaluate on data.val after training (all of it)
    every: int = 0  # > 0: also every this many steps (rank 0, the live weights)
    max_samples: int = 1000  # eval.every reads at most this many data.val samples; 0: all


@dataclass
class ObjectivesConfig:
    """The dual tower's contrastive loss; single-stream pretraining objectives (weights 0 turn
    one off)."""

    # recipe=dual_tower: clip (softmax InfoNCE, both directions) or siglip (a sigmoid per
    # pair, with a learnable bias: sets model.logit_bias=true and, unless given,
    # model.init_logit_scale=log 10, the paper's init)
    loss: Literal["clip", "siglip"] = "clip"
    mlm_prob: float = 0.15  # BERT: of these, 80% [MASK], 10% random token, 10% unchanged
    whole_word: bool = False  # mask all pieces of a word together
    mrm_prob: float = 0.15  # regions masked (features zeroed) for MRC / MRFR
    mlm_weight: float = 1.0
    mrc_weight: float = 1.0  # masked region classification against the region labels
    mrfr_weight: float = 1.0  # masked region feature regression (L2)
    itm_weight: float = 1.0  # image-text matching, negatives from the batch
    itm_neg_prob: float = 0.5


@dataclass
class LoggingConfig:
    tensorboard: bool = False  # also write OUT/tensorboard (needs `pip install tensorboard`)


@dataclass
class PretrainConfig:
    # dual_tower: CLIP (contrastive); single_stream: VL-BERT/UNITER (MLM, MRM, ITM);
    # combined: ALBEF-style ITC on the towers + ITM (hard negatives) and MLM on fusion layers
    recipe: Literal["dual_tower", "single_stream", "combined"] = "dual_tower"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)


# --------------------------------------------------------------------------------------------
# Fine-tuning (vlp finetune TASK): one config class, a block per task
# --------------------------------------------------------------------------------------------
@dataclass
class FinetuneDataConfig:
    """Where a benchmark's files are. Empty paths: the shapes world's benchmark files (generated
    into the cache when missing; `synth_*` pick which one)."""

    root: str = ""  # a benchmark folder; empty: the shapes world's `benchmarks/`
    images: str = ""  # image folder; empty: the task's default under `root`
    # per-image region files `{image file stem}.npz` (the regions.npz / bottom-up-attention
    # layout, vlp/data/regions.py); needed by single-stream `regions` / `roi_align` backbones.
    # Empty: ROOT/regions.
    regions: str = ""
    num_workers: int = 2
    synth_dir: str = ""
    synth_images: int = 20000
    synth_seed: int = 0


@dataclass
class VQATaskConfig:
    """VQA v2 files (official JSON). Empty: the shapes world's."""

    train_questions: str = ""
    train_annotations: str = ""
    val_questions: str = ""
    val_annotations: str = ""
    # image file name under data.images; {image_id} and {subtype} (the questions file's
    # data_subtype, e.g. train2014) are filled in. COCO 2014: COCO_{subtype}_{image_id:012d}.jpg
    image_pattern: str = "{image_id:012d}.jpg"
    num_answers: int = 3129  # the answer vocabulary: the most frequent N training answers
    max_question_length: int = 24  # tokens, with [CLS]/[SEP]
    # classify: a classifier over the answer vocabulary; generate: the answer decoded as text
    # by the prefix LM (open vocabulary); rank: the same trained prefix LM picks the most likely
    # answer of a list (vqa.answer_list, else the answer vocabulary)
    head: Literal["classify", "generate", "rank"] = "classify"
    max_answer_length: int = 8  # generate/rank: answer tokens, [SEP] included
    beam_size: int = 1  # generate: 1 = greedy; beams rank by summed log-probability
    answer_list: str = ""  # rank: a JSON list of candidate answers; empty: the vocabulary


@dataclass
class CaptionTaskConfig:
    """COCO captions with a Karpathy-style split (dataset_coco.json)."""

    karpathy: str = ""  # dataset_coco.json; empty: the shapes world's
    annotations: str = ""  # COCO captions JSON for scoring; empty: built from the Karpathy split
    max_length: int = 24  # generated tokens at most, and the training context
    beam_size: int = 3  # 1: greedy
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    label_smoothing: float = 0.1
    # self-critical sequence training (Rennie et al. 2017): reward CIDEr-D of sampled captions
    # minus the greedy caption's, instead of cross-entropy (vlp/tasks/caption.py)
    scst: bool = False
    scst_samples: int = 5  # captions sampled per training image and step
    # the reward's baseline: the greedy caption's CIDEr-D (Rennie et al.), or the mean of the
    # image's other samples' (Luo 2020, "a better variant of SCST"; needs scst_samples >= 2)
    scst_baseline: Literal["greedy", "mean"] = "greedy"
    # a fine-tuned caption model directory (OUT/model of a caption run) whose weights the run
    # starts from, e.g. SCST from the cross-entropy model; init_from still names the pretrained
    # directory both came from (architecture, tokenizer, transform)
    init_caption: str = ""


@dataclass
class VCRTaskConfig:
    """VCR's official jsonl + image/metadata folder (vcr1images)."""

    train: str = ""
    val: str = ""
    images: str = ""  # the folder img_fn / metadata_fn are relative to; empty: the shapes world's
    # tokens of question + answer (+ rationale); lowered to the backbone's text positions
    max_length: int = 48
    # evaluation scores each rationale given each of the 4 answers (the leaderboard CSV, 20
    # sequences a question); false: given the right answer only (JSON lines, 8 a question)
    condition_on_each_answer: bool = True


@dataclass
class RetrievalTaskConfig:
    """Caption/image pairs from a Karpathy-style split (COCO or Flickr30k dataset_*.json)."""

    karpathy: str = ""  # empty: the shapes world's dataset_coco.json
    rerank_k: int = 0  # > 0: re-rank each query's top k with the ITM head (fused backbones)


@dataclass
class RefCOCOTaskConfig:
    """The refer toolkit's files (RefCOCO / RefCOCO+ / RefCOCOg): refs(<splitBy>).p (or its
    .json copy) + instances.json; images under data.images."""

    refs: str = ""  # refs(unc).p or .json; empty: the shapes world's ROOT/refcoco/refs(unc).p
    instances: str = ""  # instances.json; empty: the one beside `refs`
    # per-image detected boxes {image file stem}.npz (the region-file layout; with features
    # for region backbones); empty: ROOT/refcoco/dets when it exists (else no det scores)
    dets: str = ""
    train_boxes: Literal["gt", "det"] = "gt"  # the candidates training picks from
    max_length: int = 24  # expression tokens, with [CLS]/[SEP]


@dataclass
class FinetuneEvalConfig:
    batch_size: int = 128
    split: Literal["val", "test"] = "test"  # scored at the end of the run (Karpathy: test)
    at_end: bool = True  # score eval.split with the official metric after training
    every: int = 0  # > 0: also every this many steps (rank 0, the live weights)
    per_epoch: bool = False  # also at the end of every epoch (sets `every` to an epoch's steps)
    # keep the best weights by this metric (higher is better: vqa_acc, CIDEr, Q->AR, rsum...)
    # as OUT/model, the last as OUT/model-last; empty: OUT/model is the last
    best_metric: str = ""


@dataclass
class FinetuneVisionConfig:
    """What a fine-tuning run may change of the pretrained image tower."""

    # 0: the size the model was trained at; else fine-tune at this size (BLIP, METER, LAVIS
    # fine-tune VQA and captioning above the pretraining resolution): learned patch positions
    # are resampled bicubically (vlp/models/resize.py), the image transform resizes to it
    image_size: int = 0
    # stochastic depth of the image encoder in this run (as model.vision.drop_path_rate in
    # pretraining; the pretraining run's rate is not inherited)
    drop_path_rate: float = 0.0


@dataclass
class FinetuneModelConfig:
    vision: FinetuneVisionConfig = field(default_factory=FinetuneVisionConfig)


def _finetune_train() -> TrainConfig:
    return TrainConfig(steps=1000, batch_size=64, lr=2e-4, min_lr=1e-6, warmup_steps=100,
                       weight_decay=0.01, save_every=250)


@dataclass
class FinetuneConfig:
    task: Literal["vqa", "caption", "vcr", "retrieval", "refcoco"] = "vqa"
    init_from: str = ""  # the pretrained model directory (OUT/model of `vlp pretrain`)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    epochs: float = 0.0  # > 0: train.steps becomes this many passes over the training split
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: TrainConfig = field(default_factory=_finetune_train)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    # dual-tower checkpoints have no joint layers: these fresh ones fuse their tokens, each
    # tower's projected into fusion.width (0: the text tower's width; norm_eps is the text
    # tower's); combined and single-stream checkpoints bring their own
    fusion: FusionConfig = field(default_factory=lambda: FusionConfig(width=0, layers=2))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vqa: VQATaskConfig = field(default_factory=VQATaskConfig)
    caption: CaptionTaskConfig = field(default_factory=CaptionTaskConfig)
    vcr: VCRTaskConfig = field(default_factory=VCRTaskConfig)
    retrieval: RetrievalTaskConfig = field(default_factory=RetrievalTaskConfig)
    refcoco: RefCOCOTaskConfig = field(default_factory=RefCOCOTaskConfig)


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a path such as `123` parsed by YAML as a number
    elif origin is tuple:  # tuple[int, ...]: a YAML list (or tuple) of ints
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"{key}={value!r} must be a list of {item.__name__}s, e.g. "
                          f"{key}=[2,2,6,2]")
    else:  # pragma: no cover - only the types above are used in the dataclasses
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {tp.__name__}")


def apply_dict(cfg: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of overrides to a dataclass instance in place, strictly."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {updates!r}")
    hints = _type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            valid = ", ".join(f"{prefix}{n}" for n in names)
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {valid}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, prefix=f"{key}.")
        else:
            setattr(cfg, name, _coerce(value, hints[name], key))


def parse_overrides(pairs: list[str]) -> dict:
    """`["train.steps=10", "data.train=a/{0..3}.tar"]` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. train.steps=100)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # text YAML cannot read (a path with `: `, say) is meant as text
        # Brace patterns like {00000..00009} parse as YAML mappings: keep them as strings. A
        # whole `[...]` is a list (model.vision.stage_depths=[2,2,6,2]); the key's type checks it.
        if isinstance(value, dict) or (isinstance(value, list) and not (
                raw.strip().startswith("[") and raw.strip().endswith("]"))):
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a missing file or a syntax error is one ConfigError
    naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got "
                          f"{type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = PretrainConfig, base: dict | None = None,
                given: set[str] | None = None) -> Any:
    """Defaults <- `base` (a resumed run's saved config) <- YAML file <- `key=value`
    overrides, each checked strictly. `given` (a set), when passed, receives the dotted keys
    some layer set explicitly (what derived defaults and model.init_from must not replace)."""
    cfg = cls()
    given = set() if given is None else given
    if base:
        apply_dict(cfg, base)
        given.update(flatten(base))
    if path is not None:
        try:
            data = read_yaml(path)
            apply_dict(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
        given.update(flatten(data))
    if overrides:
        updates = parse_overrides(overrides)
        apply_dict(cfg, updates)
        given.update(flatten(updates))
    derive(cfg, given)
    validate(cfg)
    return cfg


# SigLIP's initial temperature t' = log 10 (its bias starts at ModelConfig.init_logit_bias, -10;
# Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Sec. 3.2)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)


def derive(cfg: Any, given: set[str] | frozenset[str] = frozenset()) -> None:
    """Defaults that follow from other keys, filled in once before validation (so a run's
    config.yaml says what runs): objectives.loss=siglip gives the dual tower its logit bias and
    SigLIP's initial temperature, unless `given` (the dotted keys set explicitly) names them."""
    if not isinstance(cfg, PretrainConfig) or cfg.objectives.loss != "siglip":
        return
    if "model.logit_bias" not in given:
        cfg.model.logit_bias = True
    if "model.init_logit_scale" not in given:
        cfg.model.init_logit_scale = SIGLIP_INIT_LOGIT_SCALE


# What a resumed run may change: nothing already trained or read depends on these. train.steps
# (and fine-tuning's epochs) move the end of the run and so the rest of the LR schedule.
RESUME_SAFE = ("train.steps", "epochs", "train.save_every", "train.log_every",
               "train.keep_checkpoints", "train.max_bad_steps", "train.threads", "logging.",
               "eval.", "data.val", "data.num_workers")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, now: dict, source: str) -> list[str]:
    """The keys a resumed run changes from its saved config (`source` names it), as
    "key: old -> new" lines for the log; a change that cannot apply to a resumed run (batch
    size, data, model, optimizer...) raises ConfigError naming the key."""
    before, after = flatten(saved), flatten(now)
    changed = [k for k in after if k in before and before[k] != after[k]]
    unsafe = [k for k in changed if not any(k == s or (s.endswith(".") and k.startswith(s))
                                            for s in RESUME_SAFE)]
    if unsafe:
        k = unsafe[0]
        section = k.split(".")[0] if "." in k else "run"
        raise ConfigError(f"--resume continues a run whose {k}={before[k]!r} ({source}); this "
                          f"launch asks for {k}={after[k]!r}, which a resumed run cannot "
                          f"change{f' (also {unsafe[1:]})' if len(unsafe) > 1 else ''}. Resume "
                          f"with the {section} settings the checkpoint was written with (drop "
                          "the override), or start a new run with --out")
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed]


def validate(cfg: PretrainConfig | FinetuneConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if isinstance(cfg, FinetuneConfig):
        _validate_finetune(cfg)
        return
    if not isinstance(cfg, PretrainConfig):
        return
    v, t = cfg.model.vision, cfg.model.text
    if v.arch == "swin":
        _validate_swin(v)
    elif v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size={v.image_size} must be a multiple of "
                          f"model.vision.patch_size={v.patch_size}")
    elif v.roi_stage not in (0, -1):
        raise ConfigError(f"model.vision.roi_stage={v.roi_stage} is Swin's (a stage to pool "
                          "regions from); a ViT has one grid: leave it at -1")
    for name, tower in (("vision", v), ("text", t)):
        if name == "vision" and v.arch == "swin":
            continue  # its stages' heads are checked above
        if tower.width % tower.heads:
            raise ConfigError(f"model.{name}.width={tower.width} must be divisible by "
                              f"model.{name}.heads={tower.heads}")
    _validate_train(cfg.train)
    _validate_locks(cfg)
    check_drop_path(v.drop_path_rate)
    _validate_stem(v)
    tokens = cfg.model.visual_tokens
    if v.drop_path_rate and cfg.recipe == "single_stream" and not (
            tokens == "roi_align" or (tokens == "patches" and v.arch == "swin")):
        raise ConfigError(f"model.vision.drop_path_rate={v.drop_path_rate}: this single-stream "
                          f"model (visual_tokens={cfg.model.visual_tokens}, arch={v.arch}) has "
                          "no image encoder blocks to drop (a Swin, or roi_align's ViT, has)")
    positive = {"model.text.context_length": t.context_length,
                "tokenizer.max_captions": cfg.tokenizer.max_captions,
                "model.embed_dim": cfg.model.embed_dim, "eval.batch_size": cfg.eval.batch_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    for key in ("every", "max_samples"):
        if getattr(cfg.eval, key) < 0:
            raise ConfigError(f"eval.{key}={getattr(cfg.eval, key)} must be >= 0")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    _validate_inits(cfg)
    f = cfg.model.fusion
    if cfg.recipe == "single_stream":
        if f.width % f.heads:
            raise ConfigError(f"model.fusion.width={f.width} must be divisible by "
                              f"model.fusion.heads={f.heads}")
        if f.max_positions < t.context_length:
            raise ConfigError(f"model.fusion.max_positions={f.max_positions} must be >= "
                              f"model.text.context_length={t.context_length}")
        if cfg.model.max_regions <= 0:
            raise ConfigError(f"model.max_regions={cfg.model.max_regions} must be > 0")
    if cfg.recipe == "combined":
        if f.width % f.heads:
            raise ConfigError(f"model.fusion.width={f.width} must be divisible by "
                              f"model.fusion.heads={f.heads}")
        if t.mask != "bidirectional" and not cfg.model.init_from:  # else DIR's: checked there
            raise ConfigError("recipe=combined runs MLM on the text tower: set "
                              "model.text.mask=bidirectional (and model.text.pool=cls)")
    o = cfg.objectives
    if o.loss == "siglip" and cfg.recipe != "dual_tower":
        raise ConfigError(f"objectives.loss=siglip is the dual tower's loss; recipe="
                          f"{cfg.recipe} has its own objectives (use recipe=dual_tower)")
    if o.loss == "siglip" and not cfg.model.logit_bias:
        raise ConfigError("objectives.loss=siglip trains the dual tower's logit bias, and "
                          "model.logit_bias=False (given, or model.init_from's directory's) has "
                          "none: drop model.logit_bias=false, or start from a directory "
                          "trained with objectives.loss=siglip")
    if o.loss == "clip" and cfg.model.logit_bias:
        raise ConfigError("model.logit_bias=True (given, or model.init_from's directory's) "
                          "with objectives.loss=clip: only SigLIP's loss trains the bias; use "
                          "objectives.loss=siglip")
    if cfg.train.contrastive_accum > 1 and cfg.recipe != "dual_tower":
        raise ConfigError(f"train.contrastive_accum={cfg.train.contrastive_accum} runs with "
                          f"recipe=dual_tower only (recipe={cfg.recipe} has matching and "
                          "masked-token losses that GradCache does not split); use "
                          "train.grad_accum there")
    for key in ("mlm_prob", "mrm_prob", "itm_neg_prob"):
        if not 0.0 <= getattr(o, key) <= 1.0:
            raise ConfigError(f"objectives.{key}={getattr(o, key)} must be within [0, 1]")


def _validate_inits(cfg: PretrainConfig) -> None:
    """Where each tower's init_from applies, and what a BERT text tower needs."""
    m = cfg.model
    towers = cfg.recipe in ("dual_tower", "combined")
    for key, value in (("model.vision.init_from", m.vision.init_from),
                       ("model.text.init_from", m.text.init_from)):
        if value and not towers:
            hint = " (the single stream's BERT is model.init_text_from)" if "text" in key else ""
            raise ConfigError(f"{key}={value!r} starts a tower of recipe=dual_tower or "
                              f"combined; recipe={cfg.recipe} has none{hint}")
    if m.init_text_from and cfg.recipe != "single_stream":
        raise ConfigError(f"model.init_text_from={m.init_text_from!r} is the single stream's "
                          f"BERT; for recipe={cfg.recipe}'s text tower use "
                          "model.text.init_from")
    t = m.text
    if t.init_from:
        if t.mask != "bidirectional":
            raise ConfigError(f"model.text.mask={t.mask} cannot run BERT weights "
                              f"(model.text.init_from={t.init_from!r}): BERT attends both ways; "
                              "set model.text.mask=bidirectional")
        if t.pool == "eos":
            raise ConfigError(f"model.text.pool=eos with BERT (model.text.init_from="
                              f"{t.init_from!r}): BERT's sentence token is [CLS]; set "
                              "model.text.pool=cls (or mean)")


def _validate_train(t: TrainConfig) -> None:
    """The train block's ranges (both kinds of run)."""
    for key in ("steps", "batch_size", "grad_accum", "contrastive_accum", "log_every",
                "max_bad_steps"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
    for key in ("warmup_steps", "save_every", "keep_checkpoints", "threads"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    for key, low, low_ok, high in (("lr", 0.0, False, math.inf), ("min_lr", 0.0, True, math.inf),
                                   ("weight_decay", 0.0, True, math.inf),
                                   ("eps", 0.0, False, math.inf),
                                   ("grad_clip", 0.0, True, math.inf),
                                   ("beta1", 0.0, True, 1.0), ("beta2", 0.0, True, 1.0)):
        value = getattr(t, key)
        if not (math.isfinite(value) and (value > low or (low_ok and value == low))
                and value < high):
            valid = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high < math.inf
                                                         else "")
            raise ConfigError(f"train.{key}={value} is not valid: a finite number {valid}")
    if not (math.isfinite(t.layer_decay) and 0.0 < t.layer_decay <= 1.0):
        raise ConfigError(f"train.layer_decay={t.layer_decay} is not valid: a number in (0, 1] "
                          "(1: no decay; BEiT fine-tunes ViT-B with 0.65)")
    if not (math.isfinite(t.head_lr_mult) and t.head_lr_mult > 0.0):
        raise ConfigError(f"train.head_lr_mult={t.head_lr_mult} is not valid: a finite number "
                          "> 0 (1: the head trains at train.lr)")
    if t.lock_image_unlocked_layers < 0:
        raise ConfigError(f"train.lock_image_unlocked_layers={t.lock_image_unlocked_layers} "
                          "must be >= 0")
    if t.lock_image_unlocked_layers and not t.lock_image:
        raise ConfigError(f"train.lock_image_unlocked_layers={t.lock_image_unlocked_layers} "
                          "keeps blocks of a frozen image tower trainable: set "
                          "train.lock_image=true too")


def _validate_locks(cfg: PretrainConfig) -> None:
    """train.lock_* / head_lr_mult against the pretraining model's towers (a fine-tuning
    run's model comes from init_from: vlp/engine/optim.py checks it when it is built)."""
    tr, v = cfg.train, cfg.model.vision
    single = cfg.recipe == "single_stream"
    if tr.lock_text and single:
        raise ConfigError("train.lock_text=true: recipe=single_stream has no text tower (words "
                          "enter the one joint Transformer); drop train.lock_text")
    if tr.lock_image and single and cfg.model.visual_tokens != "roi_align":
        raise ConfigError(f"train.lock_image=true: recipe=single_stream with "
                          f"model.visual_tokens={cfg.model.visual_tokens} has no image tower "
                          "(only model.visual_tokens=roi_align has one); drop train.lock_image")
    blocks = sum(v.stage_depths) if v.arch == "swin" and not single else v.layers
    if tr.lock_image and tr.lock_image_unlocked_layers > blocks:
        raise ConfigError(f"train.lock_image_unlocked_layers={tr.lock_image_unlocked_layers} but "
                          f"the image tower has {blocks} blocks; choose 0..{blocks}")
    if tr.head_lr_mult != 1.0:
        raise ConfigError(f"train.head_lr_mult={tr.head_lr_mult}: pretraining has no task head "
                          "(the key is for vlp finetune); drop it")


def _validate_stem(v: VisionConfig) -> None:
    if v.stem != "conv":
        return
    if v.arch == "swin":
        raise ConfigError("model.vision.stem=conv is the ViT's convolutional stem; a Swin tower "
                          "has its own patch partition: leave model.vision.stem=patch")
    if v.patch_size < 2 or v.patch_size & (v.patch_size - 1):
        raise ConfigError(f"model.vision.stem=conv halves the image per convolution: "
                          f"model.vision.patch_size={v.patch_size} must be a power of two "
                          "(2, 4, 8, 16, ...)")
    if v.stem_channels <= 0:
        raise ConfigError(f"model.vision.stem_channels={v.stem_channels} must be > 0")


def _validate_swin(v: VisionConfig) -> None:
    for key in ("stage_depths", "stage_heads"):
        value = getattr(v, key)
        if not (isinstance(value, (list, tuple)) and value and all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)):
            raise ConfigError(f"model.vision.{key}={list(value)!r} must be a list of positive "
                              "ints, one per stage, e.g. [2, 2, 6, 2]")
    if len(v.stage_depths) != len(v.stage_heads):
        raise ConfigError(f"model.vision.stage_depths={list(v.stage_depths)} and "
                          f"model.vision.stage_heads={list(v.stage_heads)} need one entry per "
                          "stage each")
    for s, heads in enumerate(v.stage_heads):
        if (v.width * 2 ** s) % heads:
            raise ConfigError(f"model.vision.stage_heads[{s}]={heads} must divide stage {s}'s "
                              f"width {v.width * 2 ** s} (model.vision.width={v.width} * 2^{s})")
    for key in ("window_size", "patch_size", "image_size"):
        if getattr(v, key) <= 0:
            raise ConfigError(f"model.vision.{key}={getattr(v, key)} must be > 0")
    if v.pool != "mean":
        raise ConfigError("model.vision.pool=cls: a Swin tower has no class token; set "
                          "model.vision.pool=mean (its tokens are averaged, as Swin does)")
    n = len(v.stage_depths)
    if not -n <= v.roi_stage < n:
        raise ConfigError(f"model.vision.roi_stage={v.roi_stage} is not a stage of this "
                          f"{n}-stage Swin: use 0..{n - 1}, or -1 for the last")


def check_drop_path(rate: float, key: str = "model.vision.drop_path_rate") -> None:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"{key}={rate} must be in [0, 1): the largest per-block drop "
                          "probability (0.1-0.2 is usual; 0: off)")


def _validate_finetune(cfg: FinetuneConfig) -> None:
    _validate_train(cfg.train)
    check_drop_path(cfg.model.vision.drop_path_rate)
    if cfg.train.contrastive_accum != 1:
        raise ConfigError(f"train.contrastive_accum={cfg.train.contrastive_accum}: fine-tuning "
                          "tasks take one contrastive batch per micro-batch; use "
                          "train.grad_accum (contrastive_accum is for dual-tower pretraining)")
    positive = {"eval.batch_size": cfg.eval.batch_size,
                "vqa.num_answers": cfg.vqa.num_answers,
                "vqa.max_answer_length": cfg.vqa.max_answer_length,
                "vqa.beam_size": cfg.vqa.beam_size,
                "caption.max_length": cfg.caption.max_length,
                "caption.beam_size": cfg.caption.beam_size, "vcr.max_length": cfg.vcr.max_length}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not math.isfinite(cfg.epochs):
        raise ConfigError(f"epochs={cfg.epochs} must be a finite number >= 0")
    for key, value in (("epochs", cfg.epochs), ("data.num_workers", cfg.data.num_workers),
                       ("retrieval.rerank_k", cfg.retrieval.rerank_k),
                       ("eval.every", cfg.eval.every),
                       ("model.vision.image_size", cfg.model.vision.image_size)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0.0 <= cfg.caption.label_smoothing < 1.0:
        raise ConfigError(f"caption.label_smoothing={cfg.caption.label_smoothing} must be within "
                          "[0, 1)")
    if cfg.caption.scst_samples < 1:
        raise ConfigError(f"caption.scst_samples={cfg.caption.scst_samples} must be >= 1 "
                          "(captions sampled per image for self-critical training)")
    if cfg.caption.scst_baseline == "mean" and cfg.caption.scst_samples < 2:
        raise ConfigError(f"caption.scst_baseline=mean averages the other samples' rewards: "
                          f"it needs caption.scst_samples >= 2 (now {cfg.caption.scst_samples})")


def to_dict(cfg: Any) -> dict:
    """The config as plain data, as YAML/JSON hold it: tuple-typed keys (stage_depths) as
    lists, so a dict from a file and one from a live config compare equal."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(cfg))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a dataclass (e.g. ModelConfig from a model directory's config.json), strictly."""
    cfg = cls()
    apply_dict(cfg, data)
    return cfg
