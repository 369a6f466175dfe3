"""VQA v2: official questions + annotations JSON in, official results JSON out, official
accuracy (vlp/eval/vqa_metric.py).

The answer vocabulary is the `vqa.num_answers` most frequent normalised answers among the ten
human answers of the training questions; each question's target is the soft VQA score of every
vocabulary answer (the metric's own min(#humans / 3, 1) averaged over the ten leave-one-out
annotator subsets), so a perfect prediction of the target maximises the metric. The loss is
BCE over the vocabulary from the joint [CLS] state.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.config import FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.jsonfiles import read_json, require
from vlp.data.visual import collate_visual
from vlp.eval.vqa_metric import evaluate_vqa, normalize_answer, soft_scores
from vlp.models.heads.vqa import VQAHead, vqa_loss
from vlp.models.device import resolve_device
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.common import FinetuneTask, RecordDataset, collate_items, load_finetuned_parts, \
    reader_for

SPLITS = ("train", "val")  # VQA v2 test answers are on the evaluation server only


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None) -> list[dict]:
    """Official files -> [{question_id, image_id, question, subtype, answers (10 str) or []}]."""
    questions = read_json(questions_path, "VQA questions")
    require(questions, ("questions",), f"VQA questions {questions_path}")
    subtype = questions.get("data_subtype", "")
    answers: dict[int, list[str]] = {}
    if annotations_path:
        annotations = read_json(annotations_path, "VQA annotations")
        require(annotations, ("annotations",), f"VQA annotations {annotations_path}")
        for a in annotations["annotations"]:
            require(a, ("question_id", "answers"), f"an annotation in {annotations_path}")
            answers[a["question_id"]] = [x["answer"] for x in a["answers"]]
    records = []
    for q in questions["questions"]:
        require(q, ("question_id", "image_id", "question"), f"a question in {questions_path}")
        if annotations_path and q["question_id"] not in answers:
            raise ValueError(f"{annotations_path} has no annotation for question_id "
                             f"{q['question_id']} of {questions_path}")
        records.append({"question_id": q["question_id"], "image_id": q["image_id"],
                        "question": q["question"], "subtype": subtype,
                        "answers": answers.get(q["question_id"], [])})
    return records


def answer_vocabulary(records: list[dict], n: int) -> list[str]:
    """The n most frequent normalised human answers (ties: alphabetical, for determinism)."""
    counts = Counter(normalize_answer(a) for r in records for a in r["answers"])
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def soft_targets(answers: list[str], index: dict[str, int]) -> torch.Tensor:
    """The official metric's score of each vocabulary answer (0 for the others)."""
    target = torch.zeros(len(index))
    for answer, score in soft_scores(answers).items():
        if answer in index:
            target[index[answer]] = score
    return target


