"""VQA accuracy as the official vqaEval.py computes it: worked examples by hand, whole files."""
import json

import pytest

from vlp.cli import main
from vlp.eval.inputs import EvalError
from vlp.eval.vqa_metric import answer_accuracy, evaluate_vqa, normalize_answer, soft_scores


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                    # lower-cased, a period not before a digit goes
    ("  yes\n", "yes"),                 # newlines/tabs -> spaces, stripped
    ("3.5", "3.5"),                     # a decimal point stays
    ("5.", "5"),
    ("1,000", "1000"),                  # a number with a comma: every mark is deleted
    ("rock,paper 1,2", "rockpaper 12"),  # ... in the whole answer, even away from the number
    ("rock,paper", "rock paper"),       # otherwise a mark not next to a space becomes a space
    ("dogs , cats", "dogs cats"),       # ... and one next to a space is deleted
    ("t-shirt", "t shirt"),
    ("Red!", "red"),
    ("(cat)", "cat"),
    ("don't", "don't"),                 # apostrophes are not punctuation here
    ("two", "2"),                       # number words -> digits
    ("Ten", "10"),
    ("none", "0"),                      # the manual map: "none" means zero
    ("a dog", "dog"),                   # articles dropped
    ("an apple", "apple"),
    ("The Cat", "cat"),
    ("dont", "don't"),                  # contractions restored
    ("whats", "what's"),
    ("Im", "im"),                       # the official table's "Im" never matches (lower-cased)
    ("." * 40, "." * 8),                # the official re.UNICODE-as-count: 32 periods at most
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                                (4, 1.0), (10, 1.0)])
def test_ten_leave_one_out_subsets(matching, expected):
    # k matching humans: the 10-k subsets without a non-match see k, the k others see k - 1;
    # e.g. 2 -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    answers = ["yes"] * matching + ["no"] * (10 - matching)
    assert answer_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)


def test_human_answers_get_punctuation_only_and_only_when_they_differ():
    # all ten the same string: compared raw, so "yes." never matches a normalised "yes"
    assert answer_accuracy("yes", ["yes."] * 10) == 0.0
    # they differ: punctuation processed, "yes." -> "yes" (9 match -> 1.0)
    assert answer_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0
    # no digit/article/case step on the human side: only the humans' "2"s can be matched
    assert answer_accuracy("two", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)
    assert answer_accuracy("2", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)
    assert answer_accuracy("a star", ["a star"] * 9 + ["star"]) == pytest.approx(0.3)
    assert answer_accuracy("orange", ["red"] * 9 + ["Orange"]) == 0.0


def test_soft_scores_are_the_metric():
    answers = ["red"] * 6 + ["dark red"] * 2 + ["Red."] + ["Orange"]
    # the humans' "Red." becomes "Red" (punctuation only), so "red" has 6 matches, not 7;
    # "Orange" can never be matched (a prediction is lower-cased), so it is left out
    scores = soft_scores(answers)
    assert scores == {"red": pytest.approx(1.0), "dark red": pytest.approx(0.6)}
    for answer, score in scores.items():
        assert score == answer_accuracy(answer, answers)
    assert soft_scores(["two"] * 5 + ["2"] * 5) == {"2": 1.0}
    assert soft_scores(["Yes"] * 10) == {}  # no prediction can ever match a raw "Yes"


def _files(tmp_path, answers_by_question, results):
    """Write the official questions / annotations / results formats."""
    header = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    questions = {**header, "task_type": "Open-Ended", "questions": [
        {"image_id": 1, "question": "?", "question_id": qid} for qid in answers_by_question]}
    annotations = {**header, "annotations": [
        {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
         "multiple_choice_answer": answers[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(answers)]}
        for qid, (qtype, atype, answers) in answers_by_question.items()]}
    paths = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"
    for path, obj in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(obj))
    return [str(p) for p in paths]


QUESTIONS = {
    1: ("is the", "yes/no", ["yes"] * 10),
    2: ("is there a", "yes/no", ["no"] * 7 + ["yes"] * 3),
    3: ("how many", "number", ["2"] * 8 + ["two", "3"]),
    4: ("how many", "number", ["1"] * 9 + ["2"]),
    5: ("what color is the", "other", ["red"] * 9 + ["dark red"]),
}
RESULTS = [
    {"question_id": 1, "answer": "Yes"},   # normalised "yes" = the ten humans' "yes": 1.0
    {"question_id": 2, "answer": "yes"},   # 3 humans: 0.9
    {"question_id": 3, "answer": "two"},   # -> "2", 8 humans: 1.0
    {"question_id": 4, "answer": "2"},     # 1 human: 0.3
    {"question_id": 5, "answer": "the dark red."},  # -> "dark red", 1 human: 0.3
]


