"""RefCOCO fine-tuning: the refer toolkit's files (the safe unpickler refusing code, the JSON
copy), the shapes world's expressions each naming exactly one object (checked by an
independent reading of the grammar), the slot sequences (hand-worked), the training target,
the run from a region and a patch backbone, its results files scored by the metric and by
hand, `vlp eval refcoco --model`, and vlp.load(...).locate agreeing with the results file."""
import json
import os
import pickle
import re

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, normalizers, pre_tokenizers

import vlp
from vlp.cli import main
from vlp.config import FinetuneConfig
from vlp.data.refer import Refer, UnsafePickleError, load_pickle, load_refs, read_boxes_file
from vlp.data.synth import COLORS, SHAPES, SIZES, make_scene
from vlp.data.visual import VisualReader, collate_visual
from vlp.eval.refcoco_metric import evaluate_refcoco
from vlp.models.heads.refcoco import RefCOCOHead
from vlp.models.joint import JointEncoder
from vlp.tasks.refcoco import ExpressionText, RefCOCOTask
from vlp.tokenizer import Tokenizer

FT = ["train.steps=3", "train.batch_size=8", "train.save_every=2", "train.log_every=1",
      "eval.batch_size=16", "data.num_workers=0", "eval.split=test"]


def _refcoco(world):
    return world / "benchmarks" / "refcoco"


# ---------------------------------------------------------------------------- the files
class _Shell:
    """Unpickling this runs a shell command (what a hostile refs file would hold)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_with_code_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "ran"
    refs = [{"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "val",
             "sentences": [{"sent_id": 0, "sent": "the red circle"}], "x": _Shell(
                 f"touch {marker}")}]
    data = pickle.dumps(refs, protocol=protocol)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"refused: it asks for (posix|os|nt)\.system"):
        load_refs(path)
    assert not marker.exists()
    # the same bytes through plain pickle do run the command: the refusal is what stopped it
    pickle.loads(data)
    assert marker.exists()
    path.write_bytes(pickle.dumps([_Evaluates()], protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"(builtins|__builtin__)\.eval"):
        load_refs(path)


def test_plain_pickles_and_their_json_copy_read_the_same(ft_world, tmp_path):
    root = _refcoco(ft_world)
    refs = load_refs(root / "refs(unc).p")
    assert refs == load_refs(root / "refs(unc).json")
    assert refs == pickle.loads((root / "refs(unc).p").read_bytes())
    # Python 2 str opcodes (the toolkit's files were written by Python 2) and sets read too
    py2 = b"\x80\x02]q\x00(U\x03valq\x01c__builtin__\nset\nq\x02]q\x03K\x01a\x85Rq\x04e."
    path = tmp_path / "py2.p"
    path.write_bytes(py2)
    assert load_pickle(path) == ["val", {1}]
    with pytest.raises(ValueError, match="ref 0: expected an object"):  # read, but not refs
        load_refs(path)
    # a missing field is named
    path.write_text(json.dumps([{"ref_id": 3, "image_id": 1, "split": "val", "sentences": []}]))
    bad = path.with_suffix(".json")
    path.rename(bad)
    with pytest.raises(ValueError, match=r"ref 0: missing field\(s\) \['ann_id'\]"):
        load_refs(bad)


def _relation(a, b, size):
    """Where a is relative to b in the shapes world (the clear-cut cases only)."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    dx, dy = bx - ax, by - ay
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) >= size / 8:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) >= size / 8:
        return "above" if dy > 0 else "below"
    return None


PLACES = {"in the top left": "top left", "at the top": "top", "in the top right": "top right",
          "on the left": "left", "in the center": "center", "on the right": "right",
          "in the bottom left": "bottom left", "at the bottom": "bottom",
          "in the bottom right": "bottom right"}
NOUN = rf"(?:(?P<color>{'|'.join(COLORS)}) )?(?:(?P<size>{'|'.join(SIZES)}) )?" \
       rf"(?P<noun>{'|'.join(SHAPES)}|shape|one)"


def _read(text, objects, size):
    """The objects an expression fits, read independently of the generator."""
    rel = re.fullmatch(rf"the {NOUN} (?P<rel>left of|right of|above|below) (?P<rest>the .+)",
                       text)
    m = rel or re.fullmatch(rf"the {NOUN}(?: (?P<place>{'|'.join(PLACES)}))?", text)
    assert m, text
    fits = [o for o in objects
            if (not m["color"] or o["color"] == m["color"]) and
            (not m["size"] or o["size"] == m["size"]) and
            (m["noun"] in ("shape", "one") or o["shape"] == m["noun"])]
    if not rel and m["place"]:
        fits = [o for o in fits if o["position"] == PLACES[m["place"]]]
    if rel:
        [landmark] = _read(rel["rest"], objects, size)  # the landmark is unique too
        fits = [o for o in fits if o is not landmark and
                _relation(o, landmark, size) == rel["rel"]]
    return fits


