"""Models: embeddings, the one Transformer, towers (and, later, heads)."""
from vlp.models.encoder import Transformer, build_attention_mask
from vlp.models.embed import PatchEmbed, TextEmbed
from vlp.models.towers import DualTower

__all__ = ["Transformer", "build_attention_mask", "PatchEmbed", "TextEmbed", "DualTower"]
