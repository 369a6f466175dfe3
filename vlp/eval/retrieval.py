"""Image-text retrieval (Recall@K both ways) and zero-shot classification for a dual tower.

Every image has several captions. An image query (i2t) is correct at K when any of its captions
is among the K most similar texts; a text query (t2i) is correct when its image is among the K
most similar images (the COCO/Flickr retrieval protocol of CLIP, ALBEF, BLIP...).
"""
from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from vlp.data.pipeline import SkipCounter, iter_eval_samples, skipped_samples
from vlp.data.shards import expand_urls

KS = (1, 5, 10)

# Prompt ensembles for zero-shot classification (CLIP's recipe: average the normalised text
# embeddings of several templates per class).
SHAPE_TEMPLATES = ("a {}", "a {} shape", "a photo of a {}", "there is a {}", "one {}")
COLOR_TEMPLATES = ("a {} shape", "something {}", "a {} object", "there is a {} shape")


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
    """Top-1 accuracy (%) over the images that have a label; classes are the labels present.

    Returns (accuracy, number of images scored, number of classes)."""
    idx = [i for i, lab in enumerate(labels) if lab]
    classes = sorted({labels[i] for i in idx})
    if len(classes) < 2:
        return float("nan"), len(idx), len(classes)
    class_emb = []
    for name in classes:
        emb = model.encode_text([t.format(name) for t in templates]).mean(dim=0)
        class_emb.append(emb / emb.norm())
    class_emb = torch.stack(class_emb)  # (C, D)
    pred = (image_features[idx] @ class_emb.T).argmax(dim=1)
    target = torch.tensor([classes.index(labels[i]) for i in idx])
    return 100.0 * float((pred == target).double().mean()), len(idx), len(classes)


@torch.no_grad()
def evaluate_retrieval(model, data: str | list[str], *, batch_size: int = 256,
                       progress: bool = True) -> dict:
    """Embed every image and caption of `data` shards with `model` (anything with
    `encode_image`, `encode_text` and `transform`, e.g. `vlp.load(...)`) and score them."""
    urls = expand_urls(data)
    skips = SkipCounter()
    pixels, captions, text_to_image, metas = [], [], [], []
    image_feats = []
    samples = iter_eval_samples(urls, model.transform, skips=skips)
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
