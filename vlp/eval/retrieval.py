"""Image-text retrieval (Recall@K both ways) and zero-shot classification for a dual tower.

Every image has several captions. An image query (i2t) is correct at K when any of its captions
is among the K most similar texts; a text query (t2i) is correct when its image is among the K
most similar images (the COCO/Flickr retrieval protocol of CLIP, ALBEF, BLIP...).

Two galleries: webdataset shards (`evaluate_retrieval`, plus the shapes world's zero-shot shape
and colour accuracy of their single-object images) and a Karpathy split file with its image
folder (`evaluate_karpathy`: COCO `dataset_coco.json`, Flickr30k `dataset_flickr30k.json`),
optionally re-ranking each query's top k by the ITM head of a model with fusion layers
(`rerank_orders`, ALBEF's k_test).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from vlp import modeldir
from vlp.data.karpathy import read_karpathy
from vlp.data.pipeline import SkipCounter, iter_eval_samples, skipped_samples
from vlp.data.shards import expand_urls
from vlp.data.synth import ZEROSHOT_TEMPLATES
from vlp.data.visual import VisualError, VisualNeeds, VisualReader
from vlp.eval.inputs import EvalError
from vlp.eval.zeroshot import classification_metrics, zero_shot_classifier
from vlp.models.device import resolve_device
from vlp.models.joint import JointEncoder
from vlp.models.pretrained import Pretrained

KS = (1, 5, 10)

# The shapes world's prompt ensembles (the templates its zero-shot sets carry; `{c}` = class).
SHAPE_TEMPLATES = ZEROSHOT_TEMPLATES["shape"]
COLOR_TEMPLATES = ZEROSHOT_TEMPLATES["color"]


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor,
                ks: Iterable[int] = KS) -> dict[str, float]:
    """similarity: (N_img, N_txt); text_to_image: (N_txt,) index of each text's image.

    Returns percentages {"i2t_R@K", "t2i_R@K"}.
    """
    n_img, n_txt = similarity.shape
    ks = [k for k in ks]
    out: dict[str, float] = {}
    # i2t: rank of the best-ranked true caption of each image.
    order = similarity.argsort(dim=1, descending=True)  # (N_img, N_txt)
    hit = text_to_image[order] == torch.arange(n_img)[:, None]  # (N_img, N_txt)
    first_hit = hit.float().argmax(dim=1)  # (N_img,) position of the first true caption
    has_any = hit.any(dim=1)
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(((first_hit < k) & has_any).double().mean())
    # t2i: rank of the true image of each caption.
    order = similarity.T.argsort(dim=1, descending=True)  # (N_txt, N_img)
    rank = (order == text_to_image[:, None]).float().argmax(dim=1)  # (N_txt,)
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float((rank < k).double().mean())
    return out


def _single_object_label(meta: dict, attribute: str) -> str | None:
    objects = meta.get("objects") or []
    if len(objects) == 1 and isinstance(objects[0], dict):
        return objects[0].get(attribute)
    return None


def zero_shot_accuracy(model, image_features: torch.Tensor, labels: list[str | None],
                       templates: Iterable[str]) -> tuple[float, int, int]:
    """Top-1 accuracy (%) over the images that have a label; classes are the labels present,
    sorted (vlp/eval/zeroshot.py's classifier: what `vlp eval zeroshot` runs).

    Returns (accuracy, number of images scored, number of classes)."""
    idx = [i for i, lab in enumerate(labels) if lab]
    classes = sorted({labels[i] for i in idx})
    if len(classes) < 2:
        return float("nan"), len(idx), len(classes)
    classifier = zero_shot_classifier(model, classes, list(templates))  # (C, D)
    target = torch.tensor([classes.index(labels[i]) for i in idx])
    top1 = classification_metrics(image_features[idx] @ classifier.T, target, ks=(1,))["top1"]
    return top1, len(idx), len(classes)


@torch.no_grad()
def evaluate_retrieval(model, data: str | list[str], *, batch_size: int = 256,
                       progress: bool = True, max_samples: int = 0) -> dict:
    """Embed every image and caption of `data` shards (the first `max_samples` samples when
    > 0) with `model` (anything with `encode_image`, `encode_text` and `transform`, e.g.
    `vlp.load(...)`) and score them."""
    urls = expand_urls(data)
    skips = SkipCounter()
    pixels, captions, text_to_image, metas = [], [], [], []
    image_feats = []
    samples = iter_eval_samples(urls, model.transform, skips=skips)
    if max_samples:
        samples = itertools.islice(samples, max_samples)
    for sample in tqdm(samples, desc="embed images", unit="img", disable=not progress):
        pixels.append(sample["pixel_values"])
        metas.append(sample["json"] or {})
        for caption in sample["captions"]:
            captions.append(caption)
            text_to_image.append(len(metas) - 1)
        if len(pixels) == batch_size:
            image_feats.append(model.encode_image(torch.stack(pixels)))
            pixels = []
    if pixels:
        image_feats.append(model.encode_image(torch.stack(pixels)))
    if not image_feats:
        raise ValueError(f"no usable samples in {data!r} (skipped: {dict(skips.counts)})")
    img = torch.cat(image_feats)  # (N_img, D)
    txt = model.encode_text(captions, batch_size=batch_size)  # (N_txt, D)
    metrics = recall_at_k(img @ txt.T, torch.tensor(text_to_image))
    metrics["num_images"] = len(metas)
    metrics["num_texts"] = len(captions)
    for attribute, templates in (("shape", SHAPE_TEMPLATES), ("color", COLOR_TEMPLATES)):
        labels = [_single_object_label(m, attribute) for m in metas]
        acc, n, c = zero_shot_accuracy(model, img, labels, templates)
        metrics[f"zeroshot_{attribute}_top1"] = acc
        metrics[f"zeroshot_{attribute}_images"] = n
        metrics[f"zeroshot_{attribute}_classes"] = c
    metrics["skipped_samples"] = skipped_samples(skips.counts)
    for reason, n in sorted(skips.counts.items()):
        metrics[f"skipped_{reason}"] = int(n)
    return metrics


def chance_levels(metrics: dict) -> dict[str, float]:
    """Recall@K of a random ranking, for the table (i2t: any of ~c captions in K of N_txt)."""
    n_img, n_txt = metrics["num_images"], metrics["num_texts"]
    per = n_txt / max(1, n_img)
    out = {}
    for k in KS:
        out[f"i2t_R@{k}"] = 100.0 * min(1.0, 1 - _none_in_top(n_txt, per, k))
        out[f"t2i_R@{k}"] = 100.0 * min(1.0, k / n_img)
    for attribute in ("shape", "color"):
        c = metrics.get(f"zeroshot_{attribute}_classes", 0)
        out[f"zeroshot_{attribute}_top1"] = 100.0 / c if c else float("nan")
    return out


def _none_in_top(n: int, positives: float, k: int) -> float:
    """P(no positive among k draws without replacement from n items with `positives` true)."""
    p = 1.0
    for i in range(k):
        p *= max(0.0, (n - positives - i) / (n - i))
    return p


def format_table(metrics: dict) -> str:
    chance = chance_levels(metrics) if "num_images" in metrics else {}
    rows = [(k, v) for k, v in metrics.items() if k in chance]
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [f"{'metric':<{width}}  {'value':>8}  {'chance':>8}  {'x chance':>8}"]
    for key, value in rows:
        c = chance[key]
        ratio = value / c if c and c == c and c > 0 else float("nan")
        lines.append(f"{key:<{width}}  {value:8.2f}  {c:8.2f}  {ratio:8.1f}")
    lines.append(f"images={metrics.get('num_images')} texts={metrics.get('num_texts')} "
                 f"skipped={metrics.get('skipped_samples', 0)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- Karpathy splits
def rsum(metrics: dict, suffix: str = "") -> float:
    """The sum of the six recalls (ALBEF / VSE++'s `rsum`)."""
    return sum(metrics[f"{d}_R@{k}{suffix}"] for d in ("i2t", "t2i") for k in KS)


def match_score(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits -> (N,) log-odds that the pair matches (what re-ranking sorts by;
    monotone in the match probability, and it does not saturate as a probability does)."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def rerank_orders(similarity: torch.Tensor, k: int, score_pairs, batch_size: int,
                  desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top k columns by `similarity` (Q, C) re-ordered by `score_pairs(rows, cols)`
    (descending; ties keep the similarity order) -> (a (Q, C) score matrix whose descending
    order is the re-ranked one: the top k above every other column, the rest by similarity;
    the re-ranked top k columns (Q, k); their pair scores (Q, k))."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices  # (Q, k), by similarity
    rows = torch.arange(similarity.shape[0])[:, None].expand_as(top).reshape(-1)
    cols = top.reshape(-1)
    scores = torch.cat([score_pairs(rows[i:i + batch_size], cols[i:i + batch_size]).cpu()
                        for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                                      disable=not progress)]).view_as(top)
    scores, order = scores.sort(dim=1, descending=True, stable=True)  # (Q, k)
    reranked = top.gather(1, order)
    # cosine similarities are in [-1, 1]: ranks 1..k placed at 2 + (k..1) sit above all of them
    out = similarity.clone().float()
    out.scatter_(1, reranked, (2.0 + torch.arange(k, 0, -1, dtype=torch.float32))
                 .expand(len(out), k).contiguous())
    return out, reranked, scores


def load_with_fusion(path: str | Path, device: str | torch.device | None = None
                     ) -> tuple[Pretrained, torch.nn.Module | None]:
    """A dual_tower or combined model directory -> (its towers for inference, the combined
    model's fusion layers + ITM head (`itm_logits`) over those same towers, or None for a
    dual tower, which has none)."""
    folder = modeldir.read(path, ("dual_tower", "combined"))
    if folder.architecture != "combined":
        return Pretrained.from_dir(folder, device), None
    encoder, tokenizer, transform = JointEncoder.from_pretrained(folder.path)
    device = resolve_device(device)
    combined = encoder.core.eval().to(device)
    return Pretrained(combined.towers, tokenizer, transform, device), combined


@torch.no_grad()
def evaluate_karpathy(model: Pretrained, karpathy: str | Path | dict, images: str | Path,
                      split: str = "test", *, batch_size: int = 256, rerank_k: int = 0,
                      fusion: torch.nn.Module | None = None, progress: bool = True) -> dict:
    """Recall@1/5/10 both ways and rsum of `model` (a `Pretrained`: vlp.load of a dual tower,
    combined or fine-tuned retrieval directory) on `split` of a Karpathy file, its images read
    from `images`/<filepath>/<filename>. Images that cannot be read are left out with their
    captions and counted (`skipped`, `skipped_<reason>`).

    rerank_k > 0: each query's top k re-ordered by `fusion.itm_logits(text tokens, text mask,
    image tokens)` over model.model's tower tokens (keys `<key>_rerank`, `rsum_rerank`)."""
    if rerank_k < 0:
        raise EvalError(f"--rerank-k {rerank_k}: use 0 (no re-ranking) or the number of top "
                        "candidates the ITM head re-orders (ALBEF: 128/256)")
    if rerank_k and fusion is None:
        raise EvalError("re-ranking needs fusion layers and an ITM head: a combined model "
                        "directory (configs/pretrain/combined_shapes.yaml) or a retrieval "
                        "fine-tuned one trained with retrieval.rerank_k > 0")
    name = "the Karpathy split" if isinstance(karpathy, dict) else str(karpathy)
    try:
        records = read_karpathy(karpathy)
    except ValueError as e:
        raise EvalError(str(e)) from None
    chosen = [r for r in records if r["split"] == split and r["captions"]]
    if not chosen:
        present = sorted({str(r["split"]) for r in records})
        raise EvalError(f"{name}: no images with captions in split {split!r} (splits present: "
                        f"{present})")
    reader = VisualReader(VisualNeeds("pixels", True, False, False), model.transform, None)
    towers = model.model
    skips = SkipCounter()
    kept, feats, pixels, image_tokens = [], [], [], []

    def flush() -> None:
        batch = torch.stack(pixels)
        feats.append(model.encode_image(batch))
        if rerank_k:
            image_tokens.append(towers.visual.forward_features(batch.to(model.device)).float())
        pixels.clear()

    for record in tqdm(chosen, desc=f"embed {split} images", unit="img", disable=not progress):
        try:
            pixels.append(reader.read(Path(images) / record["file"])["pixel_values"])
        except VisualError as e:
            skips.add(e.reason)
            continue
        kept.append(record)
        if len(pixels) == batch_size:
            flush()
    if pixels:
        flush()
    if not kept:
        raise EvalError(f"none of the {len(chosen)} {split} images of {name} could be read from "
                        f"{images}/<filepath>/<filename> (e.g. {Path(images) / chosen[0]['file']}"
                        f"; {dict(skips.counts)}); is --images the folder they are relative to?")
    captions = [(text, i) for i, r in enumerate(kept) for _, text in r["captions"]]
    texts = [c[0] for c in captions]
    text_to_image = torch.tensor([c[1] for c in captions])
    img, txt = torch.cat(feats), model.encode_text(texts, batch_size=batch_size)
    sim = img @ txt.T  # (N_img, N_txt)
    metrics: dict = recall_at_k(sim, text_to_image)
    metrics["rsum"] = rsum(metrics)
    if rerank_k:
        text_tokens, text_mask = [], []
        for i in range(0, len(texts), batch_size):
            ids, mask = model.tokenizer(texts[i:i + batch_size], model.context_length)
            ids, mask = ids.to(model.device), mask.to(model.device)
            text_tokens.append(towers.text.forward_features(ids, mask).float())
            text_mask.append(mask)
        text_tokens, text_mask = torch.cat(text_tokens), torch.cat(text_mask)
        image_tokens = torch.cat(image_tokens)

        def pairs(images_: torch.Tensor, texts_: torch.Tensor) -> torch.Tensor:
            images_, texts_ = images_.to(model.device), texts_.to(model.device)
            return match_score(fusion.itm_logits(text_tokens[texts_], text_mask[texts_],
                                                 image_tokens[images_]))

        i2t, _, _ = rerank_orders(sim, rerank_k, pairs, batch_size, "re-rank i2t", progress)
        t2i, _, _ = rerank_orders(sim.T, rerank_k, lambda t, i: pairs(i, t), batch_size,
                                  "re-rank t2i", progress)
        reranked = {k: v for k, v in recall_at_k(i2t, text_to_image).items()
                    if k.startswith("i2t")}
        reranked.update({k: v for k, v in recall_at_k(t2i.T, text_to_image).items()
                         if k.startswith("t2i")})
        metrics.update({f"{k}_rerank": v for k, v in reranked.items()})
        metrics["rsum_rerank"] = rsum(metrics, "_rerank")
        metrics["rerank_k"] = rerank_k
    metrics.update(num_images=len(kept), num_texts=len(texts),
                   skipped=skipped_samples(skips.counts))
    for reason, n in sorted(skips.counts.items()):
        metrics[f"skipped_{reason}"] = int(n)
    return metrics


def format_karpathy_table(metrics: dict) -> str:
    """Recalls and rsum of the towers, re-ranked beside them when present, and chance."""
    rerank = "rsum_rerank" in metrics
    chance = chance_levels(metrics)
    chance["rsum"] = sum(chance[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS)
    lines = [f"{'metric':<8}  {'towers':>8}" + (f"  {'re-ranked':>9}" if rerank else "") +
             f"  {'chance':>8}"]
    for key in [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]:
        row = f"{key:<8}  {metrics[key]:8.2f}"
        if rerank:
            row += f"  {metrics[key + '_rerank']:9.2f}"
        lines.append(row + f"  {chance[key]:8.2f}")
    lines.append(f"images={metrics['num_images']} texts={metrics['num_texts']} "
                 f"skipped={metrics['skipped']}" +
                 (f" rerank_k={metrics['rerank_k']}" if rerank else ""))
    return "\n".join(lines)