def test_every_expression_names_exactly_its_object(ft_world):
    root = _refcoco(ft_world)
    refer = Refer.from_files(root / "refs(unc).p", root / "instances.json")
    manifest = json.loads((ft_world / "MANIFEST.json").read_text())
    size = manifest["image_size"]
    splits = {r["image_id"]: r["split"] for r in refer.refs}
    assert set(splits.values()) == {"train", "val", "testA", "testB"}
    relations = 0
    for ref in refer.refs:
        scene = make_scene(0, "benchmark", ref["image_id"] - 1, size)
        objects = [o.to_json() for o in scene.objects]
        assert len(objects) >= 2 and {"testA": 3, "testB": 2}.get(ref["split"],
                                                                   len(objects)) == len(objects)
        ann = refer.instances["annotations"][ref["ann_id"]]
        target = next(o for o in objects if o["box"][:2] == [int(v) for v in ann["bbox"][:2]])
        assert ann["bbox"][2:] == [target["box"][2] - target["box"][0],
                                   target["box"][3] - target["box"][1]]
        assert SHAPES[ann["category_id"] - 1] == target["shape"]
        assert 1 <= len(ref["sentences"]) <= 3
        for sent in ref["sentences"]:
            assert _read(sent["sent"], objects, size) == [target], sent["sent"]
            relations += bool(re.search(r" (left of|right of|above|below) ", sent["sent"]))
        # every object of the image is a candidate annotation, in the scene's order
        boxes = refer.image_boxes(ref["image_id"])
        assert [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes] == \
            [[float(v) for v in o["box"]] for o in objects]
    assert relations > 10  # the grammar's relations are used, not only colour + shape
    # split by image, following the benchmark's Karpathy split
    karpathy = json.loads((ft_world / "benchmarks" / "coco" / "dataset_coco.json").read_text())
    expected = {"train": "train", "restval": "train", "val": "val", "test": "test"}
    for image in karpathy["images"]:
        if image["cocoid"] in splits:
            assert splits[image["cocoid"]].startswith(expected[image["split"]])
    assert len({(r["image_id"], r["split"]) for r in refer.refs}) == len(splits)


def test_detections_files(ft_world):
    root = _refcoco(ft_world)
    refer = Refer.from_files(root / "refs(unc).p", root / "instances.json")
    # one file per benchmark image (those with refs among them)
    assert sorted(p.stem for p in (root / "dets").glob("*.npz")) == \
        sorted(p.stem for p in (ft_world / "benchmarks" / "images").glob("*.jpg"))
    image_ids = sorted({r["image_id"] for r in refer.refs})
    hits = total = 0
    for i in image_ids:
        npz = np.load(root / "dets" / f"{i:012d}.npz")
        assert npz["features"].shape == (len(npz["boxes"]), 198)
        assert list(npz["scores"]) == sorted(npz["scores"], reverse=True)
        assert read_boxes_file(root / "dets" / f"{i:012d}.npz") == npz["boxes"].tolist()
        for b in refer.image_boxes(i):
            total += 1
            gt = np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]])
            inter = np.clip(np.minimum(npz["boxes"][:, 2:], gt[2:]) -
                            np.maximum(npz["boxes"][:, :2], gt[:2]), 0, None).prod(1)
            area = (npz["boxes"][:, 2:] - npz["boxes"][:, :2]).prod(1)
            hits += (inter / (area + b[2] * b[3] - inter) >= 0.5).any()
    assert 0.75 < hits / total < 1.0  # a detector that finds most objects, not all


# ---------------------------------------------------------------------------- text and model
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "circle", "left", "of"]
ID = {w: i for i, w in enumerate(WORDS)}


def _tokenizer(with_mask=True):
    vocab = dict(ID) if with_mask else {w: i for w, i in ID.items() if w != "[MASK]"}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ID["[CLS]"]), ("[SEP]", ID["[SEP]"])])
    return Tokenizer(hf)


