"""VCR (Zellers et al., 2019): the official jsonl + image/metadata folder in, the leaderboard CSV
out, Q->A / QA->R / Q->AR accuracy (vlp/eval/vcr_metric.py).

Text. VCR's question, answers and rationales are token lists in which an object reference is a
list of indices into the record's `objects` (["what", "is", [0], "doing", "?"]). A reference
becomes the objects' names joined by "and", and the word pieces of each name are grounded in
their object, as VL-BERT does (`retokenize_and_convert_to_ids_with_tag` in VL-BERT's
vcr/data/datasets/vcr.py; the "and" is not grounded): `token_objects` holds the object index of
each such piece (-1 elsewhere) and the backbone adds that object's visual embedding to the
piece's word embedding.

Sequences (VL-BERT / UNITER; no segment ids: the backbone takes none, [SEP] separates):
    Q->A   [CLS] question [SEP] answer_i [SEP]              i = 0..3
    QA->R  [CLS] question answer [SEP] rationale_j [SEP]     j = 0..3
One score per sequence from the joint [CLS] state, softmax cross-entropy over the four. Each
training question gives one Q->A sample and one QA->R sample (with the right answer). Too long
a sequence loses tokens from the end of the question, then of the answer, and only then of the
choice (the choice is what is scored).

Evaluation scores the rationales given each of the 4 answers: the leaderboard CSV's 16
`rationale_conditioned_on_a{i}_{j}` columns, 20 sequences a question
(vcr.condition_on_each_answer=false: given the right answer only, JSON lines, 8 a question).
The image is encoded once per question (its visual tokens shared by those sequences: VCRHead).
VCR's test labels are hidden, so eval.split=test scores val.

Objects. For region backbones (`objects_are_regions`) the objects ARE the visual regions: the
image's region file ({image file stem}.npz in data.regions) must hold one row per VCR object,
in the objects' order (the shapes world's benchmarks/regions/*.npz do; for real VCR, extract
features for the metadata boxes). Patch and fused backbones pool each object's box (the
`boxes` of metadata_fn, pixels) from their patch grid. A question that refers to an object
the image has no region (or box) for is skipped and counted.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.config import ConfigError, FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.jsonfiles import read_json, read_jsonl, require
from vlp.data.visual import VisualError, collate_visual
from vlp.eval.vcr_metric import evaluate_vcr, format_table, write_vcr_predictions
from vlp.models.heads.vcr import VCRHead, vcr_loss
from vlp.models.device import resolve_device
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.common import FinetuneTask, RecordDataset, Skipped, collate_items, \
    load_finetuned_parts, reader_for
from vlp.tokenizer import Tokenizer

NUM_CHOICES = 4
FIELDS = ("annot_id", "question", "answer_choices", "rationale_choices", "objects", "img_fn",
          "answer_label", "rationale_label")

Piece = tuple[list[int], list[int]]  # (token ids, object index per token or -1)


# ---------------------------------------------------------------------------- text
def reference_words(tokens: list, names: list[str], where: str = "") -> list[tuple[str, int]]:
    """A VCR token list -> [(word, object index or -1)]: a reference [i, j] becomes
    (names[i], i), ("and", -1), (names[j], j)."""
    words = []
    for token in tokens:
        if isinstance(token, str):
            words.append((token, -1))
            continue
        if not isinstance(token, list) or not token:
            raise ValueError(f"{where}: token {token!r} is neither a word nor a list of object "
                             "indices")
        for k, i in enumerate(token):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(names):
                raise ValueError(f"{where}: object reference {token!r} indexes outside the "
                                 f"{len(names)} objects {names}")
            if k:
                words.append(("and", -1))
            words.append((names[i], i))
    return words


def max_reference(token_lists) -> int:
    """The largest object index referred to in some token lists (-1: none)."""
    return max((i for tokens in token_lists for t in tokens if isinstance(t, list) for i in t),
               default=-1)


class VCRText:
    """Word pieces of VCR token lists with their grounding, and the [CLS] ctx [SEP] choice
    [SEP] sequences cut to `max_length`."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        if tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise ValueError(f"VCR sequences need [CLS] and [SEP] tokens; {tokenizer} has none")
        if max_length < 4:
            raise ConfigError(f"vcr.max_length={max_length} leaves no room for text ([CLS], "
                              "two [SEP] and at least one word)")
        import tokenizers

        # a private copy without the padding / truncation Tokenizer.__call__ configures
        self.hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
        self.hf.no_padding()
        self.hf.no_truncation()
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_id, tokenizer.sep_id, \
            tokenizer.pad_id
        self.max_length = max_length

    def encode(self, tokens: list, names: list[str], where: str = "") -> Piece:
        """Word pieces of a VCR token list and the object of each (-1: not grounded)."""
        words = reference_words(tokens, names, where)
        if not words:
            return [], []
        # one input word per VCR word: word_ids tell which word each piece came from
        enc = self.hf.encode([w for w, _ in words], is_pretokenized=True,
                             add_special_tokens=False)
        return list(enc.ids), [words[w][1] if w is not None else -1 for w in enc.word_ids]

    def sequence(self, context: list[Piece], choice: Piece) -> Piece:
        """[CLS] context pieces [SEP] choice [SEP], at most max_length tokens: the overflow is
        cut from the end of the first context piece, then the next, then the choice."""
        parts = [*context, choice]
        over = sum(len(ids) for ids, _ in parts) - (self.max_length - 3)
        cut = []
        for ids, objs in parts:
            drop = min(max(over, 0), len(ids))
            cut.append((ids[:len(ids) - drop], objs[:len(objs) - drop]))
            over -= drop
        *ctx, (choice_ids, choice_objs) = cut
        ids = [self.cls_id, *(i for p, _ in ctx for i in p), self.sep_id, *choice_ids,
               self.sep_id]
        objs = [-1, *(o for _, p in ctx for o in p), -1, *choice_objs, -1]
        return ids, objs

    def pad(self, items: list[list[list[Piece]]]) -> dict[str, torch.Tensor]:
        """B items of G groups of C sequences -> input_ids, attention_mask, token_objects
        (B, G, C, L), L the longest sequence."""
        b, g, c = len(items), len(items[0]), len(items[0][0])
        length = max(len(ids) for item in items for group in item for ids, _ in group)
        ids = torch.full((b, g, c, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, g, c, length, dtype=torch.long)
        objects = torch.full((b, g, c, length), -1, dtype=torch.long)
        for i, item in enumerate(items):
            for j, group in enumerate(item):
                for k, (seq, objs) in enumerate(group):
                    ids[i, j, k, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[i, j, k, :len(seq)] = 1
                    objects[i, j, k, :len(seq)] = torch.tensor(objs, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "token_objects": objects}

    def groups(self, question: list, choices_per_group: list[list[list]], names: list[str],
               answers: list[list | None], where: str = "") -> list[list[Piece]]:
        """One group of sequences per (choices, answer given): Q->A groups take answer None,
        QA->R groups the answer whose rationales they score."""
        q = self.encode(question, names, f"{where} question")
        cache: dict[int, Piece] = {}

        # the same answer is context for one group and a choice in another: encode it once
        # (keyed by identity: every list lives in the caller's record for this call)
        def encoded(tokens):
            if id(tokens) not in cache:
                cache[id(tokens)] = self.encode(tokens, names, where)
            return cache[id(tokens)]

        out = []
        for choices, answer in zip(choices_per_group, answers):
            context = [q] if answer is None else [q, encoded(answer)]
            out.append([self.sequence(context, encoded(c)) for c in choices])
        return out


# ---------------------------------------------------------------------------- files
def read_vcr(path: str | Path) -> list[dict]:
    """VCR's jsonl (train.jsonl / val.jsonl), checked: every record has the fields the task
    reads, its labels (test.jsonl has none: it is scored by the leaderboard) and 4 answers and
    4 rationales."""
    records = read_jsonl(path, "VCR annotations")
    if not records:
        raise ValueError(f"VCR annotations: {path} holds no questions")
    for n, r in enumerate(records, 1):
        where = f"{path} line {n}"
        require(r, FIELDS, where)
        for key in ("answer_choices", "rationale_choices"):
            if not isinstance(r[key], list) or len(r[key]) != NUM_CHOICES:
                raise ValueError(f"{where}: {key} must hold {NUM_CHOICES} token lists, got "
                                 f"{r[key]!r:.200}")
        for key in ("answer_label", "rationale_label"):
            if r[key] not in range(NUM_CHOICES):
                raise ValueError(f"{where}: {key}={r[key]!r}, expected 0..{NUM_CHOICES - 1}")
    return records


def metadata_boxes(path: Path) -> list[list[float]]:
    """The object boxes (pixels x1 y1 x2 y2) of a VCR metadata file ({"boxes": [[x1, y1, x2,
    y2, score], ...], ...}); an unusable file raises VisualError (the sample is skipped)."""
    try:
        meta = read_json(path, "VCR metadata")
        boxes = [[float(v) for v in b[:4]] for b in meta["boxes"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise VisualError(f"{path}: unusable VCR metadata ({type(e).__name__}: {e})") from None
    if any(len(b) != 4 for b in boxes):
        raise VisualError(f"{path}: every box needs x1, y1, x2, y2")
    return boxes


def object_count(encoder, visual: dict) -> int:
    """How many objects grounded words can point at: the regions, or the metadata boxes (in
    a VisualReader.read output)."""
    key = "regions" if encoder.objects_are_regions else "objects"
    return len(visual[key]) if key in visual else 0


# ---------------------------------------------------------------------------- the task
class VCRTask(FinetuneTask):
    name = "vcr"
    metric_names = ("train_choice_acc",)
    eval_metrics = ("Q->A", "QA->R", "Q->AR")

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer, transform,
                 root: Path, world_size: int = 1):
        super().__init__(cfg, encoder, tokenizer, transform, root, world_size)
        v = cfg.vcr
        vcr_dir = root / "vcr"
        self.files = {"train": Path(v.train or vcr_dir / "train.jsonl"),
                      "val": Path(v.val or vcr_dir / "val.jsonl")}
        self.images = Path(v.images or cfg.data.images or vcr_dir / "images")
        self.reader = reader_for(encoder, transform, cfg.data.regions or (root / "regions"))
        limit = encoder.text_positions
        self.max_length = min(v.max_length, limit)
        if self.max_length < v.max_length:
            print(f"vcr.max_length={v.max_length} is more than the backbone's {limit} text "
                  f"positions: sequences are cut to {limit} tokens")
        self.text = VCRText(tokenizer, self.max_length)
        self.each_answer = v.condition_on_each_answer
        self._records = {"train": read_vcr(self.files["train"])}

    # ------------------------------------------------------------------ data
    def records(self, split: str) -> list[dict]:
        split = "val" if split == "test" else split  # VCR's test labels are hidden
        if split not in self._records:
            self._records[split] = read_vcr(self.files[split])
        return self._records[split]

    def image_path(self, record: dict) -> Path:
        return self.images / record["img_fn"]

    def _boxes(self, record: dict) -> list[list[float]]:
        if "metadata_fn" not in record:
            raise VisualError(f"VCR question {record['annot_id']} has no metadata_fn",
                              "missing_regions")
        return metadata_boxes(self.images / record["metadata_fn"])

    def dataset(self, split: str) -> RecordDataset:
        records = self.records(split)
        what = f"VCR {split} images ({self.images})"
        self.reader.check_files(sorted({self.image_path(r) for r in records}), what)
        regions = self.encoder.objects_are_regions
        if not regions:
            missing = sorted({str(self.images / r.get("metadata_fn", "?")) for r in records
                              if not (self.images / r.get("metadata_fn", "?")).is_file()})
            if missing:
                raise FileNotFoundError(f"{what}: {len(missing)} metadata file(s) missing, e.g. "
                                        f"{', '.join(missing[:3])}")
        if split == "train":  # one Q->A and one QA->R sample per question
            samples = [(r, kind) for r in records for kind in ("answer", "rationale")]
        else:
            samples = [(r, "eval") for r in records]
        # bound methods, not lambdas: spawned loader workers (macOS) pickle the dataset
        return RecordDataset(samples, self._sample_image, self.reader, self._item,
                             None if regions else self._sample_boxes)

    def _sample_image(self, sample: tuple[dict, str]) -> Path:
        return self.image_path(sample[0])

    def _sample_boxes(self, sample: tuple[dict, str]) -> list[list[float]]:
        return self._boxes(sample[0])

    def _item(self, sample: tuple[dict, str], visual: dict) -> dict | Skipped:
        r, kind = sample
        refs = max_reference([r["question"], *r["answer_choices"], *r["rationale_choices"]])
        if refs >= object_count(self.encoder, visual):
            # it refers to an object with no region / box: skipped and counted
            return Skipped("missing_regions")
        names, where = list(r["objects"]), f"VCR {r['annot_id']}"
        answers, rationales = r["answer_choices"], r["rationale_choices"]
        if kind == "answer":
            groups = self.text.groups(r["question"], [answers], names, [None], where)
            labels = [r["answer_label"]]
        elif kind == "rationale":
            right = answers[r["answer_label"]]
            groups = self.text.groups(r["question"], [rationales], names, [right], where)
            labels = [r["rationale_label"]]
        else:  # evaluation: the answers, then the rationales given each answer (or the right)
            given = answers if self.each_answer else [answers[r["answer_label"]]]
            groups = self.text.groups(r["question"], [answers] + [rationales] * len(given),
                                      names, [None, *given], where)
            labels = []
        return {"visual": visual, "groups": groups, "annot_id": r["annot_id"],
                "labels": torch.tensor(labels, dtype=torch.long)}

    def collate(self, items: list) -> Batch:
        batch = collate_items(items, "annot_id")
        if len(batch):
            text = self.text.pad(batch.fields.pop("groups"))
            batch.input_ids, batch.attention_mask = text["input_ids"], text["attention_mask"]
            batch.fields["token_objects"] = text["token_objects"]
        return batch

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> VCRHead:
        return VCRHead(encoder.width)

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        dev, dtype = engine.device, engine.input_dtype
        out = engine(**model_inputs(batch, dev, dtype))
        labels = batch.fields["labels"].to(dev)  # (B, 1)
        loss = vcr_loss(out["logits"], labels)
        with torch.no_grad():
            acc = (out["logits"].argmax(-1) == labels).float().mean().item()
        return loss, [100.0 * acc]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, model: FinetunedModel, split: str, progress: bool) -> list[dict]:
        """{"annot_id", "answer_probs" [4], "rationale_probs" [4][4] (given each answer) or [4]
        (given the right one)} for every readable question of `split`."""
        loader = self.eval_loader(split)
        device = next(model.parameters()).device
        rows = []
        for batch in tqdm(loader, desc=f"vcr {split}", disable=not progress):
            if not len(batch):
                continue
            probs = model(**model_inputs(batch, device, torch.float32))["logits"].float() \
                .softmax(-1)  # (B, G, 4)
            for annot_id, p in zip(batch.fields["annot_id"], probs.tolist()):
                rows.append({"annot_id": annot_id, "answer_probs": p[0],
                             "rationale_probs": p[1:] if self.each_answer else p[1]})
        return rows

    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        split = "val" if split == "test" else split
        rows = self.predict(model, split, progress)
        records = self.records(split)
        answered = {r["annot_id"] for r in rows}
        # a question whose image (or region file) could not be used still needs a row:
        # uniform scores, which the metric's argmax reads as choice 0
        uniform = [1.0 / NUM_CHOICES] * NUM_CHOICES
        rows += [{"annot_id": r["annot_id"], "answer_probs": uniform,
                  "rationale_probs": [uniform] * NUM_CHOICES if self.each_answer else uniform}
                 for r in records if r["annot_id"] not in answered]
        suffix = "csv" if self.each_answer else "jsonl"
        path = Path(out_dir) / f"vcr_{split}_predictions.{suffix}"
        write_vcr_predictions(path, rows)
        scores = evaluate_vcr(path, self.files[split])
        print(format_table(scores))
        metrics = {k: scores[k] for k in ("Q->A", "QA->R", "Q->AR")}
        metrics["vcr_questions"] = scores["count"]
        metrics["vcr_skipped_questions"] = len(records) - len(answered)
        metrics.update(self.prior_baseline(split))
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items() if k.startswith("vcr_")))
        print(f"predictions: {path}")
        return metrics

    def prior_baseline(self, split: str) -> dict:
        """The answer-prior baseline, scored by the same metric: always the training split's
        most frequent answer_label position and rationale_label position."""
        train = self.records("train")

        def most_frequent(key):  # ties: the lower position
            counts = Counter(r[key] for r in train)
            return min(range(NUM_CHOICES), key=lambda i: (-counts[i], i))

        def one_hot(i):
            return [float(i == j) for j in range(NUM_CHOICES)]

        a, r = most_frequent("answer_label"), most_frequent("rationale_label")
        rows = [{"annot_id": rec["annot_id"], "answer_probs": one_hot(a),
                 "rationale_probs": one_hot(r)} for rec in self.records(split)]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prior.jsonl"
            write_vcr_predictions(path, rows)
            scores = evaluate_vcr(path, self.files[split])
        return {f"vcr_prior_{k}": scores[k] for k in ("Q->A", "QA->R", "Q->AR")}

    # ------------------------------------------------------------------ the model directory
    def head_config(self) -> dict:
        return {"max_length": self.max_length}


