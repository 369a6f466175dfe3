"""Input corruption for the single-stream objectives: BERT's token masking (with a whole-word
option), region masking, and image-text mismatches drawn from the batch.

Randomness comes from the `generator` passed in (the train loop uses torch's global RNG, whose
state every checkpoint saves per process, so a resumed run masks exactly as the original).
"""
from __future__ import annotations

import torch

IGNORE = -100  # label value cross_entropy skips


def special_token_ids(tokenizer) -> torch.Tensor:
    """Ids that masking never picks: padding, [CLS], [SEP], [MASK] (those the vocabulary has)."""
    return torch.tensor([i for i in (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id,
                                     tokenizer.mask_id) if i is not None])


def mask_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor,
               mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every occurrence of `word_ids` replaced by [MASK] (deterministic, for evaluation) ->
    (corrupted ids, labels with IGNORE elsewhere, the chosen positions)."""
    chosen = torch.isin(input_ids, word_ids) & attention_mask.bool()
    corrupted = torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    return corrupted, labels, chosen


def continuation_table(tokenizer) -> torch.Tensor:
    """(vocab,) bool: True for WordPiece continuation pieces ('##ing'), which belong to the
    word of the token before them (for whole-word masking)."""
    vocab = tokenizer.hf.get_vocab()
    table = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for token, i in vocab.items():
        if token.startswith("##") and i < len(table):
            table[i] = True
    return table


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, prob: float,
                special_ids: torch.Tensor, mask_id: int, vocab_size: int,
                continuation: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption -> (corrupted ids, labels with IGNORE where not predicted).

    Each real, non-special token is chosen with probability `prob` (with `continuation`, whole
    words are chosen: a continuation piece follows the token before it); of the chosen, 80%
    become [MASK], 10% a random non-special token, 10% stay as they are."""
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(input_ids.device))
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = candidates & (draw < prob)
    if continuation is not None:
        cont = continuation.to(input_ids.device)[input_ids] & candidates
        # every token takes the draw of the first piece of its word
        word_start = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        word_start = torch.where(cont, torch.zeros_like(word_start), word_start)
        word_start = torch.cummax(word_start, dim=1).values
        chosen = candidates & torch.gather(chosen, 1, word_start)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    how = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = chosen & (how < 0.8)
    to_random = chosen & (how >= 0.8) & (how < 0.9)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator,
                               device=input_ids.device)
    # a draw that hits a special token leaves the token unchanged (rare: a handful of ids)
    to_random &= ~torch.isin(random_ids, special_ids.to(input_ids.device))
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


def mask_regions(region_mask: torch.Tensor, prob: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, R) bool: which real regions are masked (features zeroed, then predicted)."""
    draw = torch.rand(region_mask.shape, generator=generator, device=region_mask.device)
    return region_mask.bool() & (draw < prob)


def mismatch_pairs(input_ids: torch.Tensor, neg_prob: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching from the batch -> (text index per image (B,), labels (B,) 1 =
    matched). With probability `neg_prob` an image gets another sample's text; a text equal
    token for token to its own (two scenes with the same caption) still counts as matched."""
    b = input_ids.shape[0]
    device = input_ids.device
    if b < 2:
        return torch.arange(b, device=device), torch.ones(b, dtype=torch.long, device=device)
    negative = torch.rand(b, generator=generator, device=device) < neg_prob
    shift = torch.randint(1, b, (b,), generator=generator, device=device)
    index = torch.where(negative, (torch.arange(b, device=device) + shift) % b,
                        torch.arange(b, device=device))
    same = (input_ids[index] == input_ids).all(dim=1)
    return index, same.long()
