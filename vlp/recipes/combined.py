"""The combined recipe (ALBEF style): ITC on the dual tower's encoders (over all processes'
features) + ITM with contrastive hard negatives (vlp/objectives/matching.py) + MLM, both on
fusion layers over the two encoders' tokens (vlp/models/combined.py). One forward per step.

The model directory (architecture `combined`) loads with `vlp.load` as a dual tower (retrieval
and zero-shot work as for a dual-tower run) and also holds the fusion layers and heads
(combined.safetensors). Evaluation: retrieval through the towers, and the fused model's MLM
on colour/shape words and ITM, with and without the image.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vlp import modeldir
from vlp.config import ConfigError, PretrainConfig, to_dict
from vlp.data.pipeline import make_loader
from vlp.engine.task import Task
from vlp.eval.retrieval import evaluate_retrieval, format_table
from vlp.eval.single_stream import Accuracy, attribute_token_ids
from vlp.models.combined import Combined
from vlp.models.pretrained import Pretrained
from vlp.models.towers import init_towers
from vlp.objectives import classification_loss, clip_loss, distributed_clip_loss, \
    sample_matching_pairs
from vlp.objectives.masking import IGNORE, continuation_table, mask_tokens, mask_words, \
    special_token_ids
from vlp.recipes.dual_tower import check_tower_inits, log_lines
from vlp.recipes.init_from import load_start, start_transform
from vlp.tokenizer import Tokenizer

TIED = "mlm_head.word_embeddings.weight"  # the MLM decoder is the word embeddings, stored once


class CombinedRecipe(Task):
    name = "combined"
    metric_names = ("itc_loss", "itm_loss", "itm_acc", "mlm_loss", "mlm_acc", "logit_scale")

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int,
                 val_spec: str = ""):
        if tokenizer.mask_id is None:
            raise ConfigError("the combined recipe masks words: the tokenizer has no [MASK] token")
        self.cfg, self.tokenizer, self.val_spec = check_tower_inits(cfg, tokenizer), \
            tokenizer, val_spec
        self.eval_transform = start_transform(cfg, train=False)
        self._itc = distributed_clip_loss if world_size > 1 else clip_loss
        self.special_ids = special_token_ids(tokenizer)
        self.continuation = continuation_table(tokenizer) if cfg.objectives.whole_word else None

    def loader_kwargs(self) -> dict:
        return {}

    def build_model(self, pretrained: bool = True) -> Combined:
        model = Combined(self.cfg.model, self.tokenizer.vocab_size)
        if pretrained:  # the towers' init_from, as the dual-tower recipe's
            log_lines(init_towers(model.towers, mlm_head=model.mlm_head))
            load_start(model, self.cfg)
        return model

    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        o, dev = self.cfg.objectives, engine.device
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        masked, labels = mask_tokens(ids, mask, prob=o.mlm_prob, special_ids=self.special_ids,
                                     mask_id=self.tokenizer.mask_id,
                                     vocab_size=self.tokenizer.vocab_size,
                                     continuation=self.continuation)
        out = engine(batch.pixel_values.to(dev, engine.input_dtype), ids, mask, masked, labels,
                     negatives=sample_matching_pairs)
        metrics: dict[str, float] = {}
        itc = self._itc(out["image_features"].float(), out["text_features"].float(),
                        out["logit_scale"].float())["contrastive_loss"]
        metrics["itc_loss"] = float(itc.detach())
        itm = classification_loss(out["itm_logits"], out["itm_labels"], metrics, "itm")
        mlm = classification_loss(out["mlm_logits"], labels[labels != IGNORE], metrics, "mlm")
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        total = itc + o.itm_weight * itm + o.mlm_weight * mlm
        return total, [metrics.get(n, float("nan")) for n in self.metric_names]

    def save_model(self, model: Combined, folder: Path) -> Path:
        # model.safetensors: the towers, so vlp.load reads it as a dual tower
        everything = {k: v for k, v in model.state_dict().items() if k != TIED}
        return modeldir.write(folder, "combined", {"model": to_dict(model.towers.cfg)},
                              model.towers.state_dict(), self.tokenizer, self.eval_transform,
                              extra_weights={modeldir.COMBINED_WEIGHTS: everything})

    def evaluate(self, model: Combined, out_dir: Path, progress: bool,
                 max_samples: int = 0) -> dict:
        if not self.val_spec:
            return {}
        device = next(model.parameters()).device
        towers = Pretrained(model.towers, self.tokenizer, self.eval_transform, device)
        metrics = evaluate_retrieval(towers, self.val_spec, batch_size=self.cfg.eval.batch_size,
                                     progress=progress, max_samples=max_samples)
        print(format_table(metrics))
        metrics.update(self._fused_metrics(model, progress, max_samples))
        print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items() if "mlm" in k or "itm" in k))
        return metrics

    @torch.no_grad()
    def _fused_metrics(self, model: Combined, progress: bool, max_samples: int = 0) -> dict:
        """MLM on every colour/shape word and ITM (positives and hard negatives), with the
        image and with it blanked (see vlp/eval/single_stream.py)."""
        device = next(model.parameters()).device
        loader = make_loader(self.val_spec, tokenizer=self.tokenizer,
                             transform=self.eval_transform, batch_size=self.cfg.eval.batch_size,
                             context_length=self.cfg.model.text.context_length, num_workers=0,
                             shuffle_buffer=0, seed=0, caption="first", drop_last=False)
        attr = attribute_token_ids(self.tokenizer)
        acc = {k: Accuracy() for k in ("attr_mlm", "attr_mlm_text_only", "itm",
                                       "itm_text_only")}
        # hard negatives are sampled: a fixed generator, so the figure is repeatable
        negatives = partial(sample_matching_pairs,
                            generator=torch.Generator(device).manual_seed(0))
        seen = 0
        for batch in tqdm(loader, desc="eval fused", unit="batch", disable=not progress):
            if max_samples and seen >= max_samples:
                break
            if not len(batch):
                continue
            seen += len(batch)
            batch = batch.to(device)
            ids, mask = batch.input_ids, batch.attention_mask
            masked, labels, _ = mask_words(ids, mask, attr.to(device), self.tokenizer.mask_id)
            for blank, suffix in ((False, ""), (True, "_text_only")):
                out = model(batch.pixel_values, ids, mask, masked, labels, blank_visual=blank,
                            negatives=negatives)
                acc["attr_mlm" + suffix].add(out["mlm_logits"], labels[labels != IGNORE])
                acc["itm" + suffix].add(out["itm_logits"], out["itm_labels"])
        return {f"{k}_acc": a.value() for k, a in acc.items() if a.total}
