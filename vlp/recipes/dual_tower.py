"""The dual-tower (CLIP) recipe: contrastive loss over all processes' features (CLIP's
InfoNCE, or SigLIP's sigmoid loss with `objectives.loss=siglip`); the model directory is a
`vlp.load`-able dual tower; evaluation is zero-shot retrieval on data.val.

The loss is split into `embed` (one forward: features and the temperature/bias) and
`embedding_loss` (the loss on them), so that `train.contrastive_accum` can compute the loss of
several micro-batches at once (GradCache, vlp/engine/gradcache.py).

Either tower can start from published weights (`resolve_tower_inits`, `init_towers`):
model.vision.init_from (a vision-tower directory, or a dual-tower / combined model directory's
image tower) and model.text.init_from (a Hugging Face BERT folder). The combined recipe builds
its towers the same way.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from vlp.config import ConfigError, PretrainConfig, flatten, to_dict, validate
from vlp.engine.task import Task
from vlp.eval.retrieval import evaluate_retrieval, format_table
from vlp.models import DualTower
from vlp.models.bert_init import bert_shape, read_bert_config
from vlp.models.pretrained import Pretrained
from vlp.models.towers import adopt_shape, adopt_vision_shape, init_towers
from vlp.objectives import clip_loss, distributed_clip_loss, siglip_loss
from vlp.recipes.init_from import load_start, start_transform
from vlp.tokenizer import Tokenizer


def resolve_tower_inits(cfg: PretrainConfig, given: set[str] | None = None
                        ) -> tuple[PretrainConfig, list[str]]:
    """The run's config with the shapes its towers' init_from directories imply: each tower
    takes its checkpoint's shape where the run does not set the key (a key set to another
    value is refused by name; a ViT's image size may be set: its positions are resampled), a
    BERT text tower is post-LN, and without tokenizer.path the BERT folder's vocabulary becomes
    the tokenizer. `given`: the dotted keys the run set (None: values other than the defaults
    count as set). Returns (the resolved copy, what changed, for the log); `cfg` itself is
    left as given. Resolving a resolved config changes nothing. With model.init_from the whole
    model is that directory's, and its towers' init_from are not read."""
    if cfg.model.init_from:
        return cfg, []
    vision, text, tokenizer = cfg.model.vision, cfg.model.text, cfg.tokenizer
    changed: list[str] = []
    if vision.init_from:
        vision, more = adopt_vision_shape(vision, vision.init_from, given)
        changed += more
    if text.init_from:
        bert = read_bert_config(text.init_from)
        source = str(Path(text.init_from) / "config.json")
        text, more = adopt_shape(text, bert_shape(bert), "model.text", source, given=given)
        changed += more
        if text.context_length > bert["max_position_embeddings"]:
            raise ConfigError(f"model.text.context_length={text.context_length} is longer than "
                              f"{source}'s max_position_embeddings="
                              f"{bert['max_position_embeddings']}")
        if text.vocab_size and text.vocab_size != bert["vocab_size"]:
            raise ConfigError(f"model.text.vocab_size={text.vocab_size} but {source} has "
                              f"vocab_size={bert['vocab_size']}; drop the override")
        if not tokenizer.path:
            tokenizer = replace(tokenizer, path=text.init_from)
            changed.append(f"tokenizer.path={text.init_from}")
    if not changed:
        return cfg, []
    resolved = replace(cfg, model=replace(cfg.model, vision=vision, text=text),
                       tokenizer=tokenizer)
    validate(resolved)  # e.g. a Swin tower taken by a recipe that runs ViT tokens only
    return resolved, changed


def log_lines(lines: list[str]) -> None:
    """Print on the first process only (every process builds the model)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for line in lines:
            print(line)


def check_tower_inits(cfg: PretrainConfig, tokenizer: Tokenizer) -> PretrainConfig:
    """`cfg` checked to be resolved for its towers' init_from (`pretrain` resolves it before
    the data transforms and the tokenizer are made): every shape key the directories fix equal
    to theirs, the BERT folder's vocabulary the tokenizer's. A ConfigError names the first key
    that is not."""
    resolve_tower_inits(cfg, given=set(flatten(to_dict(cfg))))  # adopts nothing, refuses
    if cfg.model.text.init_from and not cfg.model.init_from:
        bert_vocab = read_bert_config(cfg.model.text.init_from)["vocab_size"]
        if bert_vocab != tokenizer.vocab_size:
            raise ConfigError(f"model.text.init_from has a {bert_vocab}-token vocabulary but the "
                              f"tokenizer ({cfg.tokenizer.path or 'trained on the captions'}) "
                              f"has {tokenizer.vocab_size}; use the BERT folder's own "
                              f"(tokenizer.path={cfg.model.text.init_from})")
    return cfg


class DualTowerRecipe(Task):
    name = "dual_tower"
    metric_names = ("logit_scale",)

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int,
                 val_spec: str = ""):
        self.cfg, self.tokenizer, self.val_spec = check_tower_inits(cfg, tokenizer), \
            tokenizer, val_spec
        self.eval_transform = start_transform(cfg, train=False)
        self.siglip = cfg.objectives.loss == "siglip"
        if self.siglip != cfg.model.logit_bias:  # load_config derives one from the other
            raise ConfigError(f"objectives.loss={cfg.objectives.loss} needs model.logit_bias="
                              f"{self.siglip} (the bias is SigLIP's)")
        if self.siglip:
            self.metric_names = ("logit_scale", "logit_bias")
        self._clip = distributed_clip_loss if world_size > 1 else clip_loss

    def loader_kwargs(self) -> dict:
        """Extra make_loader arguments: none, the image is the visual input."""
        return {}

    def build_model(self, pretrained: bool = True) -> DualTower:
        model = DualTower(self.cfg.model, self.tokenizer.vocab_size)
        if pretrained:
            log_lines(init_towers(model))
            load_start(model, self.cfg)
        return model

    def embed(self, engine, batch) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """One forward: ((image features, text features) (B, D) each, (scale[, bias])), fp32."""
        pixels = batch.pixel_values.to(engine.device, engine.input_dtype)
        image_features, text_features, *shared = engine(
            pixels, batch.input_ids.to(engine.device), batch.attention_mask.to(engine.device))
        return (image_features.float(), text_features.float()), tuple(s.float() for s in shared)

    def embedding_loss(self, rows, shared) -> tuple[torch.Tensor, list[float]]:
        """The loss of this process's rows against every process's (local-loss form)."""
        (image_features, text_features), (scale, *bias) = rows, shared
        if self.siglip:
            loss = siglip_loss(image_features, text_features, scale, bias[0])
        else:
            loss = self._clip(image_features, text_features, scale)
        return loss["contrastive_loss"], [float(s.detach()) for s in shared]

    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        return self.embedding_loss(*self.embed(engine, batch))

    def save_model(self, model: DualTower, folder: Path) -> Path:
        return Pretrained(model, self.tokenizer, self.eval_transform).save(folder)

    def evaluate(self, model: DualTower, out_dir: Path, progress: bool,
                 max_samples: int = 0) -> dict:
        if not self.val_spec:
            return {}
        device = next(model.parameters()).device
        pretrained = Pretrained(model, self.tokenizer, self.eval_transform, device)
        metrics = evaluate_retrieval(pretrained, self.val_spec,
                                     batch_size=self.cfg.eval.batch_size, progress=progress,
                                     max_samples=max_samples)
        print(format_table(metrics))
        return metrics
