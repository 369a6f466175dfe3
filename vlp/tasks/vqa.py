"""VQA v2: official questions + annotations JSON in, official results JSON out, official
accuracy (vlp/eval/vqa_metric.py).

The answer vocabulary is the `vqa.num_answers` most frequent normalised answers among the ten
human answers of the training questions; each question's target is the soft VQA score of every
vocabulary answer (the metric's own min(#humans / 3, 1) averaged over the ten leave-one-out
annotator subsets), so a perfect prediction of the target maximises the metric. The loss is
BCE over the vocabulary from the joint [CLS] state.

`vqa.head=generate` (BLIP's generative VQA, vlp/models/heads/vqa.py `AnswerLMHead`) trains the
prefix LM on `[CLS] question [SEP] answer [SEP]` over the visual tokens, the loss on the answer
tokens only, and decodes the answer as text (greedy, or beam with vqa.beam_size) through the
key/value-cached decoder captioning uses: not restricted to the vocabulary. The soft targets
become weights (`answer_weights`): every distinct creditable annotator answer of a question is
a training row weighted by the share of the ten annotators who gave it, so the loss is the
expected negative log-likelihood of the annotators' answers and the model's most likely answer
is the most frequent one, the answer the official metric credits most (the soft scores
themselves saturate at 3 annotators: 7 "yes" and 3 "no" would weigh alike). `vqa.head=rank`
trains the same way and answers with the candidate of vqa.answer_list (else the answer
vocabulary) whose summed log-likelihood is highest.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vlp.config import ConfigError, FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.jsonfiles import read_json, require
from vlp.data.visual import collate_visual
from vlp.eval.vqa_metric import evaluate_vqa, normalize_answer, soft_scores
from vlp.models.heads.caption import beam_search, greedy_search
from vlp.models.heads.vqa import AnswerLMHead, AnswerStep, VQAHead, answer_lm_loss, \
    candidate_log_likelihoods, encode_questions, vqa_loss
from vlp.models.device import resolve_device
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.caption import special_ids
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


def answer_weights(answers: list[str]) -> list[tuple[str, float]]:
    """Generative training rows of one question: [(answer, weight)], every distinct normalised
    annotator answer the official scorer can credit, weighted by how many annotators gave it
    (normalised as the vocabulary is), the weights summing to 1 (none: no creditable answer)."""
    creditable = soft_scores(answers)
    counts = Counter(a for a in (normalize_answer(x) for x in answers) if a in creditable and a)
    total = sum(counts.values())
    return [(a, n / total) for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


# spellings the official scorer reads as digits ("two" -> "2"): a tokenizer without digit tokens
# (the shapes world's, trained on captions that spell numbers out) still writes numbers
NUMBER_WORDS = ("none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten")


def writable_spelling(tokenizer, answer: str, max_length: int,
                      alternatives: tuple[str, ...] = (), cache: dict | None = None
                      ) -> str | None:
    """A text the tokenizer writes (no unknown word piece, within max_length answer tokens)
    that the official scorer reads as the normalised `answer`: the answer itself, else an
    alternative (the annotators' own forms), else a number word ("2" -> "two"); None when
    there is none (generative heads can neither learn nor produce that answer). `cache`:
    text -> writable, kept by the caller."""
    cache = {} if cache is None else cache
    for text in dict.fromkeys((answer, *alternatives, *NUMBER_WORDS)):
        if normalize_answer(text) != answer:
            continue
        if text not in cache:
            ids, _ = answer_tokens(tokenizer, [text], max_length)
            cache[text] = normalize_answer(tokenizer.decode(ids[0])) == answer
        if cache[text]:
            return text
    return None


def answer_tokens(tokenizer, answers: list[str], max_length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (N, La <= max_length): each answer's tokens ending in [SEP] (cut to
    max_length, [SEP] kept), right-padded; no [CLS]."""
    ids, mask = tokenizer(answers, max_length + 1)  # [CLS] a [SEP] <pad>
    ids, mask = ids[:, 1:], mask[:, 1:]
    width = max(1, int(mask.sum(1).max())) if len(answers) else 1
    return ids[:, :width], mask[:, :width]


def join_question_answer(question_ids: torch.Tensor, question_mask: torch.Tensor,
                         answer_ids: torch.Tensor, answer_mask: torch.Tensor, pad_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `[CLS] q [SEP]` (N, Lq) and `a [SEP]` (N, La), each right-padded ->
    (input_ids, attention_mask, labels), each (N, Lq + La - 1): `[CLS] q [SEP] a` as input,
    the next token as label at the positions that predict an answer token, else -100."""
    n, lq = question_ids.shape
    seq = torch.full((n, lq + answer_ids.shape[1]), pad_id, dtype=torch.long)
    mask = torch.zeros_like(seq)
    labels = torch.full_like(seq, -100)
    for i, (q, a) in enumerate(zip(question_mask.sum(1).tolist(), answer_mask.sum(1).tolist())):
        seq[i, :q] = question_ids[i, :q]
        seq[i, q:q + a] = answer_ids[i, :a]
        mask[i, :q + a] = 1
        labels[i, q:q + a] = answer_ids[i, :a]
    return seq[:, :-1], mask[:, :-1], labels[:, 1:]


def _question_groups(question_mask: torch.Tensor):
    """(length, rows) of the questions of each token length: the cached decoder holds rows of
    one length (a padded question would need per-row key masks in every cache)."""
    lengths = question_mask.sum(1)
    for length in sorted(set(lengths.tolist())):
        yield length, (lengths == length).nonzero().flatten()


@torch.no_grad()
def generate_answers(model: FinetunedModel, visual: dict, question_ids: torch.Tensor,
                     question_mask: torch.Tensor, tokenizer, *, max_length: int,
                     beam_size: int = 1) -> list[str]:
    """Decoded answers (greedy, or beam search ranked by summed log-probability) of a batch of
    tokenized questions about their images (`visual` on the model's device and dtype)."""
    backbone = model.backbone
    encoded = backbone.encode_visual(visual)
    _, eos, banned = special_ids(tokenizer)
    device = question_ids.device
    out = [""] * len(question_ids)
    for length, rows in _question_groups(question_mask):
        state, first = encode_questions(backbone, {k: v[rows] for k, v in encoded.items()},
                                        question_ids[rows, :length])
        step = AnswerStep(backbone, state, first)
        # the searches' start token stands for the question's [SEP] (already encoded)
        common = dict(bos_id=eos, eos_id=eos, max_length=max_length, banned_ids=banned,
                      device=device, reorder=step.reorder)
        if beam_size == 1:
            seqs = greedy_search(step, len(rows), **common)
        else:
            seqs = beam_search(step, len(rows), beam_size=beam_size, length_penalty=0.0,
                               **common)
        for row, seq in zip(rows.tolist(), seqs):
            out[row] = tokenizer.decode(seq).strip()
    return out


@torch.no_grad()
def rank_scores(model: FinetunedModel, visual: dict, question_ids: torch.Tensor,
                question_mask: torch.Tensor, candidate_ids: torch.Tensor,
                candidate_mask: torch.Tensor) -> torch.Tensor:
    """(B, C) summed log-likelihood of every candidate answer (`answer_tokens`) for each
    question, each question and image encoded once."""
    backbone = model.backbone
    encoded = backbone.encode_visual(visual)
    scores = torch.empty(len(question_ids), len(candidate_ids), device=question_ids.device)
    for length, rows in _question_groups(question_mask):
        state, first = encode_questions(backbone, {k: v[rows] for k, v in encoded.items()},
                                        question_ids[rows, :length])
        scores[rows] = candidate_log_likelihoods(backbone, state, first, candidate_ids,
                                                 candidate_mask)
    return scores


def read_answer_list(path: str | Path) -> list[str]:
    """vqa.answer_list: a JSON list of answer strings (e.g. BLIP's answer_list.json)."""
    answers = read_json(path, "VQA answer list (vqa.answer_list)")
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"vqa.answer_list={path}: expected a non-empty JSON list of non-empty "
                         "answer strings")
    return list(dict.fromkeys(answers))


def check_lengths(encoder: JointEncoder, cfg) -> None:
    """Generative heads: [CLS] question [SEP] answer must fit the backbone's text positions."""
    total = cfg.max_question_length + cfg.max_answer_length - 1
    if total > encoder.text_positions:
        raise ConfigError(f"vqa.max_question_length + vqa.max_answer_length - 1 = {total} "
                          f"exceeds the backbone's {encoder.text_positions} text positions; "
                          "lower them")


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
        self.candidates: list[str] = []  # rank: the answers it chooses from
        self._writes: dict[str, bool] = {}
        if v.head != "classify":
            check_lengths(encoder, v)
            special_ids(tokenizer)  # fail early on a tokenizer without start/end tokens
            self.metric_names = ("train_answer_token_acc",)
        if v.head == "rank":
            listed = read_answer_list(v.answer_list) if v.answer_list else self.answers
            # an answer the tokenizer cannot write in any spelling cannot be scored
            self.candidates = [a for a in listed if self.spelling(normalize_answer(a))]
            self.candidate_texts = [self.spelling(normalize_answer(a)) for a in self.candidates]

    # ------------------------------------------------------------------ answers as text
    def spelling(self, answer: str, alternatives: tuple[str, ...] = ()) -> str | None:
        return writable_spelling(self.tokenizer, answer, self.cfg.vqa.max_answer_length,
                                 alternatives, self._writes)

    def training_answers(self, answers: list[str]) -> list[tuple[str, float]]:
        """`answer_weights` in spellings the tokenizer writes; an answer without one is left
        out and its share with it (the others keep theirs)."""
        rows = []
        for answer, weight in answer_weights(answers):
            text = self.spelling(answer, tuple(a for a in answers
                                              if normalize_answer(a) == answer))
            if text is not None:
                rows.append((text, weight))
        return rows

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

        if self.cfg.vqa.head == "classify":
            def item(record, visual):
                return {"visual": visual, "question": record["question"],
                        "question_id": record["question_id"],
                        "target": soft_targets(record["answers"], self.index)}
        else:
            def item(record, visual):
                return {"visual": visual, "question": record["question"],
                        "question_id": record["question_id"],
                        "answers": self.training_answers(record["answers"])}

        return RecordDataset(records, self.image_path, self.reader, item)

    def collate(self, items: list) -> Batch:
        batch = collate_items(items, "question_id")
        if len(batch):
            batch.input_ids, batch.attention_mask = self.tokenizer(
                batch.fields["question"], self.cfg.vqa.max_question_length)
        return batch

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> nn.Module:
        if self.cfg.vqa.head == "classify":
            return VQAHead(encoder.width, len(self.answers))
        return AnswerLMHead()

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        if self.cfg.vqa.head != "classify":
            return self.answer_lm_loss(engine, batch)
        dev, dtype = engine.device, engine.input_dtype
        out = engine(input_ids=batch.input_ids.to(dev),
                     attention_mask=batch.attention_mask.to(dev),
                     visual=batch.visual(dev, dtype))
        target = batch.fields["target"].to(dev)
        loss = vqa_loss(out["logits"], target)
        with torch.no_grad():  # the VQA score of the argmax answer (vocabulary answers only)
            score = target.gather(1, out["logits"].argmax(1, keepdim=True)).mean().item()
        return loss, [100.0 * score]

    def answer_lm_loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        """Generative heads: one row per (question, creditable annotator answer), weighted."""
        dev, dtype = engine.device, engine.input_dtype
        rows, answers, weights = [], [], []
        for i, pairs in enumerate(batch.fields["answers"]):
            for answer, weight in pairs:
                rows.append(i)
                answers.append(answer)
                weights.append(weight)
        if not rows:  # no creditable answer in the batch: a zero-weight row keeps the graph
            rows, answers, weights = [0], [""], [0.0]
        index = torch.tensor(rows)
        a_ids, a_mask = answer_tokens(self.tokenizer, answers, self.cfg.vqa.max_answer_length)
        width = int(batch.attention_mask.sum(1).max())  # the longest question of the batch
        ids, mask, labels = join_question_answer(
            batch.input_ids[index, :width], batch.attention_mask[index, :width], a_ids, a_mask,
            self.tokenizer.pad_id)
        labels = labels.to(dev)
        out = engine(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                     visual=batch.visual(dev, dtype), labels=labels, rows=index.to(dev))
        loss = answer_lm_loss(out["logits"], labels, torch.tensor(weights, device=dev),
                              len(batch))
        with torch.no_grad():
            acc = (out["logits"].argmax(-1) == labels[labels != -100]).float().mean().item()
        return loss, [100.0 * acc]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, model: FinetunedModel, split: str, progress: bool) -> list[dict]:
        loader = self.eval_loader(split)
        results = []
        device = next(model.parameters()).device
        v = self.cfg.vqa
        if v.head == "rank":
            c_ids, c_mask = (t.to(device) for t in answer_tokens(
                self.tokenizer, self.candidate_texts, v.max_answer_length))
        for batch in tqdm(loader, desc=f"vqa {split}", disable=not progress):
            if not len(batch):
                continue
            if v.head != "classify":
                ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
                visual = batch.visual(device, torch.float32)
                if v.head == "generate":
                    answers = generate_answers(model, visual, ids, mask, self.tokenizer,
                                               max_length=v.max_answer_length,
                                               beam_size=v.beam_size)
                else:
                    best = rank_scores(model, visual, ids, mask, c_ids, c_mask).argmax(1)
                    answers = [self.candidates[k] for k in best.tolist()]
                results += [{"question_id": qid, "answer": a}
                            for qid, a in zip(batch.fields["question_id"], answers)]
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
        # generate: how open the vocabulary is in use (answers the classifier could not give)
        metrics["vqa_answers_outside_vocab"] = sum(normalize_answer(r["answer"]) not in self.index
                                                   for r in results)
        metrics["vqa_distinct_answers"] = len({r["answer"] for r in results})
        if self.cfg.vqa.head != "classify":  # the ceiling the tokenizer leaves a generator
            writable = sum(bool(r["answers"]) and self.spelling(normalize_answer(
                r["answers"][0]), (r["answers"][0],)) is not None for r in records)
            metrics["vqa_first_answer_writable_pct"] = 100.0 * writable / max(1, len(records))
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
        v = self.cfg.vqa
        return {"num_answers": len(self.answers), "max_question_length": v.max_question_length,
                "head": v.head, "max_answer_length": v.max_answer_length,
                "beam_size": v.beam_size}

    def task_files(self) -> dict[str, object]:
        return {"answers.json": self.answers}


class VQAModel:
    """A fine-tuned VQA model: `answer(image, question)` (any head: classify, generate, rank)."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned VQA model directory (a path or a modeldir.ModelDir)."""
        def head(config, encoder):
            if config["head"].get("head", "classify") == "classify":
                return VQAHead(encoder.width, config["head"]["num_answers"])
            return AnswerLMHead()

        folder, self.model, self.tokenizer, transform = load_finetuned_parts(folder, head)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.answers = folder.read_json("answers.json")
        config = folder.config["head"]
        self.head = config.get("head", "classify")
        self.max_length = config["max_question_length"]
        self.max_answer_length = config.get("max_answer_length", 8)
        self.beam_size = config.get("beam_size", 1)
        self.reader = reader_for(self.model.backbone, transform, None)
        if self.head == "rank":  # the answers the tokenizer can write, in their spellings: once
            texts = {a: writable_spelling(self.tokenizer, normalize_answer(a),
                                          self.max_answer_length) for a in self.answers}
            self.rank_answers = [a for a in self.answers if texts[a]]
            self.rank_ids, self.rank_mask = (t.to(self.device) for t in answer_tokens(
                self.tokenizer, [texts[a] for a in self.rank_answers], self.max_answer_length))

    @torch.no_grad()
    def answer(self, image, question: str, *, regions: str | Path | None = None,
               top_k: int = 1):
        """The answer to `question` about `image` (a PIL image or a file); with top_k > 1 a
        list of (answer, probability): the classifier's sigmoid scores (classify), the answer
        list's likelihoods normalised over the list (rank), or the decoded answer alone with
        its sequence probability (generate). Region backbones need the image's region file."""
        if not isinstance(image, (str, Path)):
            from vlp.data.transforms import to_pil_rgb

            image = to_pil_rgb(image)
        visual = Batch(["image"], **collate_visual([self.reader.read(
            Path(image) if isinstance(image, str) else image, regions_file=regions)]))
        visual = visual.visual(self.device, torch.float32)
        ids, mask = (t.to(self.device) for t in self.tokenizer([question], self.max_length))
        if self.head == "generate":
            text = generate_answers(self.model, visual, ids, mask, self.tokenizer,
                                    max_length=self.max_answer_length,
                                    beam_size=self.beam_size)[0]
            if top_k == 1:
                return text
            a_ids, a_mask = (t.to(self.device) for t in answer_tokens(
                self.tokenizer, [text], self.max_answer_length))
            logp = rank_scores(self.model, visual, ids, mask, a_ids, a_mask)[0, 0]
            return [(text, float(logp.exp()))]
        answers = self.answers
        if self.head == "rank":
            answers = self.rank_answers
            probs = rank_scores(self.model, visual, ids, mask, self.rank_ids,
                                self.rank_mask)[0].softmax(0)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, visual=visual)["logits"][0]
            probs = logits.float().sigmoid()
        if top_k == 1:
            return answers[int(probs.argmax())]
        values, index = probs.topk(min(top_k, len(answers)))
        return [(answers[i], float(v)) for v, i in zip(values.tolist(), index.tolist())]