class VQATask(FinetuneTask):
    name = "vqa"
    metric_names = ("train_vqa_score",)
    eval_metrics = ("vqa_acc", "vqa_acc_yes_no", "vqa_acc_number", "vqa_acc_other")

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer, transform,
                 root: Path, world_size: int = 1, answers: list[str] | None = None):
        """`answers`: a fine-tuned model's vocabulary (its answers.json), else built from the
        training annotations."""
        super().__init__(cfg, encoder, tokenizer, transform, root, world_size)
        v = cfg.vqa
        vqa_dir = root / "vqa"
        self.files = {
            "train": (v.train_questions or vqa_dir / "v2_OpenEnded_mscoco_train_questions.json",
                      v.train_annotations or vqa_dir / "v2_mscoco_train_annotations.json"),
            "val": (v.val_questions or vqa_dir / "v2_OpenEnded_mscoco_val_questions.json",
                    v.val_annotations or vqa_dir / "v2_mscoco_val_annotations.json")}
        self.images = Path(cfg.data.images) if cfg.data.images else root / "images"
        self.reader = reader_for(encoder, transform, cfg.data.regions or (root / "regions"))
        self._records = {}
        self.answers = answers or answer_vocabulary(self.records("train"), v.num_answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    # ------------------------------------------------------------------ data
    def records(self, split: str) -> list[dict]:
        split = "val" if split == "test" else split  # no public test answers
        if split not in self._records:
            self._records[split] = read_vqa(*self.files[split])
        return self._records[split]

    def image_path(self, record: dict) -> Path:
        return self.images / self.cfg.vqa.image_pattern.format(image_id=record["image_id"],
                                                               subtype=record["subtype"])

    def dataset(self, split: str) -> RecordDataset:
        records = self.records(split)
        self.reader.check_files(sorted({self.image_path(r) for r in records}),
                                f"VQA {split} images ({self.images})")

        def item(record, visual):
            return {"visual": visual, "question": record["question"],
                    "question_id": record["question_id"],
                    "target": soft_targets(record["answers"], self.index)}

        return RecordDataset(records, self.image_path, self.reader, item)

    def collate(self, items: list) -> Batch:
        batch = collate_items(items, "question_id")
        if len(batch):
            batch.input_ids, batch.attention_mask = self.tokenizer(
                batch.fields["question"], self.cfg.vqa.max_question_length)
        return batch

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> VQAHead:
        return VQAHead(encoder.width, len(self.answers))

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        dev, dtype = engine.device, engine.input_dtype
        out = engine(input_ids=batch.input_ids.to(dev),
                     attention_mask=batch.attention_mask.to(dev),
                     visual=batch.visual(dev, dtype))
        target = batch.fields["target"].to(dev)
        loss = vqa_loss(out["logits"], target)
        with torch.no_grad():  # the VQA score of the argmax answer (vocabulary answers only)
            score = target.gather(1, out["logits"].argmax(1, keepdim=True)).mean().item()
        return loss, [100.0 * score]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, model: FinetunedModel, split: str, progress: bool) -> list[dict]:
        loader = self.eval_loader(split)
        results = []
        device = next(model.parameters()).device
        for batch in tqdm(loader, desc=f"vqa {split}", disable=not progress):
            if not len(batch):
                continue
            logits = model(input_ids=batch.input_ids.to(device),
                           attention_mask=batch.attention_mask.to(device),
                           visual=batch.visual(device, torch.float32))["logits"]
            for qid, k in zip(batch.fields["question_id"], logits.argmax(1).tolist()):
                results.append({"question_id": qid, "answer": self.answers[k]})
        return results

    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        split = "val" if split == "test" else split
        results = self.predict(model.eval(), split, progress)
        answered = {r["question_id"] for r in results}
        records = self.records(split)
        # a question whose image could not be read still needs an answer in the results file
        fallback = self.answers[0]
        results += [{"question_id": r["question_id"], "answer": fallback} for r in records
                     if r["question_id"] not in answered]
        path = Path(out_dir) / f"vqa_{split}_results.json"
        path.write_text(json.dumps(results))
        questions, annotations = self.files[split]
        metrics = evaluate_vqa(results, questions, annotations)
        # the majority-answer baseline: always the most frequent training answer
        # (self.answers is ordered by training frequency)
        majority = [{"question_id": r["question_id"], "answer": fallback} for r in records]
        metrics["vqa_majority_baseline"] = evaluate_vqa(majority, questions,
                                                        annotations)["vqa_acc"]
        metrics["vqa_answer_vocabulary"] = len(self.answers)
        metrics["vqa_unanswered_questions"] = len(records) - len(answered)
        covered = sum(normalize_answer(r["answers"][0]) in self.index for r in records
                      if r["answers"])
        metrics["vqa_first_answer_in_vocab_pct"] = 100.0 * covered / max(1, len(records))
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items() if k.startswith("vqa_")))
        print(f"results: {path}")
        return metrics

    # ------------------------------------------------------------------ the model directory
    def head_config(self) -> dict:
        return {"num_answers": len(self.answers),
                "max_question_length": self.cfg.vqa.max_question_length}

    def task_files(self) -> dict[str, object]:
        return {"answers.json": self.answers}


class VQAModel:
    """A fine-tuned VQA model: `answer(image, question)`."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned VQA model directory (a path or a modeldir.ModelDir)."""
        def head(config, encoder):
            return VQAHead(encoder.width, config["head"]["num_answers"])

        folder, self.model, self.tokenizer, transform = load_finetuned_parts(folder, head)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.answers = folder.read_json("answers.json")
        self.max_length = folder.config["head"]["max_question_length"]
        self.reader = reader_for(self.model.backbone, transform, None)

    @torch.no_grad()
    def answer(self, image, question: str, *, regions: str | Path | None = None,
               top_k: int = 1):
        """The answer to `question` about `image` (a PIL image or a file); with top_k > 1 a
        list of (answer, probability). Region backbones need the image's region file."""
        if not isinstance(image, (str, Path)):
            from vlp.data.transforms import to_pil_rgb

            image = to_pil_rgb(image)
        visual = Batch(["image"], **collate_visual([self.reader.read(
            Path(image) if isinstance(image, str) else image, regions_file=regions)]))
        ids, mask = self.tokenizer([question], self.max_length)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            visual=visual.visual(self.device, torch.float32))["logits"][0]
        probs = logits.float().sigmoid()
        if top_k == 1:
            return self.answers[int(probs.argmax())]
        values, index = probs.topk(min(top_k, len(self.answers)))
        return [(self.answers[i], float(v)) for v, i in zip(values.tolist(), index.tolist())]
