"""The dual-tower (CLIP) recipe: contrastive loss over all processes' features; the model
directory is a `vlp.load`-able `Pretrained`; evaluation is zero-shot retrieval."""
from __future__ import annotations

from pathlib import Path

import torch

from vlp.api import Pretrained
from vlp.config import PretrainConfig
from vlp.data.transforms import ImageTransform
from vlp.models import DualTower
from vlp.objectives import clip_loss, distributed_clip_loss
from vlp.tokenizer import Tokenizer


class DualTowerRecipe:
    name = "dual_tower"
    metric_names = ("logit_scale",)

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._loss = distributed_clip_loss if world_size > 1 else clip_loss

    def loader_kwargs(self) -> dict:
        return {}

    def build_model(self) -> DualTower:
        return DualTower(self.cfg.model, self.tokenizer.vocab_size)

    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        pixels = batch.pixel_values.to(engine.device, engine.input_dtype)
        image_features, text_features, scale = engine(
            pixels, batch.input_ids.to(engine.device), batch.attention_mask.to(engine.device))
        loss = self._loss(image_features.float(), text_features.float(),
                          scale.float())["contrastive_loss"]
        return loss, [float(scale.detach())]

    def finish(self, weights: dict, out_dir: Path, val_spec: str, progress: bool) -> dict:
        model = self.build_model()
        model.load_state_dict(weights)
        eval_tf = ImageTransform(self.cfg.model.vision.image_size, train=False)
        pretrained = Pretrained(model, self.tokenizer, eval_tf)
        pretrained.save(out_dir / "model")
        if not (self.cfg.eval.at_end and val_spec):
            return {}
        from vlp.eval.retrieval import evaluate_retrieval, format_table

        metrics = evaluate_retrieval(pretrained, val_spec, batch_size=self.cfg.eval.batch_size,
                                     progress=progress)
        print(format_table(metrics))
        return metrics
