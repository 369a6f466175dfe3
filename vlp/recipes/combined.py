"""The combined recipe (ALBEF style): ITC on the dual tower's encoders (over all processes'
features) + ITM with contrastive hard negatives + MLM, both on fusion layers over the two
encoders' tokens (vlp/models/combined.py). One forward per step.

The model directory is the dual tower (`vlp.load`-able, so retrieval and zero-shot work as for
a dual-tower run) plus the fusion layers: `model/` holds every weight, `config.json` says
`architecture: combined`. Evaluation: retrieval through the towers, and the fused model's
MLM on colour/shape words and ITM, with and without the image.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.api import Pretrained
from vlp.config import ConfigError, PretrainConfig, to_dict
from vlp.data.transforms import ImageTransform
from vlp.models.combined import Combined
from vlp.objectives import clip_loss, distributed_clip_loss
from vlp.objectives.masking import IGNORE, continuation_table, mask_tokens, mask_words, \
    special_token_ids
from vlp.recipes.single_stream import SingleStreamRecipe
from vlp.tokenizer import Tokenizer


class CombinedRecipe:
    name = "combined"
    metric_names = ("itc_loss", "itm_loss", "itm_acc", "mlm_loss", "mlm_acc", "logit_scale")

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, world_size: int):
        if tokenizer.mask_id is None:
            raise ConfigError("the combined recipe masks words: the tokenizer has no [MASK] token")
        if cfg.model.text.mask != "bidirectional":
            raise ConfigError("recipe=combined runs MLM on the text tower: set "
                              "model.text.mask=bidirectional (and model.text.pool=cls)")
        self.cfg, self.tokenizer = cfg, tokenizer
        self._itc = distributed_clip_loss if world_size > 1 else clip_loss
        self.special_ids = special_token_ids(tokenizer)
        self.continuation = continuation_table(tokenizer) if cfg.objectives.whole_word else None

    def loader_kwargs(self) -> dict:
        return {}

    def build_model(self) -> Combined:
        return Combined(self.cfg.model, self.tokenizer.vocab_size)

    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        o, dev = self.cfg.objectives, engine.device
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        masked, labels = mask_tokens(ids, mask, prob=o.mlm_prob, special_ids=self.special_ids,
                                     mask_id=self.tokenizer.mask_id,
                                     vocab_size=self.tokenizer.vocab_size,
                                     continuation=self.continuation)
        out = engine(batch.pixel_values.to(dev, engine.input_dtype), ids, mask, masked, labels)
        metrics: dict[str, float] = {}
        itc = self._itc(out["image_features"].float(), out["text_features"].float(),
                        out["logit_scale"].float())["contrastive_loss"]
        metrics["itc_loss"] = float(itc.detach())
        itm = SingleStreamRecipe._ce(out["itm_logits"], out["itm_labels"], metrics, "itm")
        mlm = SingleStreamRecipe._ce(out["mlm_logits"], labels[labels != IGNORE], metrics, "mlm")
        metrics["logit_scale"] = float(out["logit_scale"].detach())
        total = itc + o.itm_weight * itm + o.mlm_weight * mlm
        return total, [metrics.get(n, float("nan")) for n in self.metric_names]

    def finish(self, weights: dict, out_dir: Path, val_spec: str, progress: bool) -> dict:
        from safetensors.torch import save_file

        model = self.build_model()
        model.load_state_dict(weights)
        model.eval()
        eval_tf = ImageTransform(self.cfg.model.vision.image_size, train=False)
        towers = Pretrained(model.towers, self.tokenizer, eval_tf)
        folder = towers.save(out_dir / "model")  # vlp.load reads the towers
        config = json.loads((folder / "config.json").read_text())
        config.update({"architecture": "combined", "model": to_dict(self.cfg.model)})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in weights.items()
                   if k != "mlm_head.word_embeddings.weight"}, str(folder / "combined.safetensors"))
        if not (self.cfg.eval.at_end and val_spec):
            return {}
        from vlp.eval.retrieval import evaluate_retrieval, format_table

        metrics = evaluate_retrieval(towers, val_spec, batch_size=self.cfg.eval.batch_size,
                                     progress=progress)
        print(format_table(metrics))
        metrics.update(self._fused_metrics(model, val_spec, eval_tf, progress))
        print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items() if "mlm" in k or "itm" in k))
        return metrics

    @torch.no_grad()
    def _fused_metrics(self, model, data, transform, progress) -> dict:
        """MLM on every colour/shape word and ITM (positives and hard negatives), with the
        image and with it blanked (see vlp/eval/single_stream.py)."""
        from vlp.data.pipeline import make_loader
        from vlp.eval.single_stream import _Accuracy, attribute_token_ids

        loader = make_loader(data, tokenizer=self.tokenizer, transform=transform,
                             batch_size=self.cfg.eval.batch_size,
                             context_length=self.cfg.model.text.context_length, num_workers=0,
                             shuffle_buffer=0, seed=0, caption="first", drop_last=False)
        attr = attribute_token_ids(self.tokenizer)
        acc = {k: _Accuracy() for k in ("attr_mlm", "attr_mlm_text_only", "itm",
                                        "itm_text_only")}
        torch.manual_seed(0)  # hard negatives are sampled
        for batch in tqdm(loader, desc="eval fused", unit="batch", disable=not progress):
            if not len(batch):
                continue
            ids, mask = batch.input_ids, batch.attention_mask
            masked, labels, _ = mask_words(ids, mask, attr, self.tokenizer.mask_id)
            for blank, suffix in ((False, ""), (True, "_text_only")):
                out = model(batch.pixel_values, ids, mask, masked, labels, blank_visual=blank)
                acc["attr_mlm" + suffix].add(out["mlm_logits"], labels[labels != IGNORE])
                acc["itm" + suffix].add(out["itm_logits"], out["itm_labels"])
        return {f"{k}_acc": a.value() for k, a in acc.items() if a.total}