def test_whole_files(tmp_path):
    q, a, r = _files(tmp_path, QUESTIONS, RESULTS)
    got = evaluate_vqa(r, q, a)
    assert got["vqa_acc"] == pytest.approx(100 * (1 + 0.9 + 1 + 0.3 + 0.3) / 5)  # 70.0
    assert got["vqa_acc_yes_no"] == pytest.approx(95.0)
    assert got["vqa_acc_number"] == pytest.approx(65.0)
    assert got["vqa_acc_other"] == pytest.approx(30.0)
    assert got["vqa_acc_qtype_how_many"] == pytest.approx(65.0)
    assert got["vqa_acc_qtype_is_there_a"] == pytest.approx(90.0)
    assert (got["num_questions"], got["num_questions_yes_no"], got["num_questions_number"],
            got["num_questions_other"], got["num_questions_qtype_how_many"]) == (5, 2, 2, 1, 2)


def test_cli(tmp_path, capsys):
    q, a, r = _files(tmp_path, QUESTIONS, RESULTS)
    out = tmp_path / "m" / "vqa.json"
    assert main(["eval", "vqa", "--predictions", r, "--questions", q, "--annotations", a,
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["vqa_acc"] == pytest.approx(70.0)
    printed = capsys.readouterr().out
    assert "vqa_acc_yes_no" in printed and "95.00" in printed
    assert main(["eval", "vqa", "--questions", q, "--annotations", a]) == 2
    assert "needs --predictions" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[{")
    assert main(["eval", "vqa", "--predictions", str(tmp_path / "bad.json"), "--questions", q,
                 "--annotations", a]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    # settings steer a model run (--model); scoring a file has none to take
    assert main(["eval", "vqa", "--predictions", r, "--questions", q, "--annotations", a,
                 "vqa.head=rank"]) == 2
    assert "vqa.head=rank: key=value settings apply to --model DIR" in capsys.readouterr().err


@pytest.mark.parametrize("results, match", [
    (RESULTS[:4], r"1 \(5\) annotated questions have no answer"),
    (RESULTS + [{"question_id": 9, "answer": "x"}], r"1 \(9\) question ids are not in the "
                                                     r"annotations"),
    (RESULTS + [RESULTS[0]], r"\[5\]: question_id 1 is answered twice"),
    ([{"question_id": 1, "text": "yes"}], r"\[0\]: missing field 'answer'"),
    ([{"question_id": "1", "answer": "yes"}], r"field 'question_id' must be an integer"),
    ([{"question_id": 1, "answer": 2}], r"field 'answer' must be a string, got 2"),
    ({"question_id": 1}, "expected a JSON array at the top level"),
])
def test_bad_results(tmp_path, results, match):
    q, a, r = _files(tmp_path, QUESTIONS, results)
    with pytest.raises(EvalError, match=r"r\.json: .*" + match):
        evaluate_vqa(r, q, a)


def test_bad_annotations(tmp_path):
    q, a, r = _files(tmp_path, QUESTIONS, RESULTS)
    (tmp_path / "other").mkdir()
    other_q, _, _ = _files(tmp_path / "other", {1: QUESTIONS[1]}, [])
    with pytest.raises(EvalError, match=r"a\.json: 4 \(2, 3, 4, 5\) annotated question ids are "
                                         r"not in the questions file .*q\.json"):
        evaluate_vqa(r, other_q, a)
    with pytest.raises(EvalError, match=r"annotations\[0\]: missing field 'answer_type'"):
        evaluate_vqa([], q, {"annotations": [{"question_id": 1, "question_type": "is",
                                              "answers": [{"answer": "yes"}]}]})


def test_shapes_world_majority_answers_score_100(tmp_path):
    from vlp.data.synth import generate

    generate(tmp_path, images=0, val_images=0, benchmark_images=12, progress=False)
    vqa = tmp_path / "benchmarks" / "vqa"
    q, a = vqa / "v2_OpenEnded_mscoco_val_questions.json", vqa / "v2_mscoco_val_annotations.json"
    anns = json.loads(a.read_text())["annotations"]
    results = [{"question_id": x["question_id"], "answer": x["multiple_choice_answer"]}
               for x in anns]
    got = evaluate_vqa(results, q, a)  # at least 6 of 10 humans give the written answer
    assert got["vqa_acc"] == 100.0 and got["num_questions"] == len(anns) > 0
