"""VCR accuracy: Q->A, QA->R and Q->AR, each a 4-way choice per question.

As the VCR leaderboard scores (allenai/mosaic-leaderboard `vcr/evaluator/eval.py`): the answer
is the argmax of the 4 answer probabilities; the rationale is the argmax of the 4 rationale
probabilities conditioned on the *right* answer; Q->AR counts a question only when both are
right. Predictions come in two formats:

  - the leaderboard CSV: `annot_id, answer_0..answer_3, rationale_conditioned_on_a{i}_{j}`
    (16 columns: rationale j given answer i);
  - JSON lines: {"annot_id", "answer_probs": [4], "rationale_probs": [4]} with the rationale
    probabilities conditioned on the right answer, or [4][4] conditioned on each answer.

Scores may be probabilities or logits (only the argmax is used; ties go to the lower index, as
numpy's argmax). Annotations are VCR's jsonl (`annot_id`, `answer_label`, `rationale_label`).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from vlp.eval.inputs import EvalError, field, id_list, load_jsonl

ANSWER_COLUMNS = [f"answer_{i}" for i in range(4)]
RATIONALE_COLUMNS = [f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4)]
CSV_COLUMNS = ["annot_id", *ANSWER_COLUMNS, *RATIONALE_COLUMNS]
KEYS = ("Q->A", "QA->R", "Q->AR")


def _four(values, where: str) -> list[float]:
    """Four finite numbers."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise EvalError(f"{where}: expected 4 probabilities, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise EvalError(f"{where}: expected 4 numbers, got {values!r}")
        if not math.isfinite(v):
            raise EvalError(f"{where}: non-finite probability {v!r} in {values!r}")
        out.append(float(v))
    return out


def _rationales(values, where: str) -> list[list[float]] | list[float]:
    """[4] (given the right answer) or [4][4] (given each answer)."""
    if isinstance(values, (list, tuple)) and len(values) == 4 \
            and all(isinstance(v, (list, tuple)) for v in values):
        return [_four(v, f"{where}[{i}]") for i, v in enumerate(values)]
    return _four(values, where)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima


