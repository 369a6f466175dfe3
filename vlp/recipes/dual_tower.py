"""The dual-tower (CLIP) recipe: contrastive loss over all processes' features (CLIP's
InfoNCE, or SigLIP's sigmoid loss with `objectives.loss=siglip`); the model directory is a
`vlp.load`-able dual tower; evaluation is zero-shot retrieval on data.val.

The loss is split into `embed` (one forward: features and the temperature/bias) and
`embedding_loss` (the loss on them), so that `train.contrastive_accum` can compute the loss of
several micro-batches at once (GradCache, vlp/engine/gradcache.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from vlp.config import ConfigError, PretrainConfig
from vlp.data.transforms import ImageTransform
from vlp.engine.task import Task
from vlp.eval.retrieval import evaluate_retrieval, format_table
from vlp.models import DualTower
from vlp.models.pretrained import Pretrained
from vlp.objectives import clip_loss, distributed_clip_loss, siglip_loss
from vlp.tokenizer import Tokenizer


class DualTowerRecipe(Task):
    name = "dual_tower"
    metric_names = ("logit_scale",)

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int,
                 val_spec: str = ""):
        self.cfg, self.tokenizer, self.val_spec = cfg, tokenizer, val_spec
        self.eval_transform = ImageTransform(cfg.model.vision.image_size, train=False)
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
        return DualTower(self.cfg.model, self.tokenizer.vocab_size)

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
