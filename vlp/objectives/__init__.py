"""Losses per recipe; cross-rank gathers live here."""
from vlp.objectives.contrastive import clip_loss, distributed_clip_loss, gather_with_grad

__all__ = ["clip_loss", "distributed_clip_loss", "gather_with_grad"]
