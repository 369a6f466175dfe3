"""Referring expression comprehension (RefCOCO, RefCOCO+, RefCOCOg): the refer toolkit's
refs(<splitBy>).p (or its .json copy) + instances.json in, per-sentence results JSON out,
accuracy at IoU >= 0.5 per split (vlp/eval/refcoco_metric.py).

Given an image's candidate boxes and an expression, the model scores every candidate and picks
one (vlp/models/heads/refcoco.py: region backbones score the hidden states of their region
tokens, VL-BERT's head; patch and fused backbones pool each box from their patch grid as VCR
grounds objects and score one slot token per box). Candidates, by kind:

    gt   the image's ground-truth boxes: region backbones read them as the image's region file
         (data.regions/{image stem}.npz, features of the annotation boxes, as the shapes world
         writes and UNITER / VL-BERT's "gt" features are); patch and fused backbones pool the
         instances.json boxes of the image
    det  a detector's boxes, one file per image: refcoco.dets/{image stem}.npz in the region
         file layout (`boxes` [N, 4] x1 y1 x2 y2 pixels; region backbones also read its
         `features`, as with bottom-up-attention detections)

Training (refcoco.train_boxes, default gt): one sample per sentence, softmax cross-entropy over
its candidates against the candidate with the highest IoU with the referred box (VL-BERT /
MAttNet). Candidates beyond what the backbone holds are dropped in file order: region
backbones keep model.max_regions, patch/fused ones as many slots as the text positions leave
after refcoco.max_length.

Evaluation writes `refcoco_<gt|det>_<split>_results.json` ([{"sent_id", "ref_id",
"image_id", "box": [x, y, w, h], "candidate", "scores"}]) and scores it; det is scored when
the detections folder exists. eval.split=val scores val; eval.split=test scores val and every
test split (RefCOCO: testA, testB), as papers report them; `vlp eval refcoco --split` takes
any split name. Beside each accuracy: the random-candidate baseline (its exact expected
accuracy: the mean over sentences of the share of candidates at IoU >= 0.5, i.e. the mean of
1/N with gt boxes) and, for det, the oracle (a candidate at IoU >= 0.5 exists). A sentence
whose image or box file cannot be used is skipped and counted; its result is an empty box
(wrong).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.config import ConfigError, FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.refer import Refer, read_boxes_file, split_matches
from vlp.data.transforms import to_pil_rgb
from vlp.data.visual import VisualError, collate_visual
from vlp.eval.refcoco_metric import box_iou, evaluate_refcoco, format_table, oracle_accuracy, \
    random_candidate_accuracy, xywh_to_xyxy, xyxy_to_xywh
from vlp.models.device import resolve_device
from vlp.models.heads.refcoco import RefCOCOHead, refcoco_loss
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.common import FinetuneTask, RecordDataset, Skipped, collate_items, \
    load_finetuned_parts, reader_for
from vlp.tokenizer import Tokenizer

KINDS = ("gt", "det")
REFS_FILE = "refcoco/refs(unc).p"


class ExpressionText:
    """Expressions -> token ids: `[CLS] expression [SEP]` padded to max_length (region
    backbones), or followed by one slot token per candidate (patch / fused backbones), with
    the slot positions and the candidate each slot grounds."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, slots: bool):
        self.tokenizer, self.max_length, self.slots = tokenizer, max_length, slots
        self.slot_id = tokenizer.mask_id if tokenizer.mask_id is not None else tokenizer.sep_id
        if slots and self.slot_id is None:
            raise ValueError(f"candidate slots need a [MASK] or [SEP] token; {tokenizer} has "
                             "neither")

    def __call__(self, sentences: list[str], counts: list[int] | None = None) -> dict:
        """-> input_ids, attention_mask (B, L); with slots (`counts`: candidates per
        expression) also token_objects (B, L) and slot_positions (B, max count), -1 padded."""
        ids, mask = self.tokenizer(sentences, self.max_length)
        if not self.slots:
            return {"input_ids": ids, "attention_mask": mask}
        lengths = mask.sum(1).tolist()  # the expression is a prefix: [CLS] words [SEP]
        total = max(n + c for n, c in zip(lengths, counts))
        b = len(sentences)
        out_ids = torch.full((b, total), self.tokenizer.pad_id, dtype=torch.long)
        out_mask = torch.zeros(b, total, dtype=torch.long)
        objects = torch.full((b, total), -1, dtype=torch.long)
        slots = torch.full((b, max(counts)), -1, dtype=torch.long)
        for i, (n, c) in enumerate(zip(lengths, counts)):
            out_ids[i, :n] = ids[i, :n]
            out_ids[i, n:n + c] = self.slot_id
            out_mask[i, :n + c] = 1
            objects[i, n:n + c] = torch.arange(c)
            slots[i, :c] = torch.arange(n, n + c)
        return {"input_ids": out_ids, "attention_mask": out_mask, "token_objects": objects,
                "slot_positions": slots}


