"""RefCOCO accuracy at IoU >= 0.5: IoU against hand-worked cases (touching, nested,
degenerate, exactly 0.5) and against a pixel count, accuracy per split against a hand count,
the random-candidate baseline and the oracle by hand, bad inputs named, and `vlp eval
refcoco --predictions`."""
import json
import pickle

import numpy as np
import pytest

from vlp.cli import main
from vlp.data.refer import Refer
from vlp.eval.inputs import EvalError
from vlp.eval.refcoco_metric import box_iou, evaluate_refcoco, format_table, oracle_accuracy, \
    random_candidate_accuracy, xywh_to_xyxy, xyxy_to_xywh


@pytest.mark.parametrize("a, b, iou", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),                 # the same box
    ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),                 # sharing an edge: no common area
    ([0, 0, 2, 2], [2, 2, 4, 4], 0.0),                 # touching at a corner
    ([0, 0, 2, 2], [3, 3, 5, 5], 0.0),                 # apart
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),               # 1 shared of 4 + 4 - 1
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),              # nested: the ratio of the areas
    ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),              # nested, exactly half
    ([0.5, 0.5, 2.5, 1.5], [1.5, 0.5, 3.5, 1.5], 1 / 3),  # fractional pixels
    ([1, 1, 1, 3], [0, 0, 4, 4], 0.0),                 # degenerate (no width) inside a box
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),                 # two points: no union, 0 (not NaN)
    ([1, 1, 1, 3], [1, 1, 1, 3], 0.0),                 # the same zero-width box
])
def test_iou_by_hand(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_iou_matches_a_pixel_count():
    """Integer boxes on a grid: IoU = shared cells / cells of either (an independent count)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        boxes = []
        for _ in range(2):
            x1, y1 = rng.integers(0, 12, size=2)
            boxes.append([int(x1), int(y1), int(x1 + rng.integers(0, 8)),
                          int(y1 + rng.integers(0, 8))])
        masks = []
        for x1, y1, x2, y2 in boxes:
            m = np.zeros((20, 20), bool)
            m[y1:y2, x1:x2] = True
            masks.append(m)
        union = (masks[0] | masks[1]).sum()
        expected = (masks[0] & masks[1]).sum() / union if union else 0.0
        assert box_iou(*boxes) == pytest.approx(expected)


def test_box_conversions():
    assert xywh_to_xyxy([1, 2, 3, 4]) == [1.0, 2.0, 4.0, 6.0]
    assert xyxy_to_xywh([1, 2, 4, 6]) == [1.0, 2.0, 3.0, 4.0]


def test_random_baseline_and_oracle_by_hand():
    gt = [0, 0, 10, 10]
    candidates = [
        [[0, 0, 10, 10], [20, 20, 30, 30]],                    # 1 of 2 right
        [[0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 4]],        # IoU 1, 0.6, 0.4: 2 of 3
        [[0, 0, 10, 4]],                                       # none (a missed detection)
        [],                                                    # no candidate at all
    ]
    assert random_candidate_accuracy(candidates, [gt] * 4) == \
        pytest.approx(100 * (1 / 2 + 2 / 3 + 0 + 0) / 4)
    assert oracle_accuracy(candidates, [gt] * 4) == pytest.approx(50.0)
    assert random_candidate_accuracy([], []) == 0.0


def _files(tmp_path):
    """Two images; refs in val (2 sentences + 1), testA (1) and testB (1)."""
    instances = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64},
                   {"id": 2, "file_name": "b.jpg", "width": 64, "height": 64}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1},
                        {"id": 11, "image_id": 1, "bbox": [20, 20, 10, 10], "category_id": 1},
                        {"id": 20, "image_id": 2, "bbox": [5, 5, 20, 20], "category_id": 2}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": [{"sent_id": 0, "sent": "the left one"},
                       {"sent_id": 1, "sent": "the top circle"}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": [{"sent_id": 2, "sent": "the other circle"}]},
        {"ref_id": 2, "ann_id": 20, "image_id": 2, "split": "testA", "category_id": 2,
         "sentences": [{"sent_id": 3, "sent": "the square"}]},
        {"ref_id": 3, "ann_id": 11, "image_id": 1, "split": "testB", "category_id": 1,
         "sentences": [{"sent_id": 4, "sent": "the lower circle"}]},
    ]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "refs(unc).json").write_text(json.dumps(refs))
    return tmp_path / "refs(unc).p", tmp_path / "instances.json"


PREDICTIONS = [
    {"sent_id": 0, "box": [0, 0, 10, 10]},   # right (IoU 1)
    {"sent_id": 1, "box": [0, 0, 10, 5]},    # IoU exactly 0.5: right
    {"sent_id": 2, "box": [0, 0, 10, 10]},   # the other circle: wrong (IoU 0)
    {"sent_id": 3, "box": [5, 5, 20, 9.9]},  # IoU 0.495: wrong
    {"sent_id": 4, "box": [20, 20, 10, 10]},  # right
]


def test_accuracy_per_split_by_hand(tmp_path):
    refs, instances = _files(tmp_path)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(PREDICTIONS))
    metrics = evaluate_refcoco(path, refs, instances)
    assert metrics == {"refcoco_val": pytest.approx(200 / 3), "refcoco_val_count": 3,
                       "refcoco_testA": 0.0, "refcoco_testA_count": 1,
                       "refcoco_testB": 100.0, "refcoco_testB_count": 1}
    # the JSON copy of the refs, a JSON-lines file, a Refer and in-memory rows agree
    lines = tmp_path / "pred.jsonl"
    lines.write_text("".join(json.dumps(p) + "\n" for p in PREDICTIONS))
    refer = Refer.from_files(tmp_path / "refs(unc).json", instances)
    assert evaluate_refcoco(lines, refer) == metrics
    assert evaluate_refcoco(PREDICTIONS, refs, instances, ["testB"]) == \
        {"refcoco_testB": 100.0, "refcoco_testB_count": 1}
    # "test" takes every test split (the refer toolkit's getRefIds rule)
    assert evaluate_refcoco(PREDICTIONS, refer, splits=["test"]) == \
        {"refcoco_test": 50.0, "refcoco_test_count": 2}
    assert "testA" in format_table(metrics) and "66.67" in format_table(metrics)


def test_bad_predictions_are_named(tmp_path):
    refs, instances = _files(tmp_path)
    with pytest.raises(EvalError, match=r"1 \(4\) sentences of split 'testB' have no"):
        evaluate_refcoco(PREDICTIONS[:4], refs, instances, ["val", "testB"])
    with pytest.raises(EvalError, match=r"sent_ids are not in the refs"):
        evaluate_refcoco(PREDICTIONS + [{"sent_id": 99, "box": [0, 0, 1, 1]}], refs, instances)
    with pytest.raises(EvalError, match=r"\[1\]: box must be \[x, y, w, h\]"):
        evaluate_refcoco([PREDICTIONS[0], {"sent_id": 1, "box": [0, 0, 1]}], refs, instances)
    with pytest.raises(EvalError, match="negative width"):
        evaluate_refcoco([{"sent_id": 1, "box": [5, 5, -1, 3]}], refs, instances)
    with pytest.raises(EvalError, match="appears twice"):
        evaluate_refcoco([PREDICTIONS[0], PREDICTIONS[0]], refs, instances)
    with pytest.raises(EvalError, match=r"no sentence is in split 'testC'"):
        evaluate_refcoco(PREDICTIONS, refs, instances, ["testC"])
    bad = json.loads(instances.read_text())
    bad["annotations"][0]["bbox"] = [0, 0, 10]
    instances.write_text(json.dumps(bad))
    with pytest.raises(EvalError, match=r"annotation 10: bbox must be \[x, y, w, h\]"):
        evaluate_refcoco(PREDICTIONS, refs, instances)


def test_vlp_eval_refcoco_predictions(tmp_path, capsys):
    refs, instances = _files(tmp_path)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(PREDICTIONS))
    out = tmp_path / "m.json"
    assert main(["eval", "refcoco", "--predictions", str(path), "--refs", str(refs),
                 "--instances", str(instances), "--split", "val", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"refcoco_val": pytest.approx(200 / 3),
                                           "refcoco_val_count": 3}
    path.write_text(json.dumps(PREDICTIONS[:2]))
    capsys.readouterr()
    assert main(["eval", "refcoco", "--predictions", str(path), "--refs", str(refs),
                 "--instances", str(instances)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "have no prediction" in err[0]
    assert main(["eval", "refcoco", "--predictions", str(path)]) == 2
