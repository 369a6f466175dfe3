"""Image-text retrieval on a Karpathy split (COCO `dataset_coco.json`, Flickr30k
`dataset_flickr30k.json`): contrastive fine-tuning of the dual tower of a dual_tower or combined
checkpoint, optional re-ranking of each query's top k by the ITM head, Recall@K both ways.

- Training samples: one per training image (splits train + restval) per epoch, paired with one
  of its captions drawn at random each time the image is drawn. With every caption a sample, a
  batch often holds two captions of one image and the CLIP loss would push each away as the
  other's negative (ALBEF builds image-id targets for that); one sample per image keeps the plain
  CLIP loss exact, and over the epochs every caption is seen.
- Loss: the CLIP loss with the tower's learnable logit scale, over every process's batch
  (vlp/objectives/contrastive.py); with retrieval.rerank_k > 0 plus ITM on the fused pairs with
  hard negatives (vlp/models/heads/retrieval.py), ALBEF's retrieval fine-tuning.
- Evaluation (eval.split, Karpathy test by default): the split's images and captions embedded by
  the towers, Recall@1/5/10 image->text (right when any of the image's captions is in the top K)
  and text->image (vlp/eval/retrieval.py `recall_at_k`), `rsum` their sum. With rerank_k > 0 each
  query's top k are re-ordered by the ITM match log-odds (ALBEF's k_test): keys `..._rerank`.
  The baseline: the same numbers for the starting checkpoint (init_from, zero-shot), `zeroshot_`.
  OUT/retrieval_<split>_results.json holds every query's top 10 and the metrics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlp.config import ConfigError, FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.karpathy import read_karpathy
from vlp.eval.retrieval import KS, match_score, recall_at_k, rerank_orders, rsum
from vlp.models.device import resolve_device
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.models.pretrained import Pretrained
from vlp.objectives import classification_loss, clip_loss, distributed_clip_loss, \
    sample_matching_pairs
from vlp.tasks.common import FinetuneTask, RecordDataset, collate_items, load_finetuned_parts, \
    reader_for

TRAIN_SPLITS = ("train", "restval")  # Karpathy's restval (30k COCO val images) trains too
TOP = 10  # ranks written per query in the results file
SINGLE_STREAM_HINT = (
    "retrieval fine-tuning needs a dual_tower or combined checkpoint: their towers embed images "
    "and captions apart, so a gallery is ranked by one matrix product. A single-stream model has "
    "no towers; it can only score (image, caption) pairs with its ITM head, every caption "
    "against every image through the joint encoder. Pretrain with "
    "configs/pretrain/clip_shapes.yaml or configs/pretrain/combined_shapes.yaml")


def itm_logits(encoder: JointEncoder, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               image_tokens: torch.Tensor) -> torch.Tensor:
    """Tower tokens of N pairs -> (N, 2) ITM logits (column 1: "they match") from the fused
    [CLS] state: the combined model's own fusion and ITM head."""
    return encoder.core.itm_logits(text_tokens, text_mask, image_tokens)