def slot_limit(encoder: JointEncoder, max_length: int) -> int:
    """How many candidates a patch / fused backbone scores: its text positions after the
    expression (region backbones: model.max_regions)."""
    if encoder.objects_are_regions:
        return encoder.cfg.max_regions
    left = encoder.text_positions - max_length
    if left <= 0:
        raise ConfigError(f"refcoco.max_length={max_length} leaves none of the backbone's "
                          f"{encoder.text_positions} text positions for candidate slots; lower "
                          "refcoco.max_length")
    return left


def model_inputs(batch: Batch, device, dtype) -> dict:
    """The head's inputs of a collated batch, on `device` (visual floats in `dtype`)."""
    visual = batch.visual(device, dtype)
    inputs = {"input_ids": batch.input_ids.to(device),
              "attention_mask": batch.attention_mask.to(device), "visual": visual}
    if "slot_positions" in batch.fields:
        visual["object_boxes"] = batch.object_boxes.to(device, dtype)
        visual["object_mask"] = batch.object_mask.to(device)
        inputs["slot_positions"] = batch.fields["slot_positions"].to(device)
        inputs["token_objects"] = batch.fields["token_objects"].to(device)
    return inputs


def candidates_px(visual: dict, regions: bool, width: float, height: float, limit: int
                  ) -> list[list[float]]:
    """The candidates a VisualReader output holds (its regions, or its object boxes cut to
    `limit`, in place) as x1 y1 x2 y2 pixels of a width x height image."""
    key = "regions" if regions else "objects"
    if not regions:
        visual[key] = visual[key].first(limit)
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    return (torch.as_tensor(visual[key].boxes, dtype=torch.float64) * scale).tolist()


