"""The single-stream (VL-BERT / UNITER) recipe: each step runs two passes over the batch,

    masked: BERT-masked text + masked regions, matched pairs -> MLM, MRC, MRFR
    itm:    unmasked inputs, half the texts swapped within the batch -> image-text matching

and sums the weighted losses (UNITER's MLM/MRM only on matched pairs). The model directory holds
the weights, config and tokenizer; evaluation reports MLM / ITM / MRC accuracy on data.val, each
also with the visual tokens blanked (the same model as a text-only model), so what the image
contributes is measured.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp import modeldir
from vlp.config import ConfigError, PretrainConfig, to_dict
from vlp.data.pipeline import region_feature_dim
from vlp.engine.task import Task
from vlp.eval.single_stream import evaluate_single_stream, format_table
from vlp.models.bert_init import (load_bert_mlm_head, load_bert_weights, mlp_ratio_for,
                                  read_bert_config)
from vlp.models.single_stream import SingleStream
from vlp.objectives import classification_loss
from vlp.objectives.masking import IGNORE, continuation_table, mask_regions, mask_tokens, \
    mismatch_pairs, special_token_ids
from vlp.recipes.dual_tower import log_lines
from vlp.recipes.init_from import load_start, start_transform
from vlp.tokenizer import Tokenizer

TIED = "mlm_head.word_embeddings.weight"  # the MLM decoder is the word embeddings, stored once

REGION_TOOL = "vlp data regions --model RUN/model --data SHARDS --out DIR"


def manifest_regions(urls: list[str]) -> dict:
    """The `regions` block of a MANIFEST.json beside the shard folder (the shapes world writes
    one: label names for the .regions.npz labels and for the json objects), else {}."""
    extracted = Path(urls[0]).parent / "regions_extraction.json"  # from `vlp data regions`
    if extracted.is_file():
        return {"labels": json.loads(extracted.read_text()).get("labels", [])}
    manifest = Path(urls[0]).parent.parent / "MANIFEST.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("regions", {})
    return {}


def adopt_bert_shape(cfg: PretrainConfig) -> tuple[PretrainConfig, list[str]]:
    """With model.init_text_from, the fusion Transformer takes the BERT folder's shape (width,
    layers, heads, MLP, activation, norm, post-LN, positions), and its vocabulary becomes the
    tokenizer unless tokenizer.path names one. Returns (the resolved copy of `cfg`, what
    changed, for the log); `cfg` itself is left as given."""
    folder = cfg.model.init_text_from
    if not folder:
        return cfg, []
    bert = read_bert_config(folder)
    f = cfg.model.fusion
    wanted = {"width": bert["hidden_size"], "layers": bert["num_hidden_layers"],
              "heads": bert["num_attention_heads"],
              "mlp_ratio": mlp_ratio_for(bert["hidden_size"], bert["intermediate_size"]),
              "act": bert["act"], "norm_eps": bert["layer_norm_eps"], "norm_first": False,
              "max_positions": bert["max_position_embeddings"]}
    changed = [f"model.fusion.{k}={v}" for k, v in wanted.items() if getattr(f, k) != v]
    resolved = replace(cfg, model=replace(cfg.model, fusion=replace(f, **wanted)))
    if not cfg.tokenizer.path:
        resolved = replace(resolved, tokenizer=replace(cfg.tokenizer, path=folder))
        changed.append(f"tokenizer.path={folder}")
    return resolved, changed


class SingleStreamRecipe(Task):
    name = "single_stream"

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, train_urls: list[str],
                 world_size: int, val_spec: str = ""):
        self.cfg, self.tokenizer, self.kind = cfg, tokenizer, cfg.model.visual_tokens
        self.val_spec = val_spec
        self.eval_transform = start_transform(cfg, train=False)
        if cfg.model.init_text_from:
            bert_vocab = read_bert_config(cfg.model.init_text_from)["vocab_size"]
            if bert_vocab != tokenizer.vocab_size:
                raise ConfigError(f"model.init_text_from has a {bert_vocab}-token vocabulary but "
                                  f"the tokenizer ({cfg.tokenizer.path}) has "
                                  f"{tokenizer.vocab_size}; use the BERT folder's own tokenizer")
        if tokenizer.mask_id is None:
            raise ConfigError("single_stream pretraining masks words: the tokenizer has no [MASK] "
                              "token (tokenizer.path); use a BERT-style vocabulary")
        self.special_ids = special_token_ids(tokenizer)
        o = cfg.objectives
        self.continuation = continuation_table(tokenizer) if o.whole_word else None
        self.feature_dim, self.label_names = 0, []
        regions = manifest_regions(train_urls)
        if self.kind == "regions":
            self.feature_dim = region_feature_dim(train_urls)
            if not self.feature_dim:
                raise ConfigError(
                    f"model.visual_tokens=regions, but the shards ({train_urls[0]}, ...) have no "
                    f"readable .regions.npz files; make them with `{REGION_TOOL}`, or use "
                    "model.visual_tokens=roi_align (boxes from the json) or patches")
            self.label_names = list(regions.get("labels", []))  # what npz labels index
        elif self.kind == "roi_align":
            self.label_names = list(regions.get("object_labels", []))  # json `label` values
        heads = ["itm"] if o.itm_weight > 0 else []
        if o.mlm_weight > 0:
            heads.append("mlm")
        if self.kind != "patches" and o.mrm_prob > 0:
            if o.mrc_weight > 0 and self.label_names:
                heads.append("mrc")
            if o.mrfr_weight > 0:
                heads.append("mrfr")
        if not heads:
            raise ConfigError("every single_stream objective is off (objectives.*_weight = 0)")
        self.heads = tuple(heads)
        self.metric_names = tuple(f"{h}_{m}" for h in heads for m in ("loss", "acc")
                                  if not (h == "mrfr" and m == "acc"))

    def loader_kwargs(self) -> dict:
        return {"visual": self.kind, "max_regions": self.cfg.model.max_regions,
                "region_labels": self.label_names or None,
                "region_dim": self.feature_dim or None}

    def describe(self) -> str:
        return f"{self.name} ({self.kind}; {', '.join(self.heads)})"

    def build_model(self, pretrained: bool = True) -> SingleStream:
        model = SingleStream(self.cfg.model, self.tokenizer.vocab_size,
                             region_feature_dim=self.feature_dim,
                             num_region_labels=len(self.label_names), heads=self.heads)
        if pretrained and self.cfg.model.init_text_from:
            report = load_bert_weights(model.text_embed, model.transformer,
                                       self.cfg.model.init_text_from)
            if hasattr(model, "mlm_head") and report["mlm_head"]:
                log_lines([load_bert_mlm_head(model.mlm_head, report["mlm_head"],
                                              self.cfg.model.init_text_from)])
        if pretrained:
            load_start(model, self.cfg)
        return model

    # ------------------------------------------------------------------ one step
    def loss(self, engine, batch) -> tuple[torch.Tensor, list[float]]:
        o, dev = self.cfg.objectives, engine.device
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        visual = batch.visual(dev, engine.input_dtype)
        total = torch.zeros((), device=dev)
        metrics: dict[str, float] = {}
        masked_regions = None
        if "mrc" in self.heads or "mrfr" in self.heads:
            masked_regions = mask_regions(visual["region_mask"], o.mrm_prob)
        if "mlm" in self.heads or masked_regions is not None:
            labels = None
            inputs = ids
            if "mlm" in self.heads:
                inputs, labels = mask_tokens(ids, mask, prob=o.mlm_prob,
                                             special_ids=self.special_ids,
                                             mask_id=self.tokenizer.mask_id,
                                             vocab_size=self.tokenizer.vocab_size,
                                             continuation=self.continuation)
            out = engine(inputs, mask, task="masked", mlm_labels=labels,
                         masked_regions=masked_regions, **visual)
            if labels is not None:
                target = labels[labels != IGNORE]
                total = total + o.mlm_weight * classification_loss(out["mlm_logits"], target,
                                                                   metrics, "mlm")
            if "mrc_logits" in out:
                target = batch.region_labels.to(dev)[masked_regions]
                total = total + o.mrc_weight * classification_loss(out["mrc_logits"], target,
                                                                   metrics, "mrc")
            if "mrfr_pred" in out:
                pred, target = out["mrfr_pred"].float(), out["mrfr_target"].float()
                # mean over regions and feature dims (a sum over D=2048 would drown MLM/ITM)
                mse = F.mse_loss(pred, target) if pred.numel() else pred.sum() * 0.0
                metrics["mrfr_loss"] = float(mse.detach())
                total = total + o.mrfr_weight * mse
        if "itm" in self.heads:
            index, target = mismatch_pairs(ids, o.itm_neg_prob)
            out = engine(ids[index], mask[index], task="itm", **visual)
            total = total + o.itm_weight * classification_loss(out["itm_logits"], target,
                                                               metrics, "itm")
        return total, [metrics.get(name, float("nan")) for name in self.metric_names]

    # ------------------------------------------------------------------ the end of a run
    def save_model(self, model: SingleStream, folder: Path) -> Path:
        config = {"model": to_dict(self.cfg.model), "region_feature_dim": self.feature_dim,
                  "region_labels": self.label_names, "heads": list(self.heads)}
        weights = {k: v for k, v in model.state_dict().items() if k != TIED}
        return modeldir.write(folder, "single_stream", config, weights, self.tokenizer,
                              self.eval_transform)

    def evaluate(self, model: SingleStream, out_dir: Path, progress: bool,
                 max_samples: int = 0) -> dict:
        if not self.val_spec:
            return {}
        metrics = evaluate_single_stream(model, self, self.val_spec, progress=progress,
                                         max_samples=max_samples)
        print(format_table(metrics))
        return metrics