def test_slot_sequences():
    text = ExpressionText(_tokenizer(), max_length=8, slots=True)
    out = text(["the red circle", "circle left of the circle"], [2, 1])
    c, s, m, p = ID["[CLS]"], ID["[SEP]"], ID["[MASK]"], ID["[PAD]"]
    w = ID
    assert out["input_ids"].tolist() == [
        [c, w["the"], w["red"], w["circle"], s, m, m, p],
        [c, w["circle"], w["left"], w["of"], w["the"], w["circle"], s, m]]
    assert out["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    assert out["token_objects"].tolist() == [[-1] * 5 + [0, 1, -1], [-1] * 7 + [0]]
    assert out["slot_positions"].tolist() == [[5, 6], [7, -1]]
    # a cut expression keeps its [SEP]; no [MASK] in the vocabulary: slots are [SEP]
    text = ExpressionText(_tokenizer(with_mask=False), max_length=4, slots=True)
    out = text(["circle left of the circle"], [2])
    assert out["input_ids"].tolist() == [[c, w["circle"], w["left"], s, s, s]]
    assert out["slot_positions"].tolist() == [[4, 5]]
    plain = ExpressionText(_tokenizer(), max_length=6, slots=False)(["the red circle"])
    assert plain["input_ids"].tolist() == [[c, w["the"], w["red"], w["circle"], s, p]]
    assert set(plain) == {"input_ids", "attention_mask"}


def test_region_scores_follow_their_regions(ft_world, pretrained):
    """Region tokens have no order: permuting the regions permutes their scores."""
    backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained("regions"))
    backbone.eval()
    head = RefCOCOHead(backbone.width).eval()
    bench = ft_world / "benchmarks"
    reader = VisualReader(backbone.visual_needs(), transform, bench / "regions")
    image = next(p for p in sorted((bench / "images").glob("*.jpg"))
                 if len(np.load(bench / "regions" / f"{p.stem}.npz")["boxes"]) == 3)
    visual = collate_visual([reader.read(image)])
    ids, mask = tokenizer(["the red circle left of the blue square"], 16)
    with torch.no_grad():
        logits = head(backbone, input_ids=ids, attention_mask=mask, visual=visual)["logits"]
        order = torch.tensor([2, 0, 1])
        permuted = {k: v[:, order] for k, v in visual.items()}
        again = head(backbone, input_ids=ids, attention_mask=mask, visual=permuted)["logits"]
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert torch.allclose(again, logits[:, order], atol=1e-5)
    assert not torch.allclose(logits[0, 0], logits[0, 1], atol=1e-6)


def test_training_target_is_the_best_iou_candidate(ft_world, pretrained):
    cfg = FinetuneConfig(task="refcoco")
    cfg.data.num_workers = 0
    bench = ft_world / "benchmarks"
    for family in ("regions", "patches"):
        backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained(family))
        task = RefCOCOTask(cfg, backbone, tokenizer, transform, bench)
        data = task.dataset("val", "det")
        for i in range(0, len(data), 3):
            item = data[i]
            ious = []
            for b in item["candidates"]:
                g = item["gt"]
                iw = max(0.0, min(b[2], g[2]) - max(b[0], g[0]))
                ih = max(0.0, min(b[3], g[3]) - max(b[1], g[1]))
                union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                ious.append(iw * ih / union)
            assert item["target"] == int(np.argmax(ious))
            det = np.load(bench / "refcoco" / "dets" / f"{item['image_id']:012d}.npz")["boxes"]
            assert np.allclose(item["candidates"], det[:len(item["candidates"])], atol=1e-4)
        batch = task.collate([data[0], data[1]])
        assert batch.fields["target"].tolist() == [data[0]["target"], data[1]["target"]]


