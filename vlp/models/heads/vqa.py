"""VQA heads.

`VQAHead` (vqa.head=classify): an answer classifier on the joint [CLS] state (UNITER / VL-BERT's
Linear-GELU-LayerNorm-Linear), trained with binary cross-entropy against the soft VQA scores of
every answer in the vocabulary.

`AnswerLMHead` (vqa.head=generate | rank): the answer as text, BLIP's generative VQA (Li et al.
2022) on the prefix-LM encoder captioning uses (vlp/models/heads/caption.py). The sequence is
`[CLS] question [SEP] answer [SEP]` over the visual tokens under the backbone's prefix-LM mask
(`causal_text=True`: the visual tokens see each other, word i sees them and words <= i), and
the loss is on the answer tokens only. Word predictor: the backbone's pretrained MLM head, as in
captioning, so the head has no parameters and the answer is open vocabulary: any word-piece
sequence the tokenizer can write. The question is causal too (the backbone's mask has the image
as its only bidirectional prefix); the answer's first token is predicted at the question's
[SEP], which sees the whole question.

Decoding and ranking use the backbone's key/value cache (`JointEncoder.start_decoding` /
`decode_step`): `encode_questions` runs the visual tokens and a group of equal-length questions
once; `AnswerStep` continues from there as a step function for captioning's `greedy_search` /
`beam_search`; `candidate_log_likelihoods` scores every candidate answer of a list against the
same cached question state (rank mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.encoder import KVCache
from vlp.models.heads.caption import CachedStep
from vlp.models.joint import DecodeState


class VQAHead(nn.Module):
    def __init__(self, width: int, num_answers: int, norm_eps: float = 1e-12):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                        nn.LayerNorm(2 * width, eps=norm_eps),
                                        nn.Linear(2 * width, num_answers))
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, backbone, *, input_ids, attention_mask, visual) -> dict[str, torch.Tensor]:
        hidden = backbone(input_ids, attention_mask, visual)  # (B, L, W)
        return {"logits": self.classifier(hidden[:, 0])}  # (B, num_answers)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE over the vocabulary, summed over answers and averaged over questions (UNITER: the
    mean BCE times the number of answers)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="mean") \
        * targets.shape[1]


# ------------------------------------------------------------------ generative VQA
class AnswerLMHead(nn.Module):
    """Next-word logits of the answer tokens through `backbone.mlm_head` (no parameters)."""

    def forward(self, backbone, *, input_ids, attention_mask, visual, labels,
                rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """input_ids/attention_mask/labels (N, L): `[CLS] question [SEP] answer` rows, labels
        the next token at answer positions, else -100; `rows` (N,): the image of each row
        (several answers of one question share it: its visual tokens are computed once).
        -> {"logits": (M, V)} at the M labelled positions, row-major."""
        encoded = backbone.encode_visual(visual)
        if rows is not None:
            encoded = {k: v.index_select(0, rows) for k, v in encoded.items()}
        hidden = backbone(input_ids, attention_mask, encoded, causal_text=True)  # (N, L, W)
        return {"logits": backbone.mlm_head(hidden[labels != -100])}


def answer_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                   num_questions: int) -> torch.Tensor:
    """BLIP's weighted answer loss: each row's summed answer-token cross-entropy times its
    weight, summed and divided by the number of questions (a question's weights sum to 1, so
    this is the expected negative log-likelihood of its annotators' answers).
    logits (M, V) at labels != -100 of labels (N, L), weights (N,)."""
    scored = labels != -100
    nll = F.cross_entropy(logits.float(), labels[scored], reduction="none")  # (M,)
    row = scored.nonzero()[:, 0]  # the row of each scored token
    per_row = torch.zeros(labels.shape[0], device=nll.device).index_add(0, row, nll)
    return (per_row * weights.to(per_row)).sum() / max(1, num_questions)


def encode_questions(backbone, encoded: dict, question_ids: torch.Tensor
                     ) -> tuple[DecodeState, torch.Tensor]:
    """Rows of equal-length questions `question_ids` (N, Lq) (`[CLS] q [SEP]`, no padding)
    over their images' visual tokens (`encode_visual` output, N rows) -> (the decoder state
    after the question, (N, V) logits of the answer's first token)."""
    state = backbone.start_decoding(encoded)
    hidden = backbone.decode_step(question_ids, state)  # (N, Lq, W)
    return state, backbone.mlm_head(hidden[:, -1])


class AnswerStep(CachedStep):
    """A step function for captioning's `greedy_search` / `beam_search` that continues after
    the question (`encode_questions`): the first call returns the first answer token's logits
    (its rows pick their question, `images`), later calls encode each row's newest token
    against the cache. The searches' start token stands for the question's [SEP], already
    encoded. Pass `reorder=step.reorder` to the search. A CachedStep (its checks, word step
    and reorder) whose state starts after the question rather than at the image."""

    def __init__(self, backbone, state: DecodeState, first_logits: torch.Tensor):
        self.backbone, self.state, self.first = backbone, state, first_logits
        self.start = state.position
        self.rows = 0

    def __call__(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            logits, self.first = self.first.index_select(0, images), None
            self.state.select(images)
            self.rows = len(images)
            return logits
        answered = self.state.position - self.start
        self._check(tokens, answered + 2, f"{answered} answer words")
        return self._next_word(tokens)


def _fork(state: DecodeState, index: torch.Tensor) -> DecodeState:
    """A new state holding rows `index` of `state` (which is left as it is)."""
    def copy(cache: KVCache | None) -> KVCache | None:
        if cache is None:
            return None
        new = KVCache(len(cache.layers))
        for old, layer in zip(cache.layers, new.layers):
            if old.keys is not None:
                layer.keys = old.keys.index_select(0, index)
                layer.values = old.values.index_select(0, index)
        return new

    mask = None if state.key_mask is None else state.key_mask.index_select(0, index)
    out = DecodeState(copy(state.fusion), mask, copy(state.text))
    out.position = state.position
    return out


@torch.no_grad()
def candidate_log_likelihoods(backbone, state: DecodeState, first_logits: torch.Tensor,
                              candidate_ids: torch.Tensor, candidate_mask: torch.Tensor, *,
                              rows_per_call: int = 512) -> torch.Tensor:
    """(N, C) summed log-probability of each candidate answer given each question.

    `state`/`first_logits`: `encode_questions`'s for N questions (left unchanged);
    `candidate_ids` (C, La): each candidate's answer tokens ending in [SEP], right-padded
    (`candidate_mask` 1 = real). The question rows are copied for every candidate and the
    candidates' tokens run through the cache in one call per chunk of `rows_per_call`
    (question, candidate) rows: a question costs C x La decoded tokens (generate: La), plus
    the vocabulary projection at each real candidate token. Pads come last, so under the
    causal text mask they change no real token's score."""
    n = first_logits.shape[0]
    c_total, la = candidate_ids.shape
    first = F.log_softmax(first_logits.float(), dim=-1)  # (N, V)
    scores = first[:, candidate_ids[:, 0]].clone()  # (N, C): every candidate's first token
    if la == 1:
        return scores
    chunk = max(1, rows_per_call // max(1, n))
    for c0 in range(0, c_total, chunk):
        ids, mask = candidate_ids[c0:c0 + chunk], candidate_mask[c0:c0 + chunk]
        c = len(ids)
        rows = torch.arange(n, device=ids.device).repeat_interleave(c)  # question-major
        fork = _fork(state, rows)
        hidden = backbone.decode_step(ids[:, :-1].repeat(n, 1), fork)  # (n*c, La-1, W)
        real = mask[:, 1:].bool().repeat(n, 1)  # (n*c, La-1): the tokens predicted there
        logp = F.log_softmax(backbone.mlm_head(hidden[real]).float(), dim=-1)  # (M, V)
        token = logp.gather(1, ids[:, 1:].repeat(n, 1)[real][:, None])[:, 0]  # (M,)
        per_row = torch.zeros(n * c, device=token.device).index_add(
            0, real.nonzero()[:, 0], token)
        scores[:, c0:c0 + c] += per_row.view(n, c)
    return scores
