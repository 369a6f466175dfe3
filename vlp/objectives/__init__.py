"""Losses and the input corruption they need; cross-rank gathers live here.

    contrastive     CLIP's InfoNCE over all processes' features (gather with gradients)
    siglip          SigLIP's sigmoid loss over all pairs, texts passed round a ring of processes
    masking         BERT's token masking, region masking, mismatched pairs (single stream)
    matching        image-text matching hard negatives (ALBEF), pretraining and fine-tuning
    classification  cross-entropy with accuracy for the MLM / MRC / ITM heads
"""
from vlp.objectives.classification import classification_loss
from vlp.objectives.contrastive import clip_loss, distributed_clip_loss, gather_with_grad
from vlp.objectives.matching import MatchingPairs, hard_negatives, sample_matching_pairs
from vlp.objectives.siglip import siglip_loss

__all__ = ["classification_loss", "clip_loss", "distributed_clip_loss", "gather_with_grad",
           "MatchingPairs", "hard_negatives", "sample_matching_pairs", "siglip_loss"]
