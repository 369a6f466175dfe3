"""The dual-tower (CLIP) recipe: contrastive loss over all processes' features; the model
directory is a `vlp.load`-able dual tower; evaluation is zero-shot retrieval on data.val."""
from __future__ import annotations

from pathlib import Path

import torch

from vlp.config import PretrainConfig
from vlp.engine.task import Task
from vlp.eval.retrieval import evaluate_retrieval, format_table
from vlp.models import DualTower
from vlp.models.pretrained import Pretrained
from vlp.objectives import clip_loss, distributed_clip_loss
from vlp.recipes.init_from import load_start, start_transform
from vlp.tokenizer import Tokenizer


class DualTowerRecipe(Task):
    name = "dual_tower"
    metric_names = ("logit_scale",)

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int,
                 val_spec: str = ""):
        self.cfg, self.tokenizer, self.val_spec = cfg, tokenizer, val_spec
        self.eval_transform = start_transform(cfg, train=False)
        self._loss = distributed_clip_loss if world_size > 1 else clip_loss

    def loader_kwargs(self) -> dict:
        """Extra make_loader arguments: none, the image is the visual input."""
        return {}

    def build_model(self, pretrained: bool = True) -> DualTower:
        model = DualTower(self.cfg.model, self.tokenizer.vocab_size)
        if pretrained:
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
