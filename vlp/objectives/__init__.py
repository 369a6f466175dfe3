"""Losses per recipe; cross-rank gathers live here."""
from vlp.objectives.contrastive import clip_loss

__all__ = ["clip_loss"]