class RetrievalHead(nn.Module):
    """No weights of its own: fine-tuning trains the encoder's dual tower (its encoders,
    projections and learnable logit scale) with the CLIP loss, and with `train_itm` its fusion
    layers + ITM head on [text | image] pairs with hard negatives (vlp/objectives/matching.py),
    to re-rank the top k (ALBEF's retrieval recipe: `models/model_retrieval.py`)."""

    def __init__(self, train_itm: bool = False):
        super().__init__()
        self.train_itm = train_itm

    def forward(self, encoder: JointEncoder, *, pixel_values: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> image_features, text_features (B, D) L2-normalised, logit_scale; with train_itm
        (and B > 1) also itm_logits (3B, 2) and itm_labels (3B,): B positives, B image -> hard
        caption, B caption -> hard image."""
        negatives = sample_matching_pairs if self.train_itm and input_ids.shape[0] > 1 \
            else None
        # the combined model's forward: the ops of DualTower.encode_image / encode_text (what
        # evaluation and vlp.load use), and the matching of the combined pretraining
        return encoder.core(pixel_values, input_ids, attention_mask, negatives=negatives)


@dataclass
class Embedded:
    """A split's gallery: features (and the tower tokens re-ranking fuses)."""
    image_ids: list
    caption_ids: list
    captions: list[str]
    text_to_image: torch.Tensor  # (N_txt,) index of each caption's image
    image_features: torch.Tensor  # (N_img, D) L2-normalised; zeros for an unreadable image
    text_features: torch.Tensor  # (N_txt, D)
    unreadable: int
    image_tokens: torch.Tensor | None = None  # (N_img, T, W)
    text_tokens: torch.Tensor | None = None  # (N_txt, L, W)
    text_mask: torch.Tensor | None = None  # (N_txt, L)


def top_ids(scores: torch.Tensor, ids: list, n: int = TOP) -> tuple[list[list], list[list]]:
    """(Q, C) scores -> each row's n best ids and their scores (descending)."""
    values, index = scores.topk(min(n, scores.shape[1]), dim=1)
    return ([[ids[j] for j in row] for row in index.tolist()],
            [[round(v, 6) for v in row] for row in values.tolist()])


class RetrievalTask(FinetuneTask):
    name = "retrieval"
    eval_metrics = tuple(f"{d}_R@{k}{r}" for r in ("", "_rerank") for d in ("i2t", "t2i")
                         for k in KS) + ("rsum", "rsum_rerank")

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer, transform,
                 root: Path, world_size: int = 1):
        if encoder.architecture == "single_stream":
            raise ConfigError(f"init_from={cfg.init_from}: {SINGLE_STREAM_HINT}")
        super().__init__(cfg, encoder, tokenizer, transform, root, world_size)
        r = cfg.retrieval
        if r.rerank_k < 0:
            raise ConfigError(f"retrieval.rerank_k={r.rerank_k}: use 0 (no re-ranking) or the "
                              "number of top candidates the ITM head re-orders (ALBEF: 128/256)")
        self.rerank_k = r.rerank_k
        self.metric_names = ("logit_scale", "batch_i2t_acc") + \
            (("itm_acc",) if self.rerank_k else ())
        self.karpathy = Path(r.karpathy) if r.karpathy else root / "coco" / "dataset_coco.json"
        # COCO: data.images holds train2014/ and val2014/ (the files' filepath); Flickr30k:
        # data.images holds the images (no filepath). The shapes world: ROOT/images/...
        self.images = Path(cfg.data.images) if cfg.data.images else root
        self.reader = reader_for(encoder, transform, None)
        self.context_length = encoder.core.towers.cfg.text.context_length
        self._records = read_karpathy(self.karpathy)
        # one process: the plain CLIP loss; several: each rank's rows against all ranks' columns
        self._clip = distributed_clip_loss if world_size > 1 else clip_loss

    # ------------------------------------------------------------------ data
    def records(self, split: str) -> list[dict]:
        names = TRAIN_SPLITS if split == "train" else (split,)
        records = [r for r in self._records if r["split"] in names and r["captions"]]
        if not records:
            present = sorted({str(r["split"]) for r in self._records})
            raise ValueError(f"{self.karpathy}: no images with captions in split(s) {names} "
                             f"(splits present: {present})")
        return records

    def image_path(self, record: dict) -> Path:
        return self.images / record["file"]

    def dataset(self, split: str) -> RecordDataset:
        """Training: one item per image with a caption drawn at random (see the docstring)."""
        records = self.records(split)
        self.reader.check_files([self.image_path(r) for r in records],
                                f"retrieval {split} images ({self.images}/<filepath>/<filename>)")

        def item(record, visual, rng):
            # rng: seeded by (train.seed, epoch, item), the same draw after a resume
            j = int(rng.integers(len(record["captions"])))
            return {"visual": visual, "caption": record["captions"][j][1],
                    "image_id": record["image_id"]}

        return RecordDataset(records, self.image_path, self.reader, item,
                             seed=self.cfg.train.seed)

    def collate(self, items: list) -> Batch:
        batch = collate_items(items, "image_id")
        if len(batch):
            batch.input_ids, batch.attention_mask = self.tokenizer(batch.fields["caption"],
                                                                   self.context_length)
        return batch

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> RetrievalHead:
        return RetrievalHead(self.rerank_k > 0)

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        dev, dtype = engine.device, engine.input_dtype
        out = engine(pixel_values=batch.pixel_values.to(dev, dtype),
                     input_ids=batch.input_ids.to(dev),
                     attention_mask=batch.attention_mask.to(dev))
        image, text = out["image_features"].float(), out["text_features"].float()
        scale = out["logit_scale"].float()
        loss = self._clip(image, text, scale)["contrastive_loss"]
        with torch.no_grad():
            hits = (image @ text.T).argmax(1) == torch.arange(len(image), device=image.device)
            values = [float(scale), 100.0 * float(hits.float().mean())]
        if self.rerank_k:
            if "itm_logits" in out:
                metrics: dict[str, float] = {}
                loss = loss + classification_loss(out["itm_logits"], out["itm_labels"], metrics,
                                                  "itm")
                values.append(100.0 * metrics["itm_acc"])
            else:  # a batch of one image has no negatives
                values.append(float("nan"))
        return loss, values

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def embed(self, backbone: JointEncoder, split: str, progress: bool,
              keep_tokens: bool = False) -> Embedded:
        """Features of every image and caption of `split`, with the ops of
        DualTower.encode_image / encode_text (what vlp.load(...) runs). keep_tokens: also the
        tower tokens re-ranking fuses, kept on the model's device as ALBEF does (COCO's 5k test
        images with a ViT-B/16: ~3 GB in float32)."""
        towers = backbone.core.towers
        dev = next(backbone.parameters()).device
        records = self.records(split)
        batch_size = self.cfg.eval.batch_size
        data = RecordDataset([dict(r, index=i) for i, r in enumerate(records)], self.image_path,
                             self.reader,
                             lambda record, visual: {"visual": visual, "index": record["index"]})
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size,
                                             num_workers=self.cfg.data.num_workers,
                                             collate_fn=partial(collate_items, key="index"))
        image_features = torch.zeros(len(records), towers.cfg.embed_dim)
        image_tokens = None  # shaped from the first batch (a ViT's 1 + g*g, a Swin's grid)
        readable = 0
        for batch in tqdm(loader, desc=f"embed {split} images", unit="batch",
                          disable=not progress):
            if not len(batch):
                continue
            index = torch.tensor(batch.fields["index"])
            tokens = towers.visual.forward_features(batch.pixel_values.to(dev))
            image_features[index] = F.normalize(towers.visual.forward_head(tokens),
                                                dim=-1).float().cpu()
            if keep_tokens:
                if image_tokens is None:
                    image_tokens = tokens.new_zeros((len(records), *tokens.shape[1:]),
                                                    dtype=torch.float32)
                image_tokens[index.to(dev)] = tokens.float()
            readable += len(index)
        captions = [(cid, text, i) for i, r in enumerate(records) for cid, text in r["captions"]]
        texts = [c[1] for c in captions]
        text_features, text_tokens, text_masks = [], [], []
        for i in tqdm(range(0, len(texts), batch_size), desc=f"embed {split} captions",
                      unit="batch", disable=not progress):
            ids, mask = self.tokenizer(texts[i:i + batch_size], self.context_length)
            ids, mask = ids.to(dev), mask.to(dev)
            tokens = towers.text.forward_features(ids, mask)
            text_features.append(F.normalize(towers.text.forward_head(tokens, mask),
                                             dim=-1).float().cpu())
            if keep_tokens:
                text_tokens.append(tokens.float())
                text_masks.append(mask)
        return Embedded(
            image_ids=[r["image_id"] for r in records], caption_ids=[c[0] for c in captions],
            captions=texts, text_to_image=torch.tensor([c[2] for c in captions]),
            image_features=image_features, text_features=torch.cat(text_features),
            unreadable=len(records) - readable, image_tokens=image_tokens,
            text_tokens=torch.cat(text_tokens) if keep_tokens else None,
            text_mask=torch.cat(text_masks) if keep_tokens else None)

    @torch.no_grad()
    def score_encoder(self, backbone: JointEncoder, split: str, rerank_k: int, progress: bool
                      ) -> tuple[dict, dict]:
        """-> (metrics, rankings) of `backbone`'s towers on `split` (re-ranked by its ITM head
        when rerank_k > 0)."""
        e = self.embed(backbone, split, progress, keep_tokens=rerank_k > 0)
        sim = e.image_features @ e.text_features.T  # (N_img, N_txt)
        metrics = recall_at_k(sim, e.text_to_image)
        metrics["rsum"] = rsum(metrics)
        metrics.update({"retrieval_images": len(e.image_ids),
                        "retrieval_captions": len(e.caption_ids),
                        "retrieval_unreadable_images": e.unreadable})
        i2t_ids, i2t_scores = top_ids(sim, e.caption_ids)
        t2i_ids, t2i_scores = top_ids(sim.T, e.image_ids)
        rankings = {
            "i2t": [{"image_id": q, "top10": ids, "scores": s}
                    for q, ids, s in zip(e.image_ids, i2t_ids, i2t_scores)],
            "t2i": [{"caption_id": q, "caption": c, "image_id": e.image_ids[int(m)],
                     "top10": ids, "scores": s}
                    for q, c, m, ids, s in zip(e.caption_ids, e.captions, e.text_to_image,
                                               t2i_ids, t2i_scores)]}
        if rerank_k <= 0:
            return metrics, rankings
        dev = e.image_tokens.device

        def pairs(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            images, texts = images.to(dev), texts.to(dev)
            return match_score(itm_logits(backbone, e.text_tokens[texts], e.text_mask[texts],
                                          e.image_tokens[images]))

        bs = self.cfg.eval.batch_size
        i2t, _, i2t_itm = rerank_orders(sim, rerank_k, pairs, bs, f"re-rank {split} i2t",
                                        progress)
        t2i, _, t2i_itm = rerank_orders(sim.T, rerank_k, lambda t, i: pairs(i, t), bs,
                                        f"re-rank {split} t2i", progress)
        reranked = {k: v for k, v in recall_at_k(i2t, e.text_to_image).items()
                    if k.startswith("i2t")}
        reranked.update({k: v for k, v in recall_at_k(t2i.T, e.text_to_image).items()
                         if k.startswith("t2i")})
        metrics.update({f"{k}_rerank": v for k, v in reranked.items()})
        metrics["rsum_rerank"] = rsum(metrics, "_rerank")
        # top10_rerank: the re-ranked top k, then (k < 10) the similarity order; itm_scores:
        # the ITM log-odds of its first min(k, 10)
        for ranking, ids, matrix, itm in ((rankings["i2t"], e.caption_ids, i2t, i2t_itm),
                                          (rankings["t2i"], e.image_ids, t2i, t2i_itm)):
            for q, row, row_itm in zip(ranking, top_ids(matrix, ids)[0], itm[:, :TOP].tolist()):
                q["top10_rerank"] = row
                q["itm_scores"] = [round(x, 6) for x in row_itm]
        return metrics, rankings

    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        device = next(model.parameters()).device
        metrics, rankings = self.score_encoder(model.backbone, split, self.rerank_k, progress)
        # the baseline: the starting checkpoint as it is (its ITM head only when pretrained)
        start, _, _ = JointEncoder.from_pretrained(self.cfg.init_from, self.cfg.fusion)
        k = self.rerank_k if start.architecture == "combined" else 0
        zeroshot, _ = self.score_encoder(start.eval().to(device), split, k, progress)
        metrics.update({f"zeroshot_{key}": v for key, v in zeroshot.items()
                        if key.startswith(("i2t", "t2i", "rsum"))})
        metrics["retrieval_rerank_k"] = self.rerank_k
        path = Path(out_dir) / f"retrieval_{split}_results.json"
        path.write_text(json.dumps({"split": split, "karpathy": str(self.karpathy),
                                    "metrics": metrics, **rankings}) + "\n")
        print(format_metrics(metrics))
        print(f"results: {path}")
        return metrics

    # ------------------------------------------------------------------ the model directory
    def head_config(self) -> dict:
        return {"rerank_k": self.rerank_k, "itm_trained": self.rerank_k > 0}


def format_metrics(metrics: dict) -> str:
    """A table: fine-tuned, re-ranked (when present) and zero-shot recalls side by side."""
    rerank = "i2t_R@1_rerank" in metrics
    head = f"{'':8}{'fine-tuned':>12}" + (f"{'re-ranked':>12}" if rerank else "") + \
        f"{'zero-shot':>12}"
    lines = [head]
    for key in [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]:
        row = f"{key:8}{metrics[key]:12.2f}"
        if rerank:
            row += f"{metrics[key + '_rerank']:12.2f}"
        zs = metrics.get(f"zeroshot_{key}")
        row += f"{zs:12.2f}" if zs is not None else f"{'':>12}"
        lines.append(row)
    lines.append(f"images={metrics.get('retrieval_images')} "
                 f"captions={metrics.get('retrieval_captions')} "
                 f"unreadable={metrics.get('retrieval_unreadable_images')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- inference (vlp.load)
class RetrievalModel(Pretrained):
    """A fine-tuned retrieval model: `encode_image`, `encode_text` (vlp.api.Pretrained over the
    fine-tuned towers) and, when retrieval.rerank_k > 0 trained its ITM head,
    `itm_scores(image, texts)` / `rerank(image, texts)`."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned retrieval model directory (a path or a modeldir.ModelDir)."""
        folder, model, tokenizer, transform = load_finetuned_parts(
            folder, lambda config, encoder: RetrievalHead(False))
        device = resolve_device(device)
        self.backbone = model.backbone.to(device).eval()
        super().__init__(self.backbone.core.towers, tokenizer, transform.as_eval(), device)
        self.itm_trained = bool(folder.config["head"].get("itm_trained"))
        self.rerank_k = folder.config["head"].get("rerank_k", 0)
        self.folder = folder.path

    @torch.no_grad()
    def itm_scores(self, image, texts: list[str]) -> torch.Tensor:
        """(N,) log-odds that `image` (a PIL image or a file) matches each of `texts`."""
        if not self.itm_trained:
            raise ValueError(f"{self.folder} was fine-tuned with retrieval.rerank_k=0: its ITM "
                             "head is untrained, so it cannot re-rank; rank with encode_image / "
                             "encode_text, or fine-tune with retrieval.rerank_k=16")
        if isinstance(texts, str):
            raise TypeError("itm_scores takes a list of captions; wrap a single one in [...]")
        from PIL import Image

        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                pixels = self.transform(im)
        else:
            pixels = self.transform(image)
        towers = self.model
        image_tokens = towers.visual.forward_features(pixels[None].to(self.device))
        ids, mask = self.tokenizer(list(texts), self.context_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        text_tokens = towers.text.forward_features(ids, mask)
        logits = itm_logits(self.backbone, text_tokens, mask,
                            image_tokens.expand(len(texts), -1, -1))
        return match_score(logits).cpu()

    def rerank(self, image, texts: list[str]) -> list[tuple[int, float]]:
        """(index into texts, ITM log-odds), best match first (e.g. the top k of a search)."""
        scores = self.itm_scores(image, texts)
        order = scores.sort(descending=True, stable=True).indices.tolist()
        return [(i, float(scores[i])) for i in order]

