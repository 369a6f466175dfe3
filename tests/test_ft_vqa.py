"""VQA fine-tuning end to end on the shapes world's official-format files: answer vocabulary,
soft targets equal to the metric, the run, the results file, and vlp.load(...).answer."""
import json

import pytest
import torch

import vlp
from vlp.cli import main
from vlp.tasks.vqa import answer_vocabulary, read_vqa, soft_targets

FT = ["train.steps=3", "train.batch_size=8", "train.save_every=2", "train.log_every=1",
      "eval.batch_size=32", "data.num_workers=0", "eval.split=val"]


def test_answer_vocabulary_and_soft_targets(ft_world):
    vqa = ft_world / "benchmarks" / "vqa"
    records = read_vqa(vqa / "v2_OpenEnded_mscoco_train_questions.json",
                       vqa / "v2_mscoco_train_annotations.json")
    vocab = answer_vocabulary(records, 5)
    assert len(vocab) == 5 and "yes" in vocab and "no" in vocab
    index = {a: i for i, a in enumerate(["yes", "no", "2"])}
    # 7 "yes", 2 "no", 1 "2": leave-one-out min(n/3, 1) averaged over the 10 subsets
    answers = ["yes"] * 7 + ["no"] * 2 + ["2"]
    t = soft_targets(answers, index)
    no = (8 * (2 / 3) + 2 * (1 / 3)) / 10  # 8 subsets keep both "no"s, 2 drop one
    two = (9 * (1 / 3) + 1 * 0) / 10
    assert torch.allclose(t, torch.tensor([1.0, no, two]), atol=1e-6)
    # the official scorer never digit-normalises human answers: a human "two" is never
    # matched by a prediction (normalised to "2"), so it is no target either
    t = soft_targets(["yes"] * 9 + ["two"], index)
    assert torch.allclose(t, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_vqa_finetune_load_answer(ft_world, pretrained, tmp_path, family):
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}", *FT]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["vqa_acc"] <= 100.0 and metrics["train_steps"] == 3
    results = json.loads((out / "vqa_val_results.json").read_text())
    questions = json.loads((ft_world / "benchmarks" / "vqa" /
                            "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"]
                                                                for q in questions)
    model = vlp.load(out / "model")
    image = ft_world / "benchmarks" / "images" / "000000000001.jpg"
    regions = ft_world / "benchmarks" / "regions" / "000000000001.npz"
    answer = model.answer(image, "what color is the circle?",
                          regions=regions if family == "regions" else None)
    vocab = json.loads((out / "model" / "answers.json").read_text())
    assert answer in vocab
    # the loaded model gives the results file's answer for a val question
    q = questions[0]
    img = ft_world / "benchmarks" / "images" / f"{q['image_id']:012d}.jpg"
    reg = ft_world / "benchmarks" / "regions" / f"{q['image_id']:012d}.npz"
    got = model.answer(img, q["question"], regions=reg if family == "regions" else None)
    assert got == next(r["answer"] for r in results if r["question_id"] == q["question_id"])


def test_vlp_eval_vqa_model_mode(ft_world, pretrained, tmp_path):
    """`vlp eval vqa --model` re-scores a fine-tuned model: same results file and accuracy as
    the run's own evaluation, and `--predictions` on that file agrees."""
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress",
                 f"init_from={pretrained('patches')}", f"data.synth_dir={ft_world}", *FT]) == 0
    run = json.loads((out / "metrics.json").read_text())
    again = tmp_path / "again" / "eval.json"
    assert main(["eval", "vqa", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--out", str(again), "--no-progress"]) == 0
    metrics = json.loads(again.read_text())
    assert metrics["vqa_acc"] == pytest.approx(run["vqa_acc"])
    vqa = ft_world / "benchmarks" / "vqa"
    scored = tmp_path / "scored.json"
    assert main(["eval", "vqa", "--predictions", str(again.parent / "vqa_val_results.json"),
                 "--questions", str(vqa / "v2_OpenEnded_mscoco_val_questions.json"),
                 "--annotations", str(vqa / "v2_mscoco_val_annotations.json"),
                 "--out", str(scored)]) == 0
    assert json.loads(scored.read_text())["vqa_acc"] == pytest.approx(run["vqa_acc"])