def _read_csv(path: Path) -> dict[str, tuple]:
    rows = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalError(f"{path}: missing columns {missing} (the leaderboard CSV has "
                            f"{', '.join(CSV_COLUMNS[:6])}, ..., {CSV_COLUMNS[-1]})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            values = {}
            for column in CSV_COLUMNS[1:]:
                text = row[column]
                try:
                    values[column] = float(text)
                except (TypeError, ValueError):  # None: the row is short
                    raise EvalError(f"{where}: column {column} is not a number: "
                                    f"{text!r}") from None
                if not math.isfinite(values[column]):
                    raise EvalError(f"{where}: column {column} is not finite: {text!r}")
            answers = [values[c] for c in ANSWER_COLUMNS]
            given = [[values[f"rationale_conditioned_on_a{i}_{j}"] for j in range(4)]
                     for i in range(4)]
            _add(rows, row["annot_id"], (answers, given), where)
    return rows


def _read_jsonl(path: Path) -> dict[str, tuple]:
    rows = {}
    for number, obj in load_jsonl(path):
        where = f"{path}:{number}"
        annot_id = field(obj, "annot_id", str, where)
        answers = _four(field(obj, "answer_probs", list, where), f"{where}: answer_probs")
        rationales = _rationales(field(obj, "rationale_probs", list, where),
                                 f"{where}: rationale_probs")
        _add(rows, annot_id, (answers, rationales), where)
    return rows


def _add(rows: dict, annot_id: str, value: tuple, where: str) -> None:
    if annot_id in rows:
        raise EvalError(f"{where}: annot_id {annot_id!r} appears twice")
    rows[annot_id] = value


def read_vcr_predictions(path: str | os.PathLike) -> dict[str, tuple]:
    """{annot_id: (answer scores [4], rationale scores [4] given the right answer or [4][4]
    given each answer)} from a leaderboard .csv or a .jsonl file."""
    path = Path(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    return _read_jsonl(path)


def evaluate_vcr(predictions: str | os.PathLike, annotations: str | os.PathLike) -> dict:
    """{"Q->A", "QA->R", "Q->AR"} in percent and "count", for every annotated question.

    predictions: the leaderboard CSV or a JSON-lines file (see the module docstring);
    annotations: VCR's val.jsonl (or train.jsonl). The two must hold the same annot_ids.
    """
    preds = read_vcr_predictions(predictions)
    labels = []
    for number, obj in load_jsonl(annotations):
        where = f"{annotations}:{number}"
        annot_id = field(obj, "annot_id", str, where)
        if "answer_label" not in obj:
            raise EvalError(f"{where}: no answer_label: the test split's labels are hidden "
                            f"(submit the CSV to the VCR leaderboard instead)")
        answer = field(obj, "answer_label", int, where)
        rationale = field(obj, "rationale_label", int, where)
        if not (0 <= answer < 4 and 0 <= rationale < 4):
            raise EvalError(f"{where}: labels must be 0..3, got answer_label={answer} "
                            f"rationale_label={rationale}")
        labels.append((annot_id, answer, rationale))
    if not labels:
        raise EvalError(f"{annotations}: no annotations to score")
    known = {a for a, _, _ in labels}
    if len(known) != len(labels):
        twice = [a for a in known if sum(a == b for b, _, _ in labels) > 1]
        raise EvalError(f"{annotations}: {id_list(twice)} annot_ids appear twice")
    missing = [a for a, _, _ in labels if a not in preds]
    if missing:
        raise EvalError(f"{predictions}: {id_list(missing)} annotated questions have no "
                        f"prediction")
    extra = [a for a in preds if a not in known]
    if extra:
        raise EvalError(f"{predictions}: {id_list(extra)} annot_ids are not in {annotations}")

    q_a = qa_r = q_ar = 0
    for annot_id, answer, rationale in labels:
        answer_scores, rationale_scores = preds[annot_id]
        if isinstance(rationale_scores[0], list):  # conditioned on each answer: take the right one
            rationale_scores = rationale_scores[answer]
        a_ok = _argmax(answer_scores) == answer
        r_ok = _argmax(rationale_scores) == rationale
        q_a += a_ok
        qa_r += r_ok
        q_ar += a_ok and r_ok
    n = len(labels)
    return {"Q->A": 100 * q_a / n, "QA->R": 100 * qa_r / n, "Q->AR": 100 * q_ar / n,
            "count": n}


def write_vcr_predictions(path: str | os.PathLike, rows) -> None:
    """Write predictions as the leaderboard CSV (path ends in .csv; every row needs rationale
    scores [4][4], conditioned on each answer) or as JSON lines (.jsonl; [4] or [4][4]).

    rows: dicts {"annot_id", "answer_probs", "rationale_probs"} (lists, tuples, numpy arrays
    or tensors of numbers)."""
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise EvalError(f"{path}: VCR predictions are written as .csv (the leaderboard's) or "
                        f".jsonl")
    clean = []
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        annot_id = row["annot_id"]
        answers = _four(_plain(row["answer_probs"]), f"{where}: answer_probs")
        rationales = _rationales(_plain(row["rationale_probs"]), f"{where}: rationale_probs")
        if path.suffix == ".csv" and not isinstance(rationales[0], list):
            raise EvalError(f"{where}: the leaderboard CSV needs rationale_probs conditioned "
                            f"on each of the 4 answers ([4][4]), got {len(rationales)} numbers")
        clean.append((str(annot_id), answers, rationales))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for annot_id, answers, rationales in clean:
                writer.writerow([annot_id, *map(repr, answers),
                                 *(repr(v) for given in rationales for v in given)])
        else:
            for annot_id, answers, rationales in clean:
                f.write(json.dumps({"annot_id": annot_id, "answer_probs": answers,
                                    "rationale_probs": rationales}) + "\n")


def _plain(values):
    """Nested lists of Python numbers from lists, numpy arrays or tensors."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return [_plain(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
            for v in values]


def format_table(metrics: dict) -> str:
    lines = [f"{'VCR accuracy':<12}  {'value':>7}  {'chance':>7}"]
    for key, chance in zip(KEYS, (25.0, 25.0, 6.25)):
        lines.append(f"{key:<12}  {metrics[key]:7.2f}  {chance:7.2f}")
    lines.append(f"questions={metrics['count']}")
    return "\n".join(lines)