def collate_expressions(items: list, text: ExpressionText) -> Batch:
    batch = collate_items(items, "sent_id")
    if len(batch):
        counts = None
        if text.slots:
            counts = batch.object_mask.sum(1).tolist()
        batch_text = text(batch.fields["sent"], counts)
        batch.input_ids = batch_text.pop("input_ids")
        batch.attention_mask = batch_text.pop("attention_mask")
        batch.fields.update(batch_text)
        batch.fields["target"] = torch.tensor(batch.fields["target"], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------- the task
class RefCOCOTask(FinetuneTask):
    name = "refcoco"
    metric_names = ("train_pick_acc",)

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer, transform,
                 root: Path, world_size: int = 1):
        super().__init__(cfg, encoder, tokenizer, transform, root, world_size)
        r = cfg.refcoco
        refs = Path(r.refs or root / REFS_FILE)
        instances = Path(r.instances or refs.parent / "instances.json")
        self.files = {"refs": refs, "instances": instances}
        try:
            self.refer = Refer.from_files(refs, instances)
        except ValueError as e:  # a refused pickle, a missing field: one line, before training
            raise ConfigError(str(e)) from None
        self.images = Path(cfg.data.images or root / "images")
        dets = Path(r.dets or root / "refcoco" / "dets")
        if r.dets and not dets.is_dir():
            raise FileNotFoundError(f"refcoco.dets={r.dets!r} is not a folder of per-image "
                                    "detected boxes ({image stem}.npz)")
        self.dets = dets if dets.is_dir() else None
        if r.train_boxes == "det" and self.dets is None:
            raise FileNotFoundError(f"refcoco.train_boxes=det needs the detections folder "
                                    f"(refcoco.dets; {dets} does not exist)")
        if r.max_length < 3:
            raise ConfigError(f"refcoco.max_length={r.max_length} leaves no room for words "
                              "([CLS], [SEP] and at least one word)")
        self.max_length = min(r.max_length, encoder.text_positions)
        if self.max_length < r.max_length:
            print(f"refcoco.max_length={r.max_length} is more than the backbone's "
                  f"{encoder.text_positions} text positions: expressions are cut to "
                  f"{self.max_length} tokens")
        self.regions = encoder.objects_are_regions
        self.limit = slot_limit(encoder, self.max_length)
        self.text = ExpressionText(tokenizer, self.max_length, slots=not self.regions)
        self.readers = {"gt": reader_for(encoder, transform,
                                         cfg.data.regions or (root / "regions"))}
        if self.dets is not None:
            self.readers["det"] = reader_for(encoder, transform, self.dets)

    # ------------------------------------------------------------------ data
    def sentences(self, split: str) -> list[dict]:
        return self.refer.sentences(split)

    def eval_splits(self, split: str) -> list[str]:
        """val -> [val]; test -> val and every test split; else the split itself."""
        names = self.refer.splits()
        if split == "test":
            tests = sorted(n for n in names if n.startswith("test"))
            return (["val"] if "val" in names else []) + tests
        if not any(split_matches(n, split) for n in names):
            raise ConfigError(f"split {split!r}: the refs ({self.files['refs']}) have the "
                              f"splits {names} (and test: val + every test split)")
        return [split]

    def image_path(self, record: dict) -> Path:
        return self.images / record["file_name"]

    def dataset(self, split: str, kind: str | None = None) -> RecordDataset:
        """The sentences of `split` with `kind` candidates (default refcoco.train_boxes)."""
        kind = kind or self.cfg.refcoco.train_boxes
        records = self.sentences(split)
        if not records:
            raise ConfigError(f"split {split!r} has no sentence in {self.files['refs']} (its "
                              f"splits: {self.refer.splits()})")
        reader = self.readers[kind]
        paths = sorted({self.image_path(r) for r in records})
        reader.check_files(paths, f"RefCOCO {split} images ({self.images})")
        if kind == "det" and not self.regions:
            missing = [str(self.dets / f"{p.stem}.npz") for p in paths
                       if not (self.dets / f"{p.stem}.npz").is_file()]
            if missing:
                raise FileNotFoundError(f"RefCOCO {split} detections ({self.dets}): "
                                        f"{len(missing)} file(s) missing, e.g. "
                                        f"{', '.join(missing[:3])}")
        samples = [(r, kind) for r in records]
        # bound methods, not lambdas: spawned loader workers (macOS) pickle the dataset
        return RecordDataset(samples, self._sample_image, reader, self._item,
                             None if self.regions else self._sample_boxes)

    def _sample_image(self, sample: tuple[dict, str]) -> Path:
        return self.image_path(sample[0])

    def _sample_boxes(self, sample: tuple[dict, str]) -> list[list[float]]:
        """A patch / fused backbone's candidates in pixels: the image's annotation boxes, or
        its detections file's."""
        record, kind = sample
        if kind == "gt":
            return [xywh_to_xyxy(b) for b in self.refer.image_boxes(record["image_id"])]
        path = self.dets / f"{Path(record['file_name']).stem}.npz"
        try:
            return read_boxes_file(path)
        except FileNotFoundError:
            raise VisualError(f"{path}: missing detections file", "missing_regions") from None
        except ValueError as e:
            raise VisualError(f"{path}: {e}", "bad_regions") from None

    def _item(self, sample: tuple[dict, str], visual: dict) -> dict | Skipped:
        record, _ = sample
        boxes = candidates_px(visual, self.regions, record["width"], record["height"],
                              self.limit)
        if not boxes:
            return Skipped("bad_regions")  # a detections file with no box
        gt = xywh_to_xyxy(record["box"])
        ious = [box_iou(b, gt) for b in boxes]
        return {"visual": visual, "sent": record["sent"], "sent_id": record["sent_id"],
                "ref_id": record["ref_id"], "image_id": record["image_id"],
                "candidates": boxes, "gt": gt, "target": max(range(len(ious)),
                                                            key=ious.__getitem__)}

    def collate(self, items: list) -> Batch:
        return collate_expressions(items, self.text)

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> RefCOCOHead:
        return RefCOCOHead(encoder.width)

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        out = engine(**model_inputs(batch, engine.device, engine.input_dtype))
        target = batch.fields["target"].to(engine.device)
        loss = refcoco_loss(out["logits"], target)
        with torch.no_grad():
            acc = (out["logits"].argmax(1) == target).float().mean().item()
        return loss, [100.0 * acc]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, model: FinetunedModel, split: str, kind: str, progress: bool
                ) -> list[dict]:
        """One row per usable sentence: {"sent_id", "ref_id", "image_id", "box" [x, y, w, h]
        of the chosen candidate, "candidate", "scores" (probabilities), "candidates" (x1 y1 x2
        y2 pixels), "gt"}."""
        loader = torch.utils.data.DataLoader(self.dataset(split, kind),
                                             batch_size=self.cfg.eval.batch_size,
                                             num_workers=self.cfg.data.num_workers,
                                             collate_fn=self.collate)
        device = next(model.parameters()).device
        rows = []
        for batch in tqdm(loader, desc=f"refcoco {kind} {split}", disable=not progress):
            if not len(batch):
                continue
            probs = model(**model_inputs(batch, device, torch.float32))["logits"].float() \
                .softmax(-1)  # (B, N), 0 at padding
            f = batch.fields
            for i, p in enumerate(probs.tolist()):
                boxes = f["candidates"][i]
                p = p[:len(boxes)]
                k = max(range(len(p)), key=p.__getitem__)
                rows.append({"sent_id": f["sent_id"][i], "ref_id": f["ref_id"][i],
                             "image_id": f["image_id"][i], "box": xyxy_to_xywh(boxes[k]),
                             "candidate": k, "scores": p, "candidates": boxes,
                             "gt": f["gt"][i]})
        return rows

    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        metrics = {}
        for kind in self.readers:
            for name in self.eval_splits(split):
                metrics.update(self.score_split(model, name, kind, out_dir, progress))
        print(format_table(metrics))
        return metrics

    def score_split(self, model: FinetunedModel, split: str, kind: str, out_dir: Path,
                    progress: bool) -> dict:
        """Write and score `refcoco_<kind>_<split>_results.json`."""
        rows = self.predict(model.eval(), split, kind, progress)
        done = {r["sent_id"] for r in rows}
        sentences = self.sentences(split)
        # an unusable image or box file still needs a result: an empty box, never right
        results = [{k: r[k] for k in ("sent_id", "ref_id", "image_id", "box", "candidate",
                                      "scores")} for r in rows]
        results += [{"sent_id": s["sent_id"], "ref_id": s["ref_id"], "image_id": s["image_id"],
                     "box": [0.0, 0.0, 0.0, 0.0], "candidate": -1, "scores": []}
                    for s in sentences if s["sent_id"] not in done]
        path = Path(out_dir) / f"refcoco_{kind}_{split}_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
        scored = evaluate_refcoco(path, self.refer, splits=[split])
        key = f"refcoco_{kind}_{split}"
        gts = [r["gt"] for r in rows] + [xywh_to_xyxy(s["box"]) for s in sentences
                                          if s["sent_id"] not in done]
        candidates = [r["candidates"] for r in rows] + [[]] * (len(gts) - len(rows))
        metrics = {key: scored[f"refcoco_{split}"],
                   f"{key}_random": random_candidate_accuracy(candidates, gts),
                   f"{key}_count": scored[f"refcoco_{split}_count"],
                   f"{key}_skipped": len(sentences) - len(done)}
        if kind == "det":
            metrics[f"{key}_oracle"] = oracle_accuracy(candidates, gts)
        print(f"results: {path}")
        return metrics

    # ------------------------------------------------------------------ the model directory
    def head_config(self) -> dict:
        return {"max_length": self.max_length}


