"""Referring expression comprehension accuracy (RefCOCO, RefCOCO+, RefCOCOg): a sentence is
right when the box predicted for it overlaps its referred annotation's box with IoU >= 0.5, the
accuracy MAttNet, VL-BERT and UNITER report per split (val / testA / testB), once with the
image's ground-truth boxes as the candidates and once with a detector's.

IoU is computed on continuous coordinates, as pycocotools does for COCO's [x, y, w, h] boxes
(`maskApi.c` bbIou: intersection width min(x1 + w1, x2 + w2) - max(x1, x2), clamped at 0; no
"+1 pixel"): boxes that only touch share no area (IoU 0), a box inside another has IoU = the
ratio of their areas, and two boxes with no area at all (a union of 0) have IoU 0, not NaN.

Predictions: a JSON list (or JSON lines) of {"sent_id", "box": [x, y, w, h]} in pixels, one
per sentence of the scored split (extra fields, such as the task's "candidate" and "scores",
are ignored). Annotations: the refer toolkit's refs(<splitBy>).p (or its .json copy) and
instances.json (vlp/data/refer.py reads both; pickles safely).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from vlp.data.refer import Refer
from vlp.eval.inputs import EvalError, field, id_list, load_json, load_jsonl

THRESHOLD = 0.5


def xywh_to_xyxy(box) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def xyxy_to_xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def box_iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes on continuous coordinates (0 when the union has no
    area)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def is_hit(box_xyxy, gt_xyxy, threshold: float = THRESHOLD) -> bool:
    return box_iou(box_xyxy, gt_xyxy) >= threshold


def random_candidate_accuracy(candidates: list[list], gts: list,
                              threshold: float = THRESHOLD) -> float:
    """The expected accuracy (percent) of picking one of each sentence's candidate boxes
    uniformly at random: the mean over sentences of (candidates with IoU >= threshold) / N,
    exactly (with ground-truth candidates that is the mean of 1/N). A sentence without
    candidates counts 0. Boxes are [x1, y1, x2, y2]."""
    if not gts:
        return 0.0
    total = 0.0
    for boxes, gt in zip(candidates, gts, strict=True):
        if boxes:
            total += sum(is_hit(b, gt, threshold) for b in boxes) / len(boxes)
    return 100.0 * total / len(gts)


def oracle_accuracy(candidates: list[list], gts: list, threshold: float = THRESHOLD) -> float:
    """The best any choice could score (percent): sentences with at least one candidate at
    IoU >= threshold (with detected boxes, what the detector leaves findable)."""
    if not gts:
        return 0.0
    found = sum(any(is_hit(b, gt, threshold) for b in boxes)
                for boxes, gt in zip(candidates, gts, strict=True))
    return 100.0 * found / len(gts)


def _box(value, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            for v in value):
        raise EvalError(f"{where}: box must be [x, y, w, h] (4 finite numbers), got "
                        f"{value!r:.120}")
    if value[2] < 0 or value[3] < 0:
        raise EvalError(f"{where}: box {list(value)} has a negative width or height (boxes "
                        "are [x, y, w, h], COCO's order)")
    return [float(v) for v in value]


def read_predictions(predictions) -> dict:
    """{sent_id: [x, y, w, h]} from a JSON list, a JSON-lines file (.jsonl) or an in-memory
    list of rows."""
    if isinstance(predictions, (str, os.PathLike)) and str(predictions).endswith(".jsonl"):
        rows = [(f"{predictions}:{n}", obj) for n, obj in load_jsonl(predictions)]
    else:
        rows = [(f"{predictions if isinstance(predictions, (str, os.PathLike)) else 'row'}"
                 f"[{i}]", obj) for i, obj in enumerate(load_json(predictions, list))]
    out = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected an object {{\"sent_id\", \"box\"}}, got "
                            f"{row!r:.80}")
        sent_id = field(row, "sent_id", (int, str), where)
        if sent_id in out:
            raise EvalError(f"{where}: sent_id {sent_id!r} appears twice")
        out[sent_id] = _box(field(row, "box", list, where), where)
    return out


def score_split(preds: dict, refer: Refer, split: str, source: str = "predictions") -> dict:
    """{"acc": percent, "count": sentences} of one split; every sentence of it needs a
    prediction."""
    sentences = refer.sentences(split)
    if not sentences:
        raise EvalError(f"no sentence is in split {split!r}; the refs' splits are "
                        f"{refer.splits()}")
    missing = [s["sent_id"] for s in sentences if s["sent_id"] not in preds]
    if missing:
        raise EvalError(f"{source}: {id_list(missing)} sentences of split {split!r} have no "
                        "prediction")
    right = sum(is_hit(xywh_to_xyxy(preds[s["sent_id"]]), xywh_to_xyxy(s["box"]))
                for s in sentences)
    return {"acc": 100.0 * right / len(sentences), "count": len(sentences)}


def evaluate_refcoco(predictions, refs: str | Path | Refer, instances: str | Path | None = None,
                     splits: list[str] | None = None) -> dict:
    """{"refcoco_<split>": accuracy in percent, "refcoco_<split>_count": sentences} for each
    split. `refs`: a Refer, or the refs file (then `instances` is instances.json). `splits`:
    None scores every split some prediction falls in (each must be complete); predictions
    for sentences the refs do not hold are an error."""
    if not isinstance(refs, Refer):
        if instances is None:
            raise EvalError("scoring needs the instances.json beside the refs file")
        try:
            refs = Refer.from_files(refs, instances)
        except ValueError as e:
            raise EvalError(str(e)) from None
    source = str(predictions) if isinstance(predictions, (str, os.PathLike)) else "predictions"
    preds = read_predictions(predictions)
    split_of = {s["sent_id"]: ref["split"] for ref in refs.refs for s in ref["sentences"]}
    unknown = [k for k in preds if k not in split_of]
    if unknown:
        raise EvalError(f"{source}: {id_list(unknown)} sent_ids are not in the refs")
    if splits is None:
        splits = list(dict.fromkeys(split_of[k] for k in preds))
    metrics = {}
    for split in splits:
        scored = score_split(preds, refs, split, source)
        metrics[f"refcoco_{split}"] = scored["acc"]
        metrics[f"refcoco_{split}_count"] = scored["count"]
    return metrics


def format_table(metrics: dict) -> str:
    """Accuracy per split, one column per candidate kind found in `metrics`: the task's
    `refcoco_<gt|det>_<split>` keys (with `_random` baselines and `_oracle` bounds), or the
    metric's plain `refcoco_<split>`."""
    kinds = [k for k in ("gt", "det") if any(key.startswith(f"refcoco_{k}_") for key in metrics)]
    if not kinds:
        splits = [k[len("refcoco_"):] for k in metrics
                  if k.startswith("refcoco_") and not k.endswith("_count")]
        lines = [f"{'split':<8}  {'acc@0.5':>8}  {'sentences':>9}"]
        lines += [f"{s:<8}  {metrics[f'refcoco_{s}']:8.2f}  "
                  f"{metrics.get(f'refcoco_{s}_count', 0):9d}" for s in splits]
        return "\n".join(lines)
    suffixes = ("_random", "_oracle", "_count", "_skipped")
    lines = [f"{'split':<8}  {'boxes':<5}  {'acc@0.5':>8}  {'random':>7}  {'oracle':>7}  "
             f"{'sentences':>9}"]
    for kind in kinds:
        prefix = f"refcoco_{kind}_"
        for key in metrics:
            if not key.startswith(prefix) or key.endswith(suffixes):
                continue
            split = key[len(prefix):]
            oracle = metrics.get(f"{key}_oracle")
            lines.append(f"{split:<8}  {kind:<5}  {metrics[key]:8.2f}  "
                         f"{metrics.get(f'{key}_random', float('nan')):7.2f}  "
                         f"{'' if oracle is None else f'{oracle:7.2f}':>7}  "
                         f"{metrics.get(f'{key}_count', 0):9d}")
    return "\n".join(lines)
