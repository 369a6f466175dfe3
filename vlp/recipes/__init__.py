"""Pretraining recipes: what differs between model families, behind one small interface the
train loop (vlp/engine/train.py) calls:

    recipe.loader_kwargs()       extra make_loader arguments (visual tokens, regions)
    recipe.build_model()         the nn.Module to train
    recipe.loss(engine, batch)   -> (loss tensor, [floats named by recipe.metric_names])
    recipe.finish(weights, out_dir, val_spec, progress) -> metrics: model directory + evaluation
"""
from __future__ import annotations

from vlp.config import PretrainConfig


def build_recipe(cfg: PretrainConfig, tokenizer, train_urls: list[str], world_size: int):
    if cfg.recipe == "dual_tower":
        from vlp.recipes.dual_tower import DualTowerRecipe

        return DualTowerRecipe(cfg, tokenizer, world_size)
    if cfg.recipe == "single_stream":
        from vlp.recipes.single_stream import SingleStreamRecipe

        return SingleStreamRecipe(cfg, tokenizer, train_urls, world_size)
    if cfg.recipe == "combined":
        from vlp.recipes.combined import CombinedRecipe

        return CombinedRecipe(cfg, tokenizer, world_size)
    raise ValueError(f"unknown recipe {cfg.recipe!r}")