def model_inputs(batch: Batch, device, dtype) -> dict:
    """The head's inputs of a collated batch, on `device` (visual floats in `dtype`); the
    objects' boxes ride with the visual inputs (VCRHead repeats them per sequence)."""
    visual = batch.visual(device, dtype)
    if batch.object_boxes is not None:
        visual["object_boxes"] = batch.object_boxes.to(device, dtype)
        visual["object_mask"] = batch.object_mask.to(device)
    token_objects = batch.fields.get("token_objects")
    return {"input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
            "token_objects": None if token_objects is None else token_objects.to(device),
            "visual": visual}


class VCRModel:
    """A fine-tuned VCR model: `choose(image, question, choices, objects=...)`."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned VCR model directory (a path or a modeldir.ModelDir)."""
        def head(config, encoder):
            return VCRHead(encoder.width)

        folder, self.model, tokenizer, transform = load_finetuned_parts(folder, head)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.text = VCRText(tokenizer, folder.config["head"]["max_length"])
        self.reader = reader_for(self.model.backbone, transform, None)

    @torch.no_grad()
    def choose(self, image, question: list, choices: list[list], *, objects: list[str],
               answer: list | None = None, boxes=None, regions: str | Path | None = None
               ) -> tuple[int, list[float]]:
        """(index of the best choice, the choices' probabilities). Token lists as in VCR's
        jsonl (an object reference is a list of indices into `objects`, the object names);
        `answer` (a token list) makes it QA->R: the choices are rationales for that answer.
        Region backbones take the image's region file (`regions`, one row per object);
        others take the objects' `boxes` in pixels (VCR metadata's, x1 y1 x2 y2 [score])."""
        backbone = self.model.backbone
        if isinstance(question, str):
            question = question.split()
        if not isinstance(image, (str, Path)):
            from vlp.data.transforms import to_pil_rgb

            image = to_pil_rgb(image)
        else:
            image = Path(image)
        refs = max_reference([question, *choices, answer or []])
        object_boxes = None
        if not backbone.objects_are_regions and refs >= 0:
            if boxes is None:
                raise ValueError("this model's visual tokens are patches: grounded words need "
                                 "the objects' boxes (boxes=[[x1, y1, x2, y2], ...] in pixels, "
                                 "as in VCR's metadata)")
            object_boxes = [list(b)[:4] for b in boxes]
        visual = self.reader.read(image, object_boxes, regions_file=regions)
        if backbone.objects_are_regions or object_boxes is not None:
            n = object_count(backbone, visual)
            if refs >= n:
                raise ValueError(f"the text refers to object {refs}, but the image has "
                                 f"{n} {'regions' if backbone.objects_are_regions else 'boxes'}")
        groups = self.text.groups(question, [choices], list(objects), [answer])
        inputs = self.text.pad([groups])
        batch = Batch(["image"], input_ids=inputs["input_ids"],
                      attention_mask=inputs["attention_mask"], **collate_visual([visual]))
        if object_boxes is not None or backbone.objects_are_regions:
            # else nothing is grounded and there are no boxes to pool
            batch.fields["token_objects"] = inputs["token_objects"]
        out = self.model(**model_inputs(batch, self.device, torch.float32))
        probs = out["logits"][0, 0].float().softmax(-1).tolist()
        return max(range(len(probs)), key=probs.__getitem__), probs