# ---------------------------------------------------------------------------- the run
def _hand_accuracy(results, refer, split):
    gts = {s["sent_id"]: s["box"] for s in refer.sentences(split)}
    right = 0
    for r in results:
        (x, y, w, h), (gx, gy, gw, gh) = r["box"], gts[r["sent_id"]]
        iw = max(0.0, min(x + w, gx + gw) - max(x, gx))
        ih = max(0.0, min(y + h, gy + gh) - max(y, gy))
        right += iw * ih / (w * h + gw * gh - iw * ih) >= 0.5
    return 100.0 * right / len(gts)


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_refcoco_finetune_eval_load_locate(ft_world, pretrained, tmp_path, family):
    out = tmp_path / "refcoco"
    assert main(["finetune", "refcoco", "--out", str(out), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}", *FT]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3
    root = _refcoco(ft_world)
    refer = Refer.from_files(root / "refs(unc).p", root / "instances.json")
    for kind in ("gt", "det"):
        for split in ("val", "testA", "testB"):
            key = f"refcoco_{kind}_{split}"
            results = json.loads((out / f"{key}_results.json").read_text())
            assert sorted(r["sent_id"] for r in results) == \
                sorted(s["sent_id"] for s in refer.sentences(split))
            assert metrics[key] == pytest.approx(_hand_accuracy(results, refer, split))
            assert metrics[f"{key}_skipped"] == 0
            if kind == "gt":  # 1 / (objects in the image), averaged
                expected = np.mean([1 / len(refer.image_boxes(s["image_id"]))
                                    for s in refer.sentences(split)])
                assert metrics[f"{key}_random"] == pytest.approx(100 * expected)
            else:
                assert 0 < metrics[f"{key}_random"] < metrics[f"{key}_oracle"] <= 100
    # the metric on the results file, from the command line
    scored = tmp_path / "scored.json"
    assert main(["eval", "refcoco", "--predictions", str(out / "refcoco_det_testB_results.json"),
                 "--refs", str(root / "refs(unc).json"), "--instances",
                 str(root / "instances.json"), "--out", str(scored)]) == 0
    assert json.loads(scored.read_text())["refcoco_testB"] == \
        pytest.approx(metrics["refcoco_det_testB"])

    # vlp.load(...).locate gives the results file's choice and scores
    model = vlp.load(out / "model")
    results = {r["sent_id"]: r for r in
               json.loads((out / "refcoco_gt_val_results.json").read_text())}
    for s in refer.sentences("val")[:4]:
        image = ft_world / "benchmarks" / "images" / s["file_name"]
        stem = image.stem
        where = {"regions": ft_world / "benchmarks" / "regions" / f"{stem}.npz"} \
            if family == "regions" else \
            {"boxes": [[x, y, x + w, y + h] for x, y, w, h in refer.image_boxes(s["image_id"])]}
        index, scores = model.locate(image, s["sent"], **where)
        assert index == results[s["sent_id"]]["candidate"]
        assert scores == pytest.approx(results[s["sent_id"]]["scores"], abs=1e-4)
    with pytest.raises(ValueError, match="regions=PATH.npz" if family == "regions" else "boxes="):
        model.locate(image, "the red circle", **({"boxes": [[0, 0, 4, 4]]}
                                                 if family == "regions" else {}))


def test_vlp_eval_refcoco_model_mode(ft_world, pretrained, tmp_path):
    """`vlp eval refcoco --model` re-scores a fine-tuned model (a patch backbone trained on
    detected boxes): the run's own numbers, any split by name."""
    out = tmp_path / "refcoco"
    assert main(["finetune", "refcoco", "--out", str(out), "--no-progress",
                 f"init_from={pretrained('patches')}", f"data.synth_dir={ft_world}",
                 "refcoco.train_boxes=det", *FT]) == 0
    run = json.loads((out / "metrics.json").read_text())
    again = tmp_path / "again" / "eval.json"
    assert main(["eval", "refcoco", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--out", str(again), "--no-progress"]) == 0
    metrics = json.loads(again.read_text())
    for key in ("refcoco_gt_val", "refcoco_det_testA", "refcoco_det_testB_oracle"):
        assert metrics[key] == pytest.approx(run[key])
    one = tmp_path / "one.json"
    assert main(["eval", "refcoco", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--split", "testA", "--out", str(one),
                 "--no-progress"]) == 0
    assert json.loads(one.read_text())["refcoco_gt_testA"] == \
        pytest.approx(run["refcoco_gt_testA"])
    root = _refcoco(ft_world)
    assert evaluate_refcoco(tmp_path / "refcoco_gt_testA_results.json", root / "refs(unc).p",
                            root / "instances.json")["refcoco_testA"] == \
        pytest.approx(run["refcoco_gt_testA"])
    assert main(["eval", "refcoco", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--split", "testC", "--no-progress"]) == 2


def test_finetune_refuses_a_hostile_refs_file(ft_world, pretrained, tmp_path, capsys):
    """`vlp finetune refcoco` on refs that would run a command: one line naming it, nothing
    run, no training."""
    marker = tmp_path / "ran"
    refs = load_refs(_refcoco(ft_world) / "refs(unc).json")
    refs[0]["sentences"][0]["tokens"] = _Shell(f"touch {marker}")
    hostile = tmp_path / "refs(unc).p"
    hostile.write_bytes(pickle.dumps(refs, protocol=2))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["finetune", "refcoco", "--out", str(out), "--no-progress",
                 f"init_from={pretrained('regions')}", f"data.synth_dir={ft_world}",
                 f"refcoco.refs={hostile}",
                 f"refcoco.instances={_refcoco(ft_world) / 'instances.json'}", *FT]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and re.search(r"refused: it asks for (posix|nt)\.system", errors[0])
    assert str(hostile) in errors[0]
    assert not marker.exists() and not (out / "checkpoints").exists()
