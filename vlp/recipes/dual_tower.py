"""The dual-tower (CLIP) recipe: contrastive loss over all processes' features; the model
directory is a `vlp.load`-able dual tower; evaluation is zero-shot retrieval on data.val.

Either tower can start from published weights (`resolve_tower_inits`, `init_towers`):
model.vision.init_from (a vision-tower directory, or a dual-tower / combined model directory's
image tower) and model.text.init_from (a Hugging Face BERT folder). The combined recipe builds
its towers the same way.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from vlp.config import ConfigError, PretrainConfig, validate
from vlp.engine.task import Task
from vlp.eval.retrieval import evaluate_retrieval, format_table
from vlp.models import DualTower
from vlp.models.bert_init import bert_shape, read_bert_config
from vlp.models.pretrained import Pretrained
from vlp.models.towers import adopt_shape, adopt_vision_shape, init_towers
from vlp.objectives import clip_loss, distributed_clip_loss
from vlp.recipes.init_from import load_start, start_transform
from vlp.tokenizer import Tokenizer


def resolve_tower_inits(cfg: PretrainConfig) -> tuple[PretrainConfig, list[str]]:
    """The run's config with the shapes its towers' init_from directories imply: each tower
    takes its checkpoint's shape where its keys keep their defaults (a key set to something
    else is refused by name), a BERT text tower is post-LN, and without tokenizer.path the BERT
    folder's vocabulary becomes the tokenizer. Returns (the resolved copy, what changed, for
    the log); `cfg` itself is left as given. Resolving a resolved config changes nothing."""
    vision, text, tokenizer = cfg.model.vision, cfg.model.text, cfg.tokenizer
    changed: list[str] = []
    if vision.init_from:
        vision, more = adopt_vision_shape(vision, vision.init_from)
        changed += more
    if text.init_from:
        bert = read_bert_config(text.init_from)
        source = str(Path(text.init_from) / "config.json")
        text, more = adopt_shape(text, bert_shape(bert), "model.text", source)
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
    """The config a dual-tower or combined recipe builds its towers from: `cfg` resolved
    (resolve_tower_inits), refusing by name what the run has already used unresolved (the
    image size of its data transform, the tokenizer)."""
    resolved, _ = resolve_tower_inits(cfg)
    v, rv = cfg.model.vision, resolved.model.vision
    if rv.image_size != v.image_size:
        raise ConfigError(f"model.vision.init_from={v.init_from!r} was trained at image_size="
                          f"{rv.image_size}: set model.vision.image_size={rv.image_size}")
    if cfg.model.text.init_from:
        bert_vocab = read_bert_config(cfg.model.text.init_from)["vocab_size"]
        if bert_vocab != tokenizer.vocab_size:
            raise ConfigError(f"model.text.init_from has a {bert_vocab}-token vocabulary but the "
                              f"tokenizer ({cfg.tokenizer.path or 'trained on the captions'}) "
                              f"has {tokenizer.vocab_size}; use the BERT folder's own "
                              f"(tokenizer.path={cfg.model.text.init_from})")
    return resolved


class DualTowerRecipe(Task):
    name = "dual_tower"
    metric_names = ("logit_scale",)

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int,
                 val_spec: str = ""):
        self.cfg, self.tokenizer, self.val_spec = check_tower_inits(cfg, tokenizer), \
            tokenizer, val_spec
        self.eval_transform = start_transform(cfg, train=False)
        self._loss = distributed_clip_loss if world_size > 1 else clip_loss

    def loader_kwargs(self) -> dict:
        """Extra make_loader arguments: none, the image is the visual input."""
        return {}

    def build_model(self, pretrained: bool = True) -> DualTower:
        model = DualTower(self.cfg.model, self.tokenizer.vocab_size)
        if pretrained:
            log_lines(init_towers(model))
            load_start(model, self.cfg)
        return model

    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        pixels = batch.pixel_values.to(engine.device, engine.input_dtype)
        image_features, text_features, scale = engine(
            pixels, batch.input_ids.to(engine.device), batch.attention_mask.to(engine.device))
        loss = self._loss(image_features.float(), text_features.float(),
                          scale.float())["contrastive_loss"]
        return loss, [float(scale.detach())]

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
