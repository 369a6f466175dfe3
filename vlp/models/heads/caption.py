"""Captioning head: the joint encoder as a language model under the prefix-LM mask (UniLM's
seq2seq mask, Dong et al. 2019, with the image as the source, as in Unified-VLP, Zhou et al.
2020), and the searches that decode with it.

Training: input `[CLS] w1 .. wn`, targets `w1 .. wn [SEP]` (shifted by one; pads ignored),
cross-entropy with label smoothing. Word i sees the visual tokens and words <= i only
(`backbone(..., causal_text=True)`), so one pass scores every position.

The word predictor is the backbone's pretrained MLM head (BERT's dense + act + LayerNorm, then
the word embeddings transposed): reused, not copied, so it stays tied to the input embeddings
and starts from pretraining. The head therefore has no parameters of its own.

Decoding: `greedy_search` and `beam_search` take a step-scoring callable
`step(tokens (N, t), images (N,)) -> (N, V) next-token logits` (`tokens` start with [CLS];
`images` says which image each row belongs to), so the searches are tested apart from any model.
A step that keeps state per row (`CachedStep`: the backbone's key/value cache, so a step encodes
one word instead of the whole prefix) also gets `reorder(index)` from the searches whenever
they keep, drop or reorder rows between two calls.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ReorderFn = Callable[[torch.Tensor], None]


class CaptionHead(nn.Module):
    """Next-word logits through `backbone.mlm_head` (no parameters of its own)."""

    def forward(self, backbone, *, input_ids, attention_mask, visual,
                labels=None) -> dict[str, torch.Tensor]:
        """{"logits"}: (M, V) at the positions with labels != -100, else (B, L, V)."""
        hidden = backbone(input_ids, attention_mask, visual, causal_text=True)  # (B, L, W)
        if labels is not None:
            hidden = hidden[labels != -100]  # (M, W): the vocabulary projection only where scored
        return {"logits": backbone.mlm_head(hidden)}

    def next_token_logits(self, backbone, tokens: torch.Tensor, visual: dict) -> torch.Tensor:
        """tokens (N, t) with no padding -> (N, V) logits of token t+1, the whole prefix
        encoded (CachedStep encodes only the last word)."""
        hidden = backbone(tokens, torch.ones_like(tokens), visual, causal_text=True)
        return backbone.mlm_head(hidden[:, -1])


class CachedStep:
    """A step function for the searches that encodes only each row's newest word, against the
    keys/values the backbone cached for the image's visual tokens and the earlier words
    (`JointEncoder.start_decoding` / `decode_step`); pass `reorder=step.reorder` to the search.

    `encoded`: the images' visual tokens (`backbone.encode_visual`), one row per image; the
    first call gives each row its image's cache (`images`), later calls must extend the rows
    the last call returned, as `reorder` left them."""

    def __init__(self, backbone, encoded: dict):
        self.backbone = backbone
        self.prefix = backbone.start_decoding(encoded)  # one row per image
        self.state = None  # one row per hypothesis, after the first call
        self.rows = 0

    def __call__(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            self.state, self.prefix = self.prefix.select(images), None
            self.rows = len(images)
        self._check(tokens, self.state.position + 1, f"{self.state.position} words")
        return self._next_word(tokens)

    def _check(self, tokens: torch.Tensor, length: int, holds: str) -> None:
        """The search must hand back the rows it kept, each one word longer (`length`)."""
        if len(tokens) != self.rows or tokens.shape[1] != length:
            raise ValueError(f"{type(self).__name__} holds {self.rows} rows of {holds} but was "
                             f"given tokens {tuple(tokens.shape)}: the search must extend each "
                             "row by one word and report kept rows by reorder(index)")

    def _next_word(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, V) logits after each row's newest word, which alone is encoded."""
        hidden = self.backbone.decode_step(tokens[:, -1:], self.state)  # (N, 1, W)
        return self.backbone.mlm_head(hidden[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        """The next call's rows are this call's rows `index` (N',)."""
        self.state.select(index)
        self.rows = len(index)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy; `label_smoothing` spreads that much target mass uniformly over
    the vocabulary (Szegedy et al. 2016), as captioning fine-tuning in Unified-VLP / OSCAR."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def _scores(step: StepFn, tokens: torch.Tensor, images: torch.Tensor, banned: list[int],
            eos_id: int, allow_eos: bool) -> torch.Tensor:
    """(N, V) float log-probabilities of the next token, banned tokens at -inf."""
    logp = F.log_softmax(step(tokens, images).float(), dim=-1)
    blocked = banned if allow_eos else [*banned, eos_id]
    if blocked:
        logp[:, blocked] = float("-inf")
    return logp


def greedy_search(step: StepFn, num_images: int, *, bos_id: int, eos_id: int, max_length: int,
                  min_length: int = 1, banned_ids: Sequence[int] = (),
                  device: torch.device | str = "cpu", reorder: ReorderFn | None = None
                  ) -> list[list[int]]:
    """The most likely next token at each step. Returns each image's tokens, without [CLS] and
    without the final [SEP]; at most `max_length` tokens ([SEP] included), [SEP] only after
    `min_length` tokens, never a `banned_ids` token. `reorder(index)` hears which rows go on
    when some finish (see the module docstring)."""
    banned = sorted(set(banned_ids) - {eos_id})
    active = torch.arange(num_images, device=device)  # the images still being decoded
    tokens = torch.full((num_images, 1), bos_id, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(num_images)]
    for t in range(1, max_length + 1):
        logp = _scores(step, tokens, active, banned, eos_id, allow_eos=t > min_length)
        nxt = logp.argmax(dim=-1)  # (N,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == eos_id) | (t == max_length)
        for row in done.nonzero().flatten().tolist():
            seq = tokens[row, 1:].tolist()
            out[int(active[row])] = seq[:-1] if seq[-1] == eos_id else seq
        tokens, active = tokens[~done], active[~done]
        if not len(active):
            break
        if reorder is not None and len(active) < len(done):
            reorder((~done).nonzero().flatten())
    return out


def beam_search(step: StepFn, num_images: int, *, bos_id: int, eos_id: int, beam_size: int,
                max_length: int, length_penalty: float = 1.0, min_length: int = 1,
                banned_ids: Sequence[int] = (), device: torch.device | str = "cpu",
                reorder: ReorderFn | None = None) -> list[list[int]]:
    """Beam search, batched: the live beams of every unfinished image are rows of one call to
    `step` (image-major, `beam_size` rows each).

    A hypothesis' score is its summed log-probability / length ** length_penalty, length = the
    tokens it generated ([SEP] included). Each step keeps, per image, the best `beam_size`
    extensions that do not end in [SEP]; an extension ending in [SEP] that ranks within the
    top `beam_size` candidates is finished (fairseq's rule). An image stops when it has
    `beam_size` finished hypotheses, or at `max_length` (its top candidates then finish as they
    are). The best finished hypothesis by score is returned (tokens without [CLS]/[SEP]).
    With beam_size=1 this is exactly `greedy_search`; with a beam wider than the number of
    possible prefixes it is the exhaustive optimum (tests/test_ft_caption.py checks both).
    `reorder(index)` hears which rows each next step's rows extend (see the module docstring).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    K = beam_size
    banned = sorted(set(banned_ids) - {eos_id})
    active = list(range(num_images))
    tokens = torch.full((num_images * K, 1), bos_id, dtype=torch.long, device=device)
    # one real start beam per image; the others are -inf until they are filled
    scores = torch.full((num_images, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(num_images)]
    for t in range(1, max_length + 1):
        n = len(active)
        images = torch.tensor(active, device=device).repeat_interleave(K)  # (n*K,)
        logp = _scores(step, tokens, images, banned, eos_id, allow_eos=t > min_length)
        V = logp.shape[1]
        candidates = (scores[:, :, None] + logp.view(n, K, V)).view(n, K * V)
        # 2K candidates always hold K that do not end in [SEP] (one [SEP] per beam at most)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=1)  # sorted, (n, 2K)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        keep_images, rows, next_tokens, next_scores = [], [], [], []
        for i, image in enumerate(active):
            live: list[tuple[int, int, float]] = []  # (row of the prefix, token, score)
            for rank, (s, index) in enumerate(zip(top_scores[i], top_index[i])):
                if s == float("-inf"):
                    break
                row, token = i * K + index // V, index % V
                if token == eos_id or t == max_length:
                    if rank < K:
                        seq = tokens[row, 1:].tolist() + ([] if token == eos_id else [token])
                        finished[image].append((s / t ** length_penalty, seq))
                elif len(live) < K:
                    live.append((row, token, s))
            if len(finished[image]) >= K or t == max_length or not live:
                continue
            live += [(live[0][0], live[0][1], float("-inf"))] * (K - len(live))  # unused slots
            keep_images.append(image)
            for row, token, s in live:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(s)
        if not keep_images:
            break
        index = torch.tensor(rows, device=device)
        if reorder is not None:
            reorder(index)
        tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], 1)
        scores = torch.tensor(next_scores, device=device).view(len(keep_images), K)
        active = keep_images
    out = []
    for hyps in finished:
        best = max(hyps, key=lambda h: h[0]) if hyps else (-math.inf, [])
        out.append(best[1])
    return out


def sample_search(step: StepFn, num_images: int, *, num_samples: int, bos_id: int, eos_id: int,
                  max_length: int, min_length: int = 1, banned_ids: Sequence[int] = (),
                  device: torch.device | str = "cpu", reorder: ReorderFn | None = None,
                  generator: torch.Generator | None = None
                  ) -> tuple[list[list[int]], torch.Tensor]:
    """`num_samples` captions per image drawn token by token from the model's distribution
    (multinomial, temperature 1), for self-critical training (Rennie et al. 2017): the same
    rules as `greedy_search` (no banned token, [SEP] only after `min_length` tokens, at most
    `max_length` tokens), each token drawn from the distribution `_scores` gives (banned
    tokens removed, renormalised). Rows are image-major: sample j of image i is row
    i * num_samples + j, and the first call's `images` tell a CachedStep which image each row
    starts from. Returns (tokens per row without [CLS] and the final [SEP]: shorter than
    `max_length` exactly when the row ended with [SEP]; (rows,) float summed log-probability of
    each row's drawn tokens, [SEP] included) - what `sequence_logprobs` recomputes with
    gradients. `generator`: the random source (default torch's global one)."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    banned = sorted(set(banned_ids) - {eos_id})
    rows = num_images * num_samples
    active = torch.arange(num_images, device=device).repeat_interleave(num_samples)  # images
    row_of = torch.arange(rows, device=device)  # the output row of each live row
    tokens = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(rows)]
    total = torch.zeros(rows, dtype=torch.float32, device=device)
    for t in range(1, max_length + 1):
        # renormalised over the allowed tokens (_scores only blanks the others out)
        logp = _scores(step, tokens, active, banned, eos_id, allow_eos=t > min_length
                       ).log_softmax(dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (N,)
        total.index_add_(0, row_of, logp.gather(1, nxt[:, None]).squeeze(1))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == eos_id) | (t == max_length)
        for r in done.nonzero().flatten().tolist():
            seq = tokens[r, 1:].tolist()
            out[int(row_of[r])] = seq[:-1] if seq[-1] == eos_id else seq
        keep = ~done
        tokens, active, row_of = tokens[keep], active[keep], row_of[keep]
        if not len(active):
            break
        if reorder is not None and len(active) < len(done):
            reorder(keep.nonzero().flatten())
    return out, total


def lm_sequences(seqs: Sequence[Sequence[int]], *, bos_id: int, eos_id: int, max_length: int,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded token rows (as the searches return them) -> (input_ids, attention_mask, labels),
    each (N, L), for scoring them in one teacher-forced pass: inputs `[CLS] w1 .. wn`, targets
    `w1 .. wn [SEP]` (no [SEP] for a row of `max_length` tokens: it was cut, not ended), the
    training batches' layout (vlp/tasks/caption.py `lm_inputs`); pads -100."""
    fulls = [[bos_id, *s] + ([eos_id] if len(s) < max_length else []) for s in seqs]
    width = max(len(f) for f in fulls) - 1
    ids = torch.full((len(fulls), width), pad_id, dtype=torch.long)
    labels = torch.full((len(fulls), width), -100, dtype=torch.long)
    mask = torch.zeros((len(fulls), width), dtype=torch.long)
    for i, f in enumerate(fulls):
        n = len(f) - 1
        ids[i, :n] = torch.tensor(f[:-1])
        labels[i, :n] = torch.tensor(f[1:])
        mask[i, :n] = 1
    return ids, mask, labels


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, eos_id: int,
                      banned_ids: Sequence[int] = (), min_length: int = 1) -> torch.Tensor:
    """Summed log-probability of each row's targets under the sampling distribution of
    `sample_search` (banned tokens, and [SEP] before `min_length` tokens, removed and the rest
    renormalised), with gradients. logits (M, V): the head's at labels != -100 (row-major);
    labels (N, L) -> (N,) float."""
    where = (labels != -100).nonzero()  # (M, 2): row, position
    logits = logits.float()
    blocked = torch.zeros_like(logits, dtype=torch.bool)
    banned = sorted(set(banned_ids) - {eos_id})
    if banned:
        blocked[:, banned] = True
    blocked[where[:, 1] < min_length, eos_id] = True
    logp = F.log_softmax(logits.masked_fill(blocked, float("-inf")), dim=-1)
    targets = labels[labels != -100]
    token_logp = logp.gather(1, targets[:, None]).squeeze(1)  # (M,)
    return torch.zeros(labels.shape[0], dtype=token_logp.dtype,
                       device=token_logp.device).index_add(0, where[:, 0], token_logp)


def scst_loss(logprobs: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor,
              num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Self-critical policy gradient (Rennie et al. 2017, eq. 8-9): -(r(w^s) - b) log p(w^s),
    summed over the samples and divided by their total tokens ([SEP] included), as
    self-critical.pytorch's RewardCriterion normalises. logprobs (N,): each sample's summed
    token log-probabilities (`sequence_logprobs`); rewards/baselines (N,) constants."""
    advantage = (rewards - baselines).to(logprobs)
    return -(advantage.detach() * logprobs).sum() / num_tokens
