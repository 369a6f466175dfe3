"""The pure-Python CIDEr-D (training rewards) against pycocoevalcap's CiderScorer on the same
tokens: equal per-image scores with the evaluated set as the document-frequency corpus, and
with a larger fixed corpus (pycocoevalcap given the extra images too)."""
import json
import math
import shutil

import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer

from vlp.eval.cider import CiderD, ngram_counts, simple_tokenize

# COCO-style captions written for this test: 8 images x 5 references, with the candidate
# cases CIDEr-D treats specially (a copy of a reference, repeated words that clipping cuts,
# one word (no bigram), unseen words, a much longer caption)
REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean",
        "a person on a surfboard riding a wave", "Man surfing on a big blue wave.",
        "A surfer in a black wetsuit catches a wave."],
    2: ["Two dogs playing with a frisbee in the grass.", "A pair of dogs chase a red frisbee",
        "two brown dogs running on a lawn", "Dogs play fetch in a park.",
        "A dog jumps to catch a frisbee while another watches"],
    3: ["A plate of food with broccoli and rice.", "a white plate topped with rice and broccoli",
        "Chicken, rice and vegetables on a dish", "A healthy meal of broccoli and chicken",
        "food on a plate on a wooden table"],
    4: ["A red double decker bus driving down a street.", "a bus on a city street",
        "The red bus is parked near the sidewalk", "A large red bus in traffic.",
        "double decker bus driving past buildings"],
    5: ["A cat sleeping on a laptop keyboard.", "a cat lying on top of a computer",
        "An orange cat naps on an open laptop", "cat resting on a keyboard",
        "A kitten curled up on a laptop."],
    6: ["A group of people standing around a kitchen.", "people cooking together in a kitchen",
        "Several friends preparing food at a counter", "a kitchen full of people",
        "Men and women gathered in a small kitchen"],
    7: ["A giraffe standing next to a tall tree.", "a giraffe eating leaves from a tree",
        "The giraffe is reaching up into the branches", "one giraffe in a grassy field",
        "A tall giraffe near some trees at the zoo"],
    8: ["A clock tower in the middle of a city.", "a tall clock tower against a blue sky",
        "The clock on the tower reads ten o'clock", "an old building with a clock",
        "A stone tower with a large clock face"],
}
HYPS = {1: "a man riding a wave on top of a surfboard",  # a reference, exactly
        2: "a dog a dog a dog a dog with a frisbee",  # clipping
        3: "broccoli",  # one word: no bigram, CIDEr-D's length is 0
        4: "a red bus",
        5: "a cat on a laptop",
        6: "a zebra in a kitchen with xylophones",  # unseen words
        7: "a giraffe standing next to a tall tree in a grassy field on a sunny day near a "
           "fence with many other animals around it at the zoo",  # long: length penalty
        8: "a clock tower"}


