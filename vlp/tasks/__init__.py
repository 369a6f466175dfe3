"""Fine-tuning: one task per benchmark (its official files, its head, its loss, its official
metric and results file), each a `vlp.engine.task.Task`, and `finetune(cfg, out_dir)`, which
builds the joint encoder from `init_from` and hands the task and its training split to the one
loop (vlp/engine/loop.py).

    vqa        VQA v2 questions/annotations JSON, the official VQA accuracy
    caption    Karpathy's dataset_coco.json, COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr)
    vcr        VCR jsonl + metadata, Q->A / QA->R / Q->AR
    retrieval  Karpathy split, Recall@1/5/10 both ways (ITM re-ranking with fusion layers)
    refcoco    refer toolkit refs + instances.json, accuracy at IoU >= 0.5 (gt / detected boxes)

A new benchmark is a module here (a FinetuneTask subclass: data, head, loss, `score`), a
config block in vlp/config.py, and a line in `build_task`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import yaml

from vlp import modeldir
from vlp.config import ConfigError, FinetuneConfig, load_config, to_dict
from vlp.data.sources import MapSource
from vlp.data.transforms import ImageTransform
from vlp.engine import dist
from vlp.engine.logs import check_tensorboard
from vlp.engine.loop import RunLock, check_resumed_config, resolve_resume, train
from vlp.engine.setup import benchmark_root
from vlp.models.device import eval_autocast, resolve_device
from vlp.models.joint import JointEncoder
from vlp.tasks.caption import CaptionTask
from vlp.tasks.common import FinetuneTask
from vlp.tasks.refcoco import RefCOCOTask
from vlp.tasks.retrieval import RetrievalTask
from vlp.tasks.vcr import VCRTask
from vlp.tasks.vqa import VQATask
from vlp.tokenizer import Tokenizer

PRETRAIN_HINT = ("vlp pretrain --config configs/pretrain/vlbert_shapes.yaml --out runs/vlbert "
                 "(then init_from=runs/vlbert/model)")


def build_task(cfg: FinetuneConfig, encoder: JointEncoder, tokenizer: Tokenizer,
               transform: ImageTransform, root: Path, world_size: int = 1,
               saved: modeldir.ModelDir | None = None) -> FinetuneTask:
    """The task object; `saved`: a fine-tuned model directory whose task files (e.g. VQA's
    answer vocabulary) it must use instead of deriving them from the training files."""
    args = (cfg, encoder, tokenizer, transform, root, world_size)
    if cfg.task == "vqa":
        return VQATask(*args, answers=saved.read_json("answers.json") if saved else None)
    if cfg.task == "caption":
        return CaptionTask(*args)
    if cfg.task == "vcr":
        return VCRTask(*args)
    if cfg.task == "retrieval":
        return RetrievalTask(*args)
    if cfg.task == "refcoco":
        return RefCOCOTask(*args)
    raise ConfigError(f"task={cfg.task!r}: choose vqa, caption, vcr, retrieval or refcoco")


def finetune(cfg: FinetuneConfig, out_dir: str | Path, *, resume: str | None = None,
             progress: bool = True) -> dict:
    """Fine-tune `cfg.init_from` on `cfg.task`; writes checkpoints, OUT/model (loadable with
    vlp.load), the official results file and OUT/metrics.json (rank 0). Returns the metrics."""
    out_dir = Path(out_dir)
    started = time.time()
    check_tensorboard(cfg.logging.tensorboard)
    if not cfg.init_from:
        raise ConfigError(f"init_from is empty: name a pretrained model directory, e.g. "
                          f"{PRETRAIN_HINT}")
    world = dist.init()
    dist.set_threads(world, cfg.train.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir) if world.is_main else None  # one run at a time in OUT
    if world.local_rank == 0:
        root = benchmark_root(cfg.data, progress and world.is_main)
    dist.barrier()
    if world.local_rank != 0:
        root = benchmark_root(cfg.data, False)
    resume_from = resolve_resume(out_dir, resume)
    encoder, tokenizer, transform = JointEncoder.from_pretrained(
        cfg.init_from, cfg.fusion, image_size=cfg.model.vision.image_size,
        drop_path_rate=cfg.model.vision.drop_path_rate)
    task = build_task(cfg, encoder, tokenizer, transform, root, world.size)
    source = MapSource(task.dataset("train"), task.collate, batch_size=cfg.train.batch_size,
                       seed=cfg.train.seed, rank=world.rank, world_size=world.size,
                       num_workers=cfg.data.num_workers)
    # resolved once, before any work: OUT/config.yaml says what runs
    epoch_steps = max(1, math.ceil(source.batches_per_epoch / cfg.train.grad_accum))
    if cfg.epochs:
        steps = max(1, math.ceil(cfg.epochs * source.batches_per_epoch / cfg.train.grad_accum))
        cfg = replace(cfg, train=replace(cfg.train, steps=steps))
    if cfg.eval.per_epoch:
        cfg = replace(cfg, eval=replace(cfg.eval, every=epoch_steps, per_epoch=False))
    check_resumed_config(cfg, out_dir, resume_from, print if world.is_main else lambda *a: None)
    if world.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tokenizer.save(out_dir / "tokenizer.json")
    dist.barrier()
    try:
        return train(task, source, cfg, out_dir, world, resume_from=resume_from,
                     progress=progress, command=f"finetune {cfg.task}", started=started)
    finally:
        if lock:
            lock.release()


def _check_vqa_head(trained: str, asked: str, model_dir) -> None:
    """generate and rank share their weights (the prefix LM's word head); a classifier has
    other weights, so switching between it and them needs another fine-tuning run."""
    if (trained == "classify") != (asked == "classify"):
        can = "classify" if trained == "classify" else "generate or rank"
        raise ConfigError(f"vqa.head={asked}: {model_dir} was fine-tuned with vqa.head={trained}"
                          f", whose weights serve vqa.head={can} only; fine-tune with "
                          f"vqa.head={asked} for that head")


def evaluate_finetuned(model_dir: str | Path, out_dir: str | Path, *, data_root: str = "",
                       split: str = "", overrides: list[str] | None = None,
                       progress: bool = True, device: str | None = None) -> dict:
    """`vlp eval <task> --model DIR`: score a fine-tuned model directory on a benchmark split
    (the shapes world's unless data.root / the task's file keys say otherwise), writing the
    official results file into out_dir."""
    folder = modeldir.read(model_dir, ("finetuned",))
    name = folder.config["task"]
    overrides = list(overrides or [])
    # the run's own task settings (beam size, lengths...) unless the command line overrides
    # them; given as overrides, so the config is built once and not changed afterwards
    given = {o.split("=", 1)[0] for o in overrides}
    block = getattr(FinetuneConfig(), name, None)
    saved = [f"{name}.{k}={json.dumps(v)}" for k, v in folder.config.get("head", {}).items()
             if hasattr(block, k) and f"{name}.{k}" not in given]
    cfg = load_config(None, [f"task={name}", *saved, *overrides,
                             *([f"data.root={data_root}"] if data_root else [])],
                      cls=FinetuneConfig)
    if name == "vqa":
        _check_vqa_head(folder.config.get("head", {}).get("head", "classify"), cfg.vqa.head,
                        model_dir)
    root = benchmark_root(cfg.data, progress)
    tokenizer = folder.tokenizer()
    encoder = JointEncoder(folder.config["backbone"], tokenizer.vocab_size)
    task = build_task(cfg, encoder, tokenizer, folder.transform(), root, saved=folder)
    model = task.build_model()
    modeldir.load_weights(model, folder.weights(), str(folder.path / modeldir.WEIGHTS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    with eval_autocast(device):
        return task.score(model.eval().to(device), split or cfg.eval.split, out_dir, progress)


__all__ = ["build_task", "finetune", "evaluate_finetuned", "FinetuneTask", "PRETRAIN_HINT"]
