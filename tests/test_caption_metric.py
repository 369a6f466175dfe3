"""COCO caption metrics: equal to pycocoevalcap run directly, Karpathy references, errors."""
import json
import shutil

import pytest

from vlp.cli import main
from vlp.eval.caption_metric import METRICS, _one_line, evaluate_captions, karpathy_references
from vlp.eval.inputs import EvalError

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap needs Java (apt-get install "
                                       "default-jre-headless; .ci/run installs it)")

REFS = {
    1: ["A red circle on the left.", "a red ball", "one red circle, left side"],
    2: ["Two blue squares at the top", "two squares, both blue", "blue squares"],
    3: ["a green triangle in the center", "A triangle that is green!", "green triangle"],
    4: ["a yellow star and a white cross", "a star and a cross", "yellow star, white cross"],
}
HYPS = {1: "a red circle on the left", 2: "Two blue squares.", 3: "a green star at the bottom",
        4: "a yellow star next to a cross"}


def _coco(refs: dict) -> dict:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64} for i in refs]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": c}
            for i, caps in refs.items() for k, c in enumerate(caps)]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns}


def _results(hyps: dict) -> list:
    return [{"image_id": i, "caption": c} for i, c in hyps.items()]


@pytest.fixture
def files(tmp_path):
    ann, res = tmp_path / "captions_val.json", tmp_path / "results.json"
    ann.write_text(json.dumps(_coco(REFS)))
    res.write_text(json.dumps(_results(HYPS)))
    return ann, res


@needs_java
def test_equals_pycocoevalcap(files, monkeypatch):
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE downloads Stanford CoreNLP; everything else runs as shipped
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    ann, res = files
    coco = COCO(str(ann))
    reference = coco_eval.COCOEvalCap(coco, coco.loadRes(str(res)))
    reference.evaluate()
    ref = {k.upper() if k.startswith("Bleu") else k: v for k, v in reference.eval.items()}

    got = evaluate_captions(str(res), str(ann))
    for key in METRICS:
        assert got[key] == 100 * float(ref[key]), key  # exactly, only scaled
        assert 0 < got[key] < 100 or key == "CIDEr"
    assert got["num_images"] == 4


@needs_java
def test_identical_captions_beat_a_constant_caption(tmp_path):
    refs = {i: [f"a {c} {s} in the {p}", f"the {s} is {c}", f"{c} {s}"]
            for i, (c, s, p) in enumerate([("red", "circle", "top"), ("blue", "square", "left"),
                                           ("green", "star", "center"),
                                           ("pink", "cross", "bottom")], 1)}
    ann = _coco(refs)
    same = evaluate_captions(_results({i: caps[0] for i, caps in refs.items()}), ann)
    const = evaluate_captions(_results({i: "a shape on a dark background" for i in refs}), ann)
    assert same["CIDEr"] > 200 and const["CIDEr"] < 20
    assert same["BLEU_4"] > 90 > 10 > const["BLEU_4"]


def test_karpathy_references():
    dataset = {"dataset": "coco", "images": [
        {"split": "test", "cocoid": 42, "filename": "a.jpg", "imgid": 0,
         "sentences": [{"raw": "A Dog.", "tokens": ["a", "dog"], "sentid": 7}]},
        {"split": "train", "cocoid": 43, "filename": "b.jpg", "imgid": 1,
         "sentences": [{"raw": "A cat", "tokens": ["a", "cat"], "sentid": 8}]},
        {"split": "test", "imgid": 2, "filename": "c.jpg",  # Flickr30k files have no cocoid
         "sentences": [{"tokens": ["two", "birds"], "sentid": 9}]},
    ]}
    refs = karpathy_references(dataset, "test")
    assert refs["images"] == [{"id": 42, "file_name": "a.jpg"}, {"id": 2, "file_name": "c.jpg"}]
    assert refs["annotations"] == [{"id": 7, "image_id": 42, "caption": "A Dog."},
                                   {"id": 9, "image_id": 2, "caption": "two birds"}]
    with pytest.raises(EvalError, match=r"no images in split 'tset' .*'test', 'train'"):
        karpathy_references(dataset, "tset")


@pytest.mark.parametrize("results, match", [
    ([{"image_id": 9, "caption": "x"}], r"\[0\]: image_id 9 is not an image of the annotations"),
    ([{"image_id": "1", "caption": "x"}], r"annotations have 1: same id, other type"),
    ([{"image_id": 1, "caption": " "}], r"\[0\]: empty caption for image_id 1"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}],
     r"\[1\]: image_id 1 has two different captions \('a' and 'b'\)"),
    ([{"image_id": 1, "caption": "a"}], r"3 \(2, 3, 4\) images to score have no caption"),
    ([{"image_id": 1, "text": "a"}], r"\[0\]: missing field 'caption'"),
    ({"image_id": 1}, r"expected a JSON array at the top level"),
])
def test_bad_results(results, match):
    with pytest.raises(EvalError, match=match):
        evaluate_captions(results, _coco(REFS))


def test_bad_files(tmp_path, files):
    ann, _ = files
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(EvalError, match=f"{bad}: not valid JSON"):
        evaluate_captions(str(bad), str(ann))
    with pytest.raises(EvalError, match=r"\[3\]: field 'caption' must be a string, got 5"):
        evaluate_captions(_results(HYPS), {"images": [{"id": 1}], "annotations": [
            {"image_id": 1, "caption": "x"}] * 3 + [{"image_id": 1, "caption": 5}]})
    with pytest.raises(EvalError, match=r"1 \(2\) images have no reference captions"):
        evaluate_captions(_results(HYPS), {"images": [{"id": 1}, {"id": 2}],
                                           "annotations": [{"image_id": 1, "caption": "x"}]})


def test_a_caption_is_one_tokenizer_line():
    # pycocoevalcap replaces only "\n": a "\r" would split a caption over two lines of the
    # Java tokenizer's output and shift every later caption onto the wrong image
    assert _one_line(" a red\rcircle\u2028now\t ") == "a red circle now"


def test_missing_java_is_a_clear_error(files, monkeypatch):
    ann, res = files
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EvalError, match="pycocoevalcap needs Java: apt-get install "
                                        "default-jre-headless"):
        evaluate_captions(str(res), str(ann))


@needs_java
def test_cli_karpathy_split(tmp_path, capsys):
    images = [{"split": split, "cocoid": i, "filename": f"{i}.jpg", "imgid": i,
               "sentences": [{"raw": c, "sentid": 10 * i + k} for k, c in enumerate(REFS[i])]}
              for i, split in zip(REFS, ["test", "test", "val", "test"])]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": images}))
    res, out = tmp_path / "res.json", tmp_path / "out" / "caption.json"
    res.write_text(json.dumps(_results({i: c for i, c in HYPS.items() if i != 3})))
    assert main(["eval", "caption", "--predictions", str(res), "--karpathy", str(karpathy),
                 "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(METRICS) <= set(metrics) and metrics["num_images"] == 3
    assert "CIDEr" in capsys.readouterr().out
    # neither --annotations nor --karpathy, and no predictions: one clear line, status 2
    assert main(["eval", "caption", "--predictions", str(res)]) == 2
    assert "--annotations" in capsys.readouterr().err
    assert main(["eval", "caption", "--karpathy", str(karpathy)]) == 2
    assert "--predictions" in capsys.readouterr().err
