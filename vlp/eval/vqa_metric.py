"""VQA accuracy, exactly as the official VQA v2 scorer computes it.

The reference is GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (its newest
version; copies in other projects differ in small ways that change scores). Per question:

  - the predicted answer gets the full normalisation (`normalize_answer`: whitespace,
    punctuation, number words -> digits, articles dropped, contractions restored);
  - the ten human answers get only the punctuation step, and only when they are not all the
    same string (`_human_forms`), so a human "two" never matches any prediction;
  - accuracy = the mean over the ten leave-one-human-out subsets of
    min(#humans in the subset who gave the predicted answer / 3, 1).

Training builds its answer vocabulary with `normalize_answer` and its soft targets with
`soft_scores`, which is this same per-question accuracy, so what the model is trained towards
is what it is scored on.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from vlp.eval.inputs import EvalError, describe, field, id_list, load_json, require_object

ANSWER_TYPES = ("yes/no", "number", "other")

# --------------------------------------------------------------------------------------------
# Normalisation tables, as in the official vqaEval.py (newest version).

# Keys the official table has in capitals ("Im", "Ive", "Id've", "I'dve") never match: the
# words are lower-cased first. "somebody'd" -> "somebodyd" runs backwards there too. Kept as is.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The newest official list: no ':' or "'" (so "don't" survives), with '-', '{', '}', '!'.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The official pattern, sic: "(?!<=\d)" is a lookahead that never fires (a lookbehind was
# meant), so every period not followed by a digit goes: "yes." -> "yes", "2.5" stays.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WITH_COMMA = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: re.UNICODE (32) lands in sub's
# `count` argument, so at most 32 periods are removed. Reproduced so scores match.
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """The official processPunctuation: a mark next to a space (or any mark at all when the
    text holds a number like "1,000") is deleted, any other mark becomes a space."""
    out = text
    delete_all = _NUMBER_WITH_COMMA.search(text) is not None
    for p in _PUNCTUATION:
        # tested on the original text, applied to the running result, as the official does
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words -> digits, drop articles,
    restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The normalisation the official scorer applies to a predicted answer (and the one the
    training side uses to build its answer vocabulary): "Two." -> "2", "the dog" -> "dog",
    "dont" -> "don't", "1,000" -> "1000"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def _human_forms(answers: list[str]) -> list[str]:
    """The human answers as the official scorer compares them: punctuation processed only
    when the answers differ, never lower-cased or digit/article processed."""
    if len(set(answers)) > 1:
        return [_process_punctuation(a) for a in answers]
    return list(answers)


def _leave_one_out(matches: list[bool]) -> float:
    """Mean over the subsets that leave one human out of min(#matches in the subset / 3, 1)."""
    total = sum(matches)
    accs = [min(1, (total - m) / 3) for m in matches]
    return float(sum(accs)) / len(accs)


def answer_accuracy(prediction: str, answers: list[str]) -> float:
    """Official accuracy (0..1) of one predicted answer against the human answers."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    predicted = normalize_answer(prediction)
    return _leave_one_out([h == predicted for h in _human_forms(answers)])


def soft_scores(answers: list[str]) -> dict[str, float]:
    """VQA soft targets: {normalised answer: the official accuracy of predicting it} for every
    distinct normalised human answer. With 10 humans, 1, 2, 3, 4+ matching humans give 0.3,
    0.6, 0.9, 1.0. Answers the official scorer can never credit (a human "two" when the
    answers differ, any answer whose capitals or punctuation survive) score 0 and are left out.
    """
    scores = {}
    for candidate in dict.fromkeys(normalize_answer(a) for a in answers):
        score = answer_accuracy(candidate, answers)
        if score > 0:
            scores[candidate] = score
    return scores


# --------------------------------------------------------------------------------------------
# Whole files


def _slug(name: str) -> str:
    """An answer or question type as a key suffix: "yes/no" -> "yes_no"."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def _read_annotations(annotations, questions) -> list[dict]:
    """The annotated questions in file order: {question_id, answers, answer_type,
    question_type}."""
    ann_name, q_name = describe(annotations), describe(questions)
    ann = load_json(annotations, dict)
    records = field(ann, "annotations", list, ann_name)
    asked = set()
    for i, item in enumerate(field(load_json(questions, dict), "questions", list, q_name)):
        where = f"{q_name}: questions[{i}]"
        asked.add(field(require_object(item, where), "question_id", int, where))
    out, seen = [], set()
    for i, a in enumerate(records):
        where = f"{ann_name}: annotations[{i}]"
        require_object(a, where)
        qid = field(a, "question_id", int, where)
        if qid in seen:
            raise EvalError(f"{where}: question_id {qid} is annotated twice")
        seen.add(qid)
        answers = []
        for j, h in enumerate(field(a, "answers", list, where)):
            here = f"{where}.answers[{j}]"
            answers.append(field(require_object(h, here), "answer", str, here))
        if not answers:
            raise EvalError(f"{where}: question_id {qid} has no human answers")
        out.append({"question_id": qid, "answers": answers,
                    "answer_type": field(a, "answer_type", str, where),
                    "question_type": field(a, "question_type", str, where)})
    if not out:
        raise EvalError(f"{ann_name}: no annotations to score")
    unasked = [r["question_id"] for r in out if r["question_id"] not in asked]
    if unasked:
        raise EvalError(f"{ann_name}: {id_list(unasked)} annotated question ids are not in "
                        f"the questions file {q_name}: the two files are from different splits")
    return out


def _read_results(results, known: set[int]) -> dict[int, str]:
    """{question_id: answer}; the ids must be exactly the annotated ones (the official
    loadRes asserts the same)."""
    name = describe(results)
    rows = load_json(results, list)
    answers: dict[int, str] = {}
    for i, r in enumerate(rows):
        where = f"{name}: [{i}]"
        require_object(r, where)
        qid = field(r, "question_id", int, where)
        answer = field(r, "answer", str, where)
        if qid in answers:
            raise EvalError(f"{where}: question_id {qid} is answered twice; give one answer "
                            f"per question")
        answers[qid] = answer
    extra = [q for q in answers if q not in known]
    if extra:
        raise EvalError(f"{name}: {id_list(extra)} question ids are not in the annotations; "
                        f"the results must answer exactly the annotated questions")
    missing = [q for q in known if q not in answers]
    if missing:
        raise EvalError(f"{name}: {id_list(missing)} annotated questions have no answer; the "
                        f"results must answer every annotated question")
    return answers


def evaluate_vqa(results, questions, annotations) -> dict:
    """Score VQA results the way the official scorer does.

    results: the official results format, [{"question_id": int, "answer": str}, ...], or a path
    to it; questions / annotations: the VQA v2 questions and annotations JSON (paths or loaded
    dicts). Returns flat percentages at full precision (the official script rounds to 2
    decimals; `format_table` does that for display): `vqa_acc`, `vqa_acc_yes_no`,
    `vqa_acc_number`, `vqa_acc_other` (None when there are no questions of that type), one
    `vqa_acc_qtype_<question type>` per question type (spaces and punctuation -> "_"), and the
    counts `num_questions`, `num_questions_<answer type>`, `num_questions_qtype_<type>`.
    """
    annotated = _read_annotations(annotations, questions)
    answers = _read_results(results, {a["question_id"] for a in annotated})
    overall: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for a in annotated:  # the annotation file's order, so sums match the official's bit for bit
        acc = answer_accuracy(answers[a["question_id"]], a["answers"])
        overall.append(acc)
        by_answer_type[a["answer_type"]].append(acc)
        by_question_type[a["question_type"]].append(acc)

    def percent(accs: list[float]) -> float:
        return 100 * float(sum(accs)) / len(accs)

    metrics: dict = {"vqa_acc": percent(overall), "num_questions": len(overall)}
    for answer_type in [*ANSWER_TYPES, *sorted(set(by_answer_type) - set(ANSWER_TYPES))]:
        accs = by_answer_type.get(answer_type, [])
        metrics[f"vqa_acc_{_slug(answer_type)}"] = percent(accs) if accs else None
        metrics[f"num_questions_{_slug(answer_type)}"] = len(accs)
    for question_type in sorted(by_question_type):
        key = f"vqa_acc_qtype_{_slug(question_type)}"
        if key in metrics:
            raise EvalError(f"{describe(annotations)}: two question types both make the key "
                            f"{key!r}; rename one")
        accs = by_question_type[question_type]
        metrics[key] = percent(accs)
        metrics[f"num_questions_qtype_{_slug(question_type)}"] = len(accs)
    return metrics


def format_table(metrics: dict) -> str:
    """Overall, per answer type, per question type; rounded to 2 decimals as the official
    script prints them."""
    lines = [f"{'VQA accuracy':<36}  {'value':>7}  {'count':>7}"]
    for key, value in metrics.items():
        if not key.startswith("vqa_acc"):
            continue
        count_key = ("num_questions" if key == "vqa_acc" else
                     "num_questions_" + key[len("vqa_acc_"):])
        count = metrics.get(count_key, "")
        shown = "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{round(value, 2):.2f}"
        lines.append(f"{key:<36}  {shown:>7}  {count!s:>7}")
    return "\n".join(lines)