class RefCOCOModel:
    """A fine-tuned referring-expression model: `locate(image, expression, boxes=...,
    regions=...)`."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned RefCOCO model directory (a path or a modeldir.ModelDir)."""
        def head(config, encoder):
            return RefCOCOHead(encoder.width)

        folder, self.model, tokenizer, transform = load_finetuned_parts(folder, head)
        self.device = resolve_device(device)
        self.model.to(self.device)
        backbone = self.model.backbone
        self.regions = backbone.objects_are_regions
        max_length = folder.config["head"]["max_length"]
        self.limit = slot_limit(backbone, max_length)
        self.text = ExpressionText(tokenizer, max_length, slots=not self.regions)
        self.reader = reader_for(backbone, transform, None)

    @torch.no_grad()
    def locate(self, image, expression: str, *, boxes=None,
               regions: str | Path | None = None) -> tuple[int, list[float]]:
        """(index of the candidate the expression refers to, every candidate's probability).
        Region backbones take the image's region file (`regions`: its rows are the
        candidates; rows whose box has no area inside the image are dropped first, as the
        reader does); patch and fused backbones take the candidates' `boxes`
        ([[x1, y1, x2, y2], ...] in pixels)."""
        image = Path(image) if isinstance(image, (str, Path)) else to_pil_rgb(image)
        if self.regions:
            if boxes is not None:
                raise ValueError("this model's candidates are the regions of the image's "
                                 "region file (regions=PATH.npz), not boxes")
            visual = self.reader.read(image, regions_file=regions)
            count = len(visual["regions"])
        else:
            if boxes is None or not len(boxes):
                raise ValueError("this model's visual tokens are patches: give the candidate "
                                 "boxes (boxes=[[x1, y1, x2, y2], ...] in pixels)")
            boxes = [list(b)[:4] for b in boxes]
            if len(boxes) > self.limit:
                raise ValueError(f"{len(boxes)} boxes: this model scores at most "
                                 f"{self.limit} candidates at once (its text positions)")
            visual = self.reader.read(image, boxes)
            count = len(boxes)
        batch = Batch(["image"], **collate_visual([visual]))
        text = self.text([expression], [count] if not self.regions else None)
        batch.input_ids, batch.attention_mask = text.pop("input_ids"), \
            text.pop("attention_mask")
        batch.fields.update(text)
        out = self.model(**model_inputs(batch, self.device, torch.float32))
        probs = out["logits"][0].float().softmax(-1).tolist()[:count]
        return max(range(len(probs)), key=probs.__getitem__), probs