def pycocoevalcap_scores(refs: dict, hyps: dict) -> dict:
    """pycocoevalcap's per-image CIDEr-D (its Cider.compute_score, without the dict checks)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in refs:
        scorer += (hyps[i], refs[i])
    _, scores = scorer.compute_score()
    return dict(zip(refs, scores))


def tokenized(captions):
    return [" ".join(simple_tokenize(c)) for c in captions]


def test_equals_pycocoevalcap_per_image():
    refs = {i: tokenized(c) for i, c in REFS.items()}
    hyps = {i: " ".join(simple_tokenize(h)) for i, h in HYPS.items()}
    ref = pycocoevalcap_scores(refs, hyps)
    cider = CiderD([[r.split() for r in rs] for rs in refs.values()])
    for i in refs:
        got = cider.score(hyps[i].split(), [r.split() for r in refs[i]])
        assert got == pytest.approx(ref[i], rel=1e-12, abs=1e-12), i
    # the cases do what they are there for
    assert ref[1] > 3 and ref[6] < ref[5] and ref[3] < 0.5
    dogs = [r.split() for r in refs[2]]
    assert cider.score("a dog a dog a dog".split(), dogs) < cider.score("a dog".split(), dogs)
    # several candidates of one image at once (the training path) give the same scores
    assert cider.scores([hyps[4].split(), hyps[5].split()], [r.split() for r in refs[4]]) == \
        [cider.score(hyps[4].split(), [r.split() for r in refs[4]]),
         cider.score(hyps[5].split(), [r.split() for r in refs[4]])]


def test_fixed_corpus_equals_pycocoevalcap_over_the_corpus():
    """Document frequencies from a larger corpus: pycocoevalcap counts them over the images it
    scores, so scoring every corpus image there (any candidate for the extra ones) gives the
    scores of our CiderD built once on that corpus."""
    extra = {100 + i: tokenized(c) for i, c in REFS.items() if i % 2}  # 4 more documents
    extra[200] = tokenized(["a surfer and a wave", "a wave with a man on a board"])
    refs = {i: tokenized(c) for i, c in REFS.items()}
    corpus = {**refs, **extra}
    hyps = {i: " ".join(simple_tokenize(HYPS.get(i, "something else"))) for i in corpus}
    ref = pycocoevalcap_scores(corpus, hyps)
    cider = CiderD([[r.split() for r in rs] for rs in corpus.values()])
    assert cider.ref_len == pytest.approx(math.log(len(corpus)))
    for i in refs:
        assert cider.score(hyps[i].split(), [r.split() for r in refs[i]]) == \
            pytest.approx(ref[i], rel=1e-12, abs=1e-12), i
    # and they are not the scores with the evaluated set's own frequencies
    own = pycocoevalcap_scores(refs, {i: hyps[i] for i in refs})
    assert any(abs(own[i] - ref[i]) > 1e-3 for i in refs)


def test_shapes_world_captions(ft_world):
    """The shapes world's own captions: every test image's 2nd..5th caption as references and
    its first (or another image's) as the candidate."""
    images = json.loads((ft_world / "benchmarks" / "coco" / "dataset_coco.json").read_text())
    test = [im for im in images["images"] if im["split"] == "test"][:12]
    refs = {im["cocoid"]: tokenized([s["raw"] for s in im["sentences"][1:]]) for im in test}
    hyps = {im["cocoid"]: " ".join(simple_tokenize(
        test[(k + (k % 3 == 0)) % len(test)]["sentences"][0]["raw"]))
        for k, im in enumerate(test)}
    ref = pycocoevalcap_scores(refs, hyps)
    cider = CiderD([[r.split() for r in rs] for rs in refs.values()])
    got = {i: cider.score(hyps[i].split(), [r.split() for r in refs[i]]) for i in refs}
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert len({round(v, 6) for v in got.values()}) > 3  # not a degenerate set


def test_simple_tokenize_and_ngrams():
    assert simple_tokenize("A man's  RED-hat, on_top!") == ["a", "man", "s", "red", "hat", "on",
                                                            "top"]
    assert ngram_counts(["a", "b", "a", "b"], 2) == {("a",): 2, ("b",): 2, ("a", "b"): 2,
                                                     ("b", "a"): 1}
    with pytest.raises(ValueError, match="at least one reference set"):
        CiderD([])


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_simple_tokenize_is_ptb_on_plain_captions(ft_world):
    """On captions without apostrophes (the shapes world's, most COCO ones) the reward's
    tokenization is the official metric's PTB tokenization."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    images = json.loads((ft_world / "benchmarks" / "coco" / "dataset_coco.json").read_text())
    caps = [s["raw"] for im in images["images"][:20] for s in im["sentences"]]
    caps += [c for rs in REFS.values() for c in rs if "'" not in c]
    ptb = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in enumerate(caps)})
    assert [ptb[k][0].split() for k in range(len(caps))] == [simple_tokenize(c) for c in caps]
