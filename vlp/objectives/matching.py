"""Image-text matching with hard negatives, the one sampler for pretraining (the combined
recipe) and fine-tuning (retrieval with ITM re-ranking).

ALBEF (Li et al. 2021, `models/model_pretrain.py`): for every image a caption of the batch, and
for every caption an image, drawn with probability softmax(similarity / temperature) over the
non-matching ones, so the likeliest confusions are the negatives. A caption identical token for
token to the positive is no negative: it is left out of the draw (drawable only when nothing
else is) and labelled a match.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MatchingPairs(NamedTuple):
    text_for_image: torch.Tensor  # (B,) the hard negative caption of each image
    image_for_text: torch.Tensor  # (B,) the hard negative image of each caption
    labels: torch.Tensor  # (3B,) 1 = match: B positives, B image->caption, B caption->image


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """For each row i of `similarity` (B, B), a column j != i drawn with probability
    softmax over the row without its diagonal (the more similar, the likelier)."""
    b = similarity.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=similarity.device)
    weights = F.softmax(similarity.float(), dim=1).masked_fill(eye, 0)
    weights = weights + 1e-12 * ~eye  # a row whose softmax underflowed still draws
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_matching_pairs(image_features: torch.Tensor, text_features: torch.Tensor,
                          input_ids: torch.Tensor, logit_scale: torch.Tensor,
                          generator: torch.Generator | None = None) -> MatchingPairs:
    """Hard negatives for a batch of B pairs from their L2-normalised features (B, D) and the
    learnable logit scale (1 / temperature)."""
    b = input_ids.shape[0]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B)
    arange = torch.arange(b, device=input_ids.device)
    if b < 2:  # nothing to draw from: the pair itself, a match
        return MatchingPairs(arange, arange, torch.ones(3 * b, dtype=torch.long,
                                                        device=input_ids.device))
    sim = logit_scale.float() * (image_features.float() @ text_features.float().T)
    # -1e4, not -inf: a row of only identical captions must not turn the softmax into NaNs
    sim = sim.masked_fill(same_text, -1e4)
    text_for_image = hard_negatives(sim, generator)
    image_for_text = hard_negatives(sim.T, generator)
    labels = torch.cat([torch.ones_like(arange), same_text[arange, text_for_image].long(),
                        same_text[image_for_text, arange].long()])
    return MatchingPairs(text_for_image, image_for_text, labels)
