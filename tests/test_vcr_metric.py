"""VCR Q->A, QA->R, Q->AR: a hand count, both prediction formats, errors."""
import json

import numpy as np
import pytest

from vlp.cli import main
from vlp.eval.inputs import EvalError
from vlp.eval.vcr_metric import CSV_COLUMNS, evaluate_vcr, write_vcr_predictions

# (answer_label, rationale_label) per question
LABELS = {"val-0": (0, 1), "val-1": (2, 2), "val-2": (3, 0), "val-3": (1, 3), "val-4": (0, 0)}


def _onehot(i: int, p: float = 0.7) -> list[float]:
    rest = (1 - p) / 3
    return [p if j == i else rest for j in range(4)]


# predicted (answer, rationale given the right answer):
#   val-0 (0, 1): both right         -> Q->A, QA->R, Q->AR
#   val-1 (2, 0): answer right only  -> Q->A
#   val-2 (1, 0): rationale only     -> QA->R
#   val-3 (1, 3): both right         -> Q->A, QA->R, Q->AR
#   val-4 (3, 2): both wrong
# Q->A 3/5 = 60, QA->R 3/5 = 60, Q->AR 2/5 = 40
PREDICTED = {"val-0": (0, 1), "val-1": (2, 0), "val-2": (1, 0), "val-3": (1, 3), "val-4": (3, 2)}
EXPECTED = {"Q->A": 60.0, "QA->R": 60.0, "Q->AR": 40.0, "count": 5}


def _rows(full: bool) -> list[dict]:
    rows = []
    for annot_id, (answer, rationale) in PREDICTED.items():
        gold = LABELS[annot_id][0]
        if full:  # conditioned on each answer: only the gold answer's row should be used
            given = [_onehot(rationale if i == gold else (rationale + 1) % 4) for i in range(4)]
        else:
            given = _onehot(rationale)
        rows.append({"annot_id": annot_id, "answer_probs": np.array(_onehot(answer)),
                     "rationale_probs": given})
    return rows


@pytest.fixture
def annotations(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"annot_id": a, "answer_label": al, "rationale_label": rl,
                                        "question": ["why", "?"]}) + "\n"
                            for a, (al, rl) in LABELS.items()))
    return path


@pytest.mark.parametrize("name, full", [("preds.csv", True), ("preds.jsonl", False),
                                        ("preds_full.jsonl", True)])
def test_hand_count(tmp_path, annotations, name, full):
    path = tmp_path / name
    write_vcr_predictions(path, _rows(full))
    assert evaluate_vcr(path, annotations) == EXPECTED


def test_csv_is_the_leaderboard_format(tmp_path):
    path = tmp_path / "sub.csv"
    write_vcr_predictions(path, _rows(True))
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == CSV_COLUMNS and len(CSV_COLUMNS) == 21
    assert lines[1].split(",")[:5] == ["val-0", "0.7", *["0.10000000000000002"] * 3]
    with pytest.raises(EvalError, match=r"rows\[0\]: the leaderboard CSV needs rationale_probs "
                                        r"conditioned on each of the 4 answers"):
        write_vcr_predictions(path, _rows(False))


def test_ties_go_to_the_first_choice(tmp_path, annotations):
    path = tmp_path / "flat.jsonl"
    write_vcr_predictions(path, [{"annot_id": a, "answer_probs": [0.25] * 4,
                                  "rationale_probs": [0.25] * 4} for a in LABELS])
    got = evaluate_vcr(path, annotations)  # always choice 0: val-0 and val-4 answers right
    assert (got["Q->A"], got["QA->R"], got["Q->AR"]) == (40.0, 40.0, 20.0)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("edit, match", [
    (lambda rows: rows[:-1], r"1 \('val-4'\) annotated questions have no prediction"),
    (lambda rows: rows + [{**rows[0], "annot_id": "val-9"}],
     r"1 \('val-9'\) annot_ids are not in .*val\.jsonl"),
    (lambda rows: rows + [rows[0]], r":6: annot_id 'val-0' appears twice"),
    (lambda rows: [{**rows[0], "answer_probs": [0.5, 0.5, 0]}] + rows[1:],
     r":1: answer_probs: expected 4 probabilities, got \[0.5, 0.5, 0\]"),
    (lambda rows: [{**rows[0], "rationale_probs": [0.1, None, 0.2, 0.3]}] + rows[1:],
     r":1: rationale_probs: expected 4 numbers"),
    (lambda rows: [{**rows[0], "answer_probs": [0.1, float("nan"), 0.2, 0.3]}] + rows[1:],
     r":1: answer_probs: non-finite probability nan"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "answer_probs"}] + rows[1:],
     r":1: missing field 'answer_probs'"),
])
def test_bad_jsonl(tmp_path, annotations, edit, match):
    rows = [{"annot_id": a, "answer_probs": _onehot(0), "rationale_probs": _onehot(0)}
            for a in LABELS]
    path = tmp_path / "p.jsonl"
    _write_jsonl(path, edit(rows))
    with pytest.raises(EvalError, match=match):
        evaluate_vcr(path, annotations)


def test_bad_csv_and_annotations(tmp_path, annotations):
    path = tmp_path / "p.csv"
    write_vcr_predictions(path, _rows(True))
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], text[1].replace("0.7", "nan", 1), *text[2:]]) + "\n")
    with pytest.raises(EvalError, match=r"p\.csv:2: column answer_0 is not finite: 'nan'"):
        evaluate_vcr(path, annotations)
    path.write_text("\n".join([text[0], ",".join(text[1].split(",")[:10]), *text[2:]]) + "\n")
    with pytest.raises(EvalError, match=r"p\.csv:2: column rationale_conditioned_on_a1_1 is "
                                        r"not a number: None"):
        evaluate_vcr(path, annotations)
    path.write_text("annot_id,answer_0\nval-0,1\n")
    with pytest.raises(EvalError, match=r"p\.csv: missing columns \['answer_1'"):
        evaluate_vcr(path, annotations)
    write_vcr_predictions(path, _rows(True))
    hidden = tmp_path / "test.jsonl"
    _write_jsonl(hidden, [{"annot_id": a} for a in LABELS])
    with pytest.raises(EvalError, match=r"test\.jsonl:1: no answer_label: the test split's "
                                        r"labels are hidden"):
        evaluate_vcr(path, hidden)


def test_cli(tmp_path, annotations, capsys):
    path, out = tmp_path / "p.csv", tmp_path / "vcr.json"
    write_vcr_predictions(path, _rows(True))
    assert main(["eval", "vcr", "--predictions", str(path), "--annotations", str(annotations),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == EXPECTED
    assert "Q->AR" in capsys.readouterr().out
    assert main(["eval", "vcr", "--annotations", str(annotations)]) == 2
    assert "needs --predictions" in capsys.readouterr().err


def test_shapes_world_gold_labels_score_100(tmp_path):
    from vlp.data.synth import generate

    generate(tmp_path, images=0, val_images=0, benchmark_images=8, progress=False)
    val = tmp_path / "benchmarks" / "vcr" / "val.jsonl"
    items = [json.loads(line) for line in val.read_text().splitlines()]
    rows = [{"annot_id": x["annot_id"], "answer_probs": _onehot(x["answer_label"]),
             "rationale_probs": _onehot(x["rationale_label"])} for x in items]
    write_vcr_predictions(tmp_path / "p.jsonl", rows)
    got = evaluate_vcr(tmp_path / "p.jsonl", val)
    assert got == {"Q->A": 100.0, "QA->R": 100.0, "Q->AR": 100.0, "count": len(items)}
