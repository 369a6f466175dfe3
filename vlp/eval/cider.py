"""CIDEr-D in pure Python, for training rewards (self-critical sequence training,
vlp/tasks/caption.py): no Java, and the document frequencies computed once.

The formula is pycocoevalcap's `Cider` (which is CIDEr-D, Vedantam et al. 2015, sec. 7):
per n = 1..4 the tf-idf vectors of the n-grams (idf = log(#documents) - log(max(1, df))), the
cosine of the candidate's vector with each reference's where the candidate's weights are
clipped at the reference's (`min(h, r) * r`), times a Gaussian penalty on the length
difference (sigma = 6), averaged over n and over the references, x10. Like pycocoevalcap the
"length" is the number of bigrams (its `if n == 1: length += term_freq`, n being 0-based), i.e.
words - 1: it changes the score only for captions of fewer than two words.

One difference, deliberate: pycocoevalcap counts document frequencies over the references of
the images being scored; a reward needs one fixed table, so `CiderD(corpus)` counts them once
over a corpus of reference sets (one document per image: every training image's references),
as self-critical.pytorch does with its cached `coco-train-idxs` df. Given the evaluated set's
own references as the corpus, it returns pycocoevalcap's per-image scores
(tests/test_cider.py).

Input is tokens: `simple_tokenize` lower-cases and turns every character that is neither a
letter, a digit nor whitespace into a space (so "dog's" is "dog s", where the PTB tokenizer of
the official metric says "dog 's"; plain captions tokenize alike). The official score stays
vlp/eval/caption_metric.py's; this one only ranks samples of the same image against each other.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

Ngrams = Counter  # n-gram tuple -> count

_NOT_WORD = re.compile(r"[^\w\s]|_")


def simple_tokenize(text: str) -> list[str]:
    """Lower-cased words, punctuation removed (see the module docstring)."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def ngram_counts(words: Sequence[str], n: int = 4) -> Ngrams:
    """Every 1..n-gram of `words` with its count (pycocoevalcap's `precook`)."""
    counts: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies fixed at construction.

    corpus: reference sets, one per image, each a list of token lists; every image is one
    document. `score(candidate, references)` then scores a token list against one image's
    token lists, `scores` several candidates of the same image."""

    def __init__(self, corpus: Iterable[Sequence[Sequence[str]]], n: int = 4,
                 sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.df: Counter = Counter()
        documents = 0
        for refs in corpus:
            documents += 1
            self.df.update(set().union(*(ngram_counts(r, n) for r in refs)) if refs else ())
        if documents == 0:
            raise ValueError("CiderD needs at least one reference set for its document "
                             "frequencies")
        self.ref_len = math.log(float(documents))  # log(#documents): the idf's numerator

    def _vector(self, counts: Ngrams) -> tuple[list[dict], list[float], int]:
        """(tf-idf weights per n, their norms per n, length = number of bigrams)."""
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            w = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[k][ngram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's length (see the module docstring)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> float:
        """Sum over n of the clipped, length-penalised cosine of one candidate/reference."""
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-float(lh - lr) ** 2 / (2 * self.sigma ** 2))
        total = 0.0
        for k in range(self.n):
            val = 0.0
            refk = vr[k]
            for ngram, w in vh[k].items():
                r = refk.get(ngram, 0.0)
                val += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            total += val * penalty
        return total

    def score(self, candidate: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """CIDEr-D (0..10 scale, as pycocoevalcap's per-image scores) of `candidate` against
        one image's `references` (token lists)."""
        return self.scores([candidate], references)[0]

    def scores(self, candidates: Sequence[Sequence[str]],
               references: Sequence[Sequence[str]]) -> list[float]:
        """score() of each of `candidates` against the same image's `references`, whose
        vectors are computed once (an image's greedy caption and its samples)."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference caption")
        refs = [self._vector(ngram_counts(r, self.n)) for r in references]
        out = []
        for candidate in candidates:
            hyp = self._vector(ngram_counts(candidate, self.n))
            out.append(10.0 * sum(self._sim(hyp, r) for r in refs) / (self.n * len(refs)))
        return out
