"""VCR fine-tuning: object references -> grounded word pieces (hand-worked), grounding reaching
the backbone, the shapes world's region files being VCR's objects, the run from two
pretraining families, the leaderboard CSV scored by the metric (and by hand), and
vlp.load(...).choose agreeing with it."""
import csv
import json

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, normalizers, pre_tokenizers

import vlp
from vlp.cli import main
from vlp.config import FinetuneConfig
from vlp.data.synth import SHAPES
from vlp.eval.vcr_metric import evaluate_vcr
from vlp.data.visual import VisualReader, collate_visual
from vlp.models.joint import JointEncoder
from vlp.tasks.common import Skipped
from vlp.tasks.vcr import VCRTask, VCRText, max_reference, read_vcr, reference_words
from vlp.tokenizer import Tokenizer

FT = ["train.steps=3", "train.batch_size=8", "train.save_every=2", "train.log_every=1",
      "eval.batch_size=16", "data.num_workers=0", "eval.split=val"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "the", "and", "circle",
         "tri", "##angle", "?", ".", "red", "left", "of", "why", "it", "because"]
ID = {w: i for i, w in enumerate(WORDS)}


def _text(max_length: int) -> VCRText:
    """A WordPiece tokenizer in which "triangle" is two pieces: tri ##angle."""
    hf = tokenizers.Tokenizer(models.WordPiece(dict(ID), unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return VCRText(Tokenizer(hf), max_length)


def _ids(*words):
    return [ID[w] for w in words]


NAMES = ["triangle", "circle", "triangle"]


def test_references_become_grounded_word_pieces():
    question = ["what", "is", [0, 2], "?"]
    assert reference_words(question, NAMES) == [("what", -1), ("is", -1), ("triangle", 0),
                                                ("and", -1), ("triangle", 2), ("?", -1)]
    text = _text(32)
    ids, objs = text.encode(question, NAMES)
    # "triangle" is two pieces, both grounded in its object; "and" is not grounded
    assert ids == _ids("what", "is", "tri", "##angle", "and", "tri", "##angle", "?")
    assert objs == [-1, -1, 0, 0, -1, 2, 2, -1]
    # Q->A: [CLS] question [SEP] answer [SEP]
    answer = [[1], "is", "left", "of", [2], "."]
    ids, objs = text.sequence([text.encode(question, NAMES)], text.encode(answer, NAMES))
    assert ids == _ids("[CLS]", "what", "is", "tri", "##angle", "and", "tri", "##angle", "?",
                       "[SEP]", "circle", "is", "left", "of", "tri", "##angle", ".", "[SEP]")
    assert objs == [-1, -1, -1, 0, 0, -1, 2, 2, -1, -1, 1, -1, -1, -1, 2, 2, -1, -1]
    # QA->R groups: [CLS] question answer [SEP] rationale [SEP]
    why = ["because", [2], "is", "red"]
    [group] = text.groups(question, [[why, why, why, why]], NAMES, [answer])
    assert len(group) == 4
    ids, objs = group[0]
    assert ids == _ids("[CLS]", "what", "is", "tri", "##angle", "and", "tri", "##angle", "?",
                       "circle", "is", "left", "of", "tri", "##angle", ".", "[SEP]", "because",
                       "tri", "##angle", "is", "red", "[SEP]")
    assert objs == [-1, -1, -1, 0, 0, -1, 2, 2, -1, 1, -1, -1, -1, 2, 2, -1, -1, -1, 2, 2, -1,
                    -1, -1]
    assert max_reference([question, answer, why]) == 2 and max_reference([["a"]]) == -1
    with pytest.raises(ValueError, match="indexes outside"):
        reference_words(["is", [3]], NAMES, "here")


def test_truncation_cuts_the_context_and_keeps_the_alignment():
    question = ["what", "is", [0, 2], "?"]  # 8 pieces
    answer = [[1], "is", "red"]  # 3 pieces
    why = ["because", [0], "is", "left", "of", [1]]  # 7 pieces
    # Q->A in 10 tokens: 3 specials + 3 answer pieces leave 4 of the question's 8
    text = _text(10)
    ids, objs = text.sequence([text.encode(question, NAMES)], text.encode(answer, NAMES))
    assert ids == _ids("[CLS]", "what", "is", "tri", "##angle", "[SEP]", "circle", "is", "red",
                       "[SEP]")
    assert objs == [-1, -1, -1, 0, 0, -1, 1, -1, -1, -1]
    # a cut inside a reference keeps the remaining piece grounded
    text = _text(9)
    ids, objs = text.sequence([text.encode(question, NAMES)], text.encode(answer, NAMES))
    assert ids[1:4] == _ids("what", "is", "tri") and objs[1:4] == [-1, -1, 0]
    assert ids[4:] == _ids("[SEP]", "circle", "is", "red", "[SEP]")
    # QA->R: the question goes first, then the answer's end; the rationale stays whole
    text = _text(3 + 7 + 2)
    [[(ids, objs), *_]] = text.groups(question, [[why] * 4], NAMES, [answer])
    assert ids == _ids("[CLS]", "circle", "is", "[SEP]", "because", "tri", "##angle", "is",
                       "left", "of", "circle", "[SEP]")
    assert objs == [-1, 1, -1, -1, -1, 0, 0, -1, -1, -1, 1, -1]
    # a choice longer than everything: cut at its end too
    text = _text(6)
    ids, objs = text.sequence([text.encode(question, NAMES)], text.encode(why, NAMES))
    assert ids == _ids("[CLS]", "[SEP]", "because", "tri", "##angle", "[SEP]")
    assert objs == [-1, -1, -1, 0, 0, -1]
    assert len(text.pad([[[(ids, objs)] * 4]])["input_ids"][0, 0, 0]) == 6


def test_shapes_world_regions_are_the_vcr_objects(ft_world):
    """VCR's objects must be the region files' rows in order (for region backbones)."""
    bench = ft_world / "benchmarks"
    records = read_vcr(bench / "vcr" / "val.jsonl")
    for r in records[::7]:
        meta = json.loads((bench / "vcr" / "images" / r["metadata_fn"]).read_text())
        stem = r["img_fn"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        regions = np.load(bench / "regions" / f"{stem}.npz")
        assert len(regions["boxes"]) == len(r["objects"]) == len(meta["boxes"])
        assert np.allclose(regions["boxes"], np.array(meta["boxes"])[:, :4])
        assert [SHAPES[i] for i in regions["labels"]] == r["objects"]  # same order


@pytest.mark.parametrize("family", ["regions", "patches", "dual_tower"])
def test_grounding_changes_the_backbone_output(ft_world, pretrained, family):
    backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained(family))
    backbone.eval()
    bench = ft_world / "benchmarks"
    reader = VisualReader(backbone.visual_needs(), transform, bench / "regions")
    r = next(r for r in read_vcr(bench / "vcr" / "val.jsonl") if len(r["objects"]) >= 2)
    meta = json.loads((bench / "vcr" / "images" / r["metadata_fn"]).read_text())
    boxes = None if backbone.objects_are_regions else [b[:4] for b in meta["boxes"]]
    visual = collate_visual([reader.read(bench / "vcr" / "images" / r["img_fn"], boxes)])
    boxes, box_mask = visual.pop("object_boxes", None), visual.pop("object_mask", None)
    ids, mask = tokenizer(["what color is the square ?"], 12)
    grounded = torch.full_like(ids, -1)

    def run(objects):
        with torch.no_grad():
            return backbone(ids, mask, visual, token_objects=objects, object_boxes=boxes,
                            object_mask=box_mask)

    none = run(grounded)
    assert torch.allclose(none, run(None), atol=1e-6)  # -1 everywhere adds nothing
    first, second = grounded.clone(), grounded.clone()
    first[0, 4], second[0, 4] = 0, 1
    h0, h1 = run(first), run(second)
    assert not torch.allclose(h0, none, atol=1e-4)
    assert not torch.allclose(h0[0, 4], h1[0, 4], atol=1e-4)


def test_a_reference_beyond_the_regions_is_skipped(ft_world, pretrained, tmp_path):
    bench = ft_world / "benchmarks"
    lines = (bench / "vcr" / "val.jsonl").read_text().splitlines()[:2]
    good, bad = json.loads(lines[0]), json.loads(lines[1])
    bad["objects"] = bad["objects"] + ["ghost"]  # an object with no region row
    bad["question"] = ["where", "is", [0, len(bad["objects"]) - 1], "?"]
    path = tmp_path / "val.jsonl"
    path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    cfg = FinetuneConfig(task="vcr")
    cfg.vcr.train = cfg.vcr.val = str(path)
    cfg.vcr.condition_on_each_answer = False  # JSON lines, rationales given the right answer
    cfg.data.num_workers = 0
    backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained("regions"))
    task = VCRTask(cfg, backbone, tokenizer, transform, bench)
    data = task.dataset("val")
    # a skipped item carries its reason (it was None before skip counts had reasons)
    assert not isinstance(data[0], Skipped) and data[1] == Skipped("missing_regions")
    batch = task.collate([data[0], data[1]])
    assert batch.skipped == {"missing_regions": 1} and batch.input_ids.shape[:3] == (1, 2, 4)
    train = task.dataset("train")  # one Q->A and one QA->R sample per question
    assert len(train) == 4 and train[2] == train[3] == Skipped("missing_regions")
    assert train[0]["labels"].tolist() == [good["answer_label"]]
    assert train[1]["labels"].tolist() == [good["rationale_label"]]
    # the skipped question still gets a (uniform) row; eval.split=test scores val
    metrics = task.score(task.build_model().eval(), "test", tmp_path, False)
    assert metrics["vcr_skipped_questions"] == 1 and metrics["vcr_questions"] == 2
    rows = [json.loads(x) for x in (tmp_path / "vcr_val_predictions.jsonl").read_text()
            .splitlines()]
    assert [r["annot_id"] for r in rows] == [good["annot_id"], bad["annot_id"]]
    assert rows[1]["answer_probs"] == rows[1]["rationale_probs"] == [0.25] * 4
    assert len(rows[0]["rationale_probs"]) == 4 and sum(rows[0]["answer_probs"]) == \
        pytest.approx(1.0)


def _hand_count(csv_path, annotations):
    """Q->A, QA->R (given the right answer's 4 columns), Q->AR in percent, counted by hand."""
    labels = {r["annot_id"]: (r["answer_label"], r["rationale_label"]) for r in annotations}
    qa = qar = both = 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        a, r = labels[row["annot_id"]]
        answers = [float(row[f"answer_{i}"]) for i in range(4)]
        why = [float(row[f"rationale_conditioned_on_a{a}_{j}"]) for j in range(4)]
        ok_a, ok_r = int(np.argmax(answers)) == a, int(np.argmax(why)) == r
        qa, qar, both = qa + ok_a, qar + ok_r, both + (ok_a and ok_r)
    n = len(rows)
    return len(rows), 100 * qa / n, 100 * qar / n, 100 * both / n


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_vcr_finetune_load_choose(ft_world, pretrained, tmp_path, family):
    out = tmp_path / "vcr"
    assert main(["finetune", "vcr", "--out", str(out), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}", *FT]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["vcr_skipped_questions"] == 0
    bench = ft_world / "benchmarks"
    annotations = read_vcr(bench / "vcr" / "val.jsonl")
    path = out / "vcr_val_predictions.csv"
    n, qa, qar, both = _hand_count(path, annotations)
    assert n == len(annotations) == metrics["vcr_questions"]
    assert metrics["Q->A"] == pytest.approx(qa) and metrics["QA->R"] == pytest.approx(qar)
    assert metrics["Q->AR"] == pytest.approx(both)
    assert evaluate_vcr(path, bench / "vcr" / "val.jsonl")["Q->A"] == pytest.approx(qa)
    # the prior baseline, by hand
    train = read_vcr(bench / "vcr" / "train.jsonl")
    prior = np.bincount([r["answer_label"] for r in train], minlength=4).argmax()
    assert metrics["vcr_prior_Q->A"] == pytest.approx(
        100 * np.mean([r["answer_label"] == prior for r in annotations]))

    # the loaded model gives the file's probabilities for a val question
    model = vlp.load(out / "model")
    r = annotations[5]
    with open(path) as f:
        row = next(x for x in csv.DictReader(f) if x["annot_id"] == r["annot_id"])
    image = bench / "vcr" / "images" / r["img_fn"]
    meta = json.loads((bench / "vcr" / "images" / r["metadata_fn"]).read_text())
    stem = image.stem
    where = {"regions": bench / "regions" / f"{stem}.npz"} if family == "regions" \
        else {"boxes": meta["boxes"]}
    index, probs = model.choose(image, r["question"], r["answer_choices"],
                                objects=r["objects"], **where)
    expected = [float(row[f"answer_{i}"]) for i in range(4)]
    assert probs == pytest.approx(expected, abs=1e-4)
    assert index == int(np.argmax(expected))
    a = 2  # rationales given the third answer: the file's conditioned columns
    _, probs = model.choose(image, r["question"], r["rationale_choices"], objects=r["objects"],
                            answer=r["answer_choices"][a], **where)
    assert probs == pytest.approx([float(row[f"rationale_conditioned_on_a{a}_{j}"])
                                   for j in range(4)], abs=1e-4)
