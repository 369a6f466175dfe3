"""Pretraining: the recipes (what differs between model families, each a `vlp.engine.task.Task`)
and `pretrain(cfg, out_dir)`, which prepares a run's data and tokenizer and hands the recipe
and the shard stream to the one loop (vlp/engine/loop.py).

    dual_tower     CLIP: contrastive loss over all processes' features
    single_stream  VL-BERT / UNITER / ViLT: MLM with visual clues, MRC / MRFR, ITM
    combined       ALBEF style: ITC on the towers, ITM (hard negatives) and MLM on fusion layers

A new pretraining objective is a loss in vlp/objectives and a recipe module here (loss,
model directory, evaluation), chosen below by `recipe:`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from vlp.config import ConfigError, PretrainConfig, to_dict, validate
from vlp.data.pipeline import make_loader
from vlp.data.shards import check_shards_vs_workers, count_samples, expand_urls
from vlp.data.sources import ShardSource
from vlp.engine import dist
from vlp.engine.logs import check_tensorboard
from vlp.engine.loop import RunLock, check_resumed_config, resolve_resume, train
from vlp.engine.setup import build_tokenizer, resolve_data, tokenizer_cache
from vlp.engine.task import Task
from vlp.recipes.combined import CombinedRecipe
from vlp.recipes.dual_tower import DualTowerRecipe, resolve_tower_inits
from vlp.recipes.init_from import adopt_start, start_transform
from vlp.recipes.single_stream import SingleStreamRecipe, adopt_bert_shape
from vlp.tokenizer import Tokenizer, load_tokenizer


def build_recipe(cfg: PretrainConfig, tokenizer: Tokenizer, train_urls: list[str],
                 world_size: int, val_spec: str = "") -> Task:
    if cfg.recipe == "dual_tower":
        return DualTowerRecipe(cfg, tokenizer, world_size, val_spec)
    if cfg.recipe == "single_stream":
        return SingleStreamRecipe(cfg, tokenizer, train_urls, world_size, val_spec)
    if cfg.recipe == "combined":
        return CombinedRecipe(cfg, tokenizer, world_size, val_spec)
    raise ValueError(f"unknown recipe {cfg.recipe!r}")


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: str | None = None,
             progress: bool = True, given: set[str] | None = None) -> dict:
    """Train `cfg.recipe`'s model on this process's share of the data (all processes of a launch
    call this): checkpoints, the model directory (`OUT/model`) and evaluation metrics
    (`OUT/metrics.json`, rank 0). Returns the metrics. `given`: the dotted config keys the
    user set (the command line's); with model.init_from, those that differ from the directory
    are refused (without it: those that differ from the defaults)."""
    out_dir = Path(out_dir)
    started = time.time()
    check_tensorboard(cfg.logging.tensorboard)
    # derived settings resolved once, before any work: OUT/config.yaml is what runs
    adopted: list[str] = []
    if cfg.recipe == "single_stream":
        cfg, adopted = adopt_bert_shape(cfg)
    cfg, started_from = adopt_start(cfg, given)
    if started_from:
        validate(cfg)  # the directory's shape must suit the recipe (e.g. MLM needs BERT-style)
    if cfg.recipe in ("dual_tower", "combined"):
        cfg, tower_shapes = resolve_tower_inits(cfg, given)  # before transforms and tokenizer
        started_from += tower_shapes
    world = dist.init()
    main = world.is_main
    say = print if main else (lambda *a, **k: None)
    dist.set_threads(world, cfg.train.threads)
    if adopted:
        say(f"model.init_text_from: taking the BERT folder's {', '.join(adopted)}")
    for line in started_from:
        say(f"starting from published weights: {line}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir) if world.is_main else None  # one run at a time in OUT
    resume_from = resolve_resume(out_dir, resume)
    check_resumed_config(cfg, out_dir, resume_from, say)  # before any work

    # Shapes world and tokenizer: made once (per node / by rank 0), read by all.
    if world.local_rank == 0:
        train_spec, val_spec = resolve_data(cfg.data, progress=progress and main)
    dist.barrier()
    if world.local_rank != 0:
        train_spec, val_spec = resolve_data(cfg.data, progress=False)
    urls = expand_urls(train_spec)
    if val_spec and (cfg.eval.at_end or cfg.eval.every):
        expand_urls(val_spec)  # a missing data.val stops the run now, not after training
    if not cfg.data.resampled:
        try:
            check_shards_vs_workers(len(urls), world.size, cfg.data.num_workers)
        except ConfigError as e:
            if cfg.data.train:
                raise
            raise ConfigError(f"the built-in shapes world (data.train empty) has {len(urls)} "
                              f"shards: {e} For many processes, data.resampled=true is the "
                              "usual choice.") from None
    saved_tokenizer = out_dir / "tokenizer.json"
    if main:
        if resume_from and not cfg.tokenizer.path:
            # the vocabulary the checkpoint was trained with
            tokenizer = load_tokenizer(resume_from / "tokenizer.json")
            tokenizer.save(saved_tokenizer)
        else:
            tokenizer = build_tokenizer(cfg.tokenizer, urls, saved_tokenizer,
                                        cache=tokenizer_cache(cfg.data, cfg.tokenizer.vocab_size))
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    if not main:
        tokenizer = load_tokenizer(saved_tokenizer)

    recipe = build_recipe(cfg, tokenizer, urls, world.size, val_spec)
    train_tf = start_transform(cfg, train=True)

    def loader_for(epoch: int, start: dict | None):
        return make_loader(urls, tokenizer=tokenizer, transform=train_tf,
                           batch_size=cfg.train.batch_size,
                           context_length=cfg.model.text.context_length,
                           num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                           seed=cfg.train.seed, rank=world.rank, world_size=world.size,
                           resampled=cfg.data.resampled, caption=cfg.data.caption, epoch=epoch,
                           start=start, pin_memory=torch.cuda.is_available(),
                           **recipe.loader_kwargs())

    source = ShardSource(loader_for, urls=urls, batch_size=cfg.train.batch_size,
                         num_samples=count_samples(urls), resampled=cfg.data.resampled)
    try:
        return train(recipe, source, cfg, out_dir, world, resume_from=resume_from,
                     progress=progress, command="pretrain", started=started)
    finally:
        if lock:
            lock.release()
