"""The one fine-tuning loop: `finetune(cfg, out_dir)` for every task, one process or many.

    pretrained model dir -> Backbone + the task's head -> DeepSpeed engine
    benchmark files -> the task's map-style dataset -> this rank's shuffled share per epoch
    -> steps (NaN steps skipped, as in pretraining) -> checkpoints -> OUT/model -> official metric

Benchmarks are small, indexable files (not streams), so the data position is just (epoch,
batch in epoch): a resumed run re-derives the epoch's permutation from the seed and continues
at the next batch. Per micro-batch the ranks exchange one row [loss, samples, stop request,
metrics] so they agree on NaN skips and on a SIGTERM/Ctrl-C stop.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vlp.config import ConfigError, FinetuneConfig, to_dict
from vlp.engine import checkpoint, dist
from vlp.engine.engine import Engine, rng_state, set_rng_state
from vlp.engine.train import TRAINER_STATE, JsonlLog, NonFiniteLossError, TensorBoardLog, \
    _seed_everything, _StopRequests, truncate_log
from vlp.finetune.backbone import Backbone
from vlp.finetune.task import save_finetuned

PRETRAIN_HINT = ("vlp pretrain --config configs/pretrain/vlbert_shapes.yaml --out runs/vlbert "
                 "(then init_from=runs/vlbert/model)")


def benchmark_root(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """data.root, else the shapes world's benchmarks folder (generated once if missing)."""
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={cfg.data.root!r} is not a folder")
        return root
    from vlp.engine.setup import shapes_world

    d = cfg.data
    return shapes_world(d.synth_dir, d.synth_seed, d.synth_images, progress) / "benchmarks"


def build_task(cfg: FinetuneConfig, backbone: Backbone, tokenizer, transform, root: Path,
               saved: Path | None = None):
    """The task object; `saved`: a fine-tuned model directory whose task files (e.g. VQA's
    answer vocabulary) it must use instead of deriving them from the training files."""
    if cfg.task == "vqa":
        from vlp.tasks.vqa import VQATask

        answers = json.loads((saved / "answers.json").read_text()) if saved else None
        return VQATask(cfg, backbone, tokenizer, transform, root, answers=answers)
    if cfg.task == "caption":
        from vlp.tasks.caption import CaptionTask

        return CaptionTask(cfg, backbone, tokenizer, transform, root)
    if cfg.task == "vcr":
        from vlp.tasks.vcr import VCRTask

        return VCRTask(cfg, backbone, tokenizer, transform, root)
    if cfg.task == "retrieval":
        from vlp.tasks.retrieval import RetrievalTask

        return RetrievalTask(cfg, backbone, tokenizer, transform, root)
    raise ConfigError(f"task={cfg.task!r}: choose vqa, caption, vcr or retrieval")


def _ignore_signals(_worker_id: int) -> None:
    # the main process saves a checkpoint on SIGTERM/Ctrl-C; its loader workers must not die
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample indices for `epoch`: a seeded permutation, split round-robin, every
    rank the same length (the last n % world_size samples of the permutation wait an epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return perm[rank::world_size][:per_rank]


def _first_rows(batch, n: int):
    """The first n samples of a collated batch (tensors and lists sliced on their first
    dimension, nested dicts likewise)."""
    if isinstance(batch, dict):
        return {k: n if k == "batch_size" else _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (torch.Tensor, list, tuple)):
        return batch[:n]
    return batch


def finetune(cfg: FinetuneConfig, out_dir: str | Path, *, resume: str | None = None,
             progress: bool = True) -> dict:
    """Fine-tune `cfg.init_from` on `cfg.task`; writes checkpoints, OUT/model (loadable with
    vlp.load), the official results file and OUT/metrics.json (rank 0). Returns the metrics."""
    out_dir = Path(out_dir)
    t_start = time.time()
    if not cfg.init_from:
        raise ConfigError(f"init_from is empty: name a pretrained model directory, e.g. "
                          f"{PRETRAIN_HINT}")
    world = dist.init()
    main = world.is_main
    say = print if main else (lambda *a, **k: None)
    threads = dist.set_threads(world, cfg.train.threads)
    progress = progress and main
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.train.seed)  # the fresh head starts the same on every rank

    if world.local_rank == 0:
        root = benchmark_root(cfg, progress)
    dist.barrier()
    if world.local_rank != 0:
        root = benchmark_root(cfg, False)
    backbone, tokenizer, transform = Backbone.from_pretrained(cfg.init_from, cfg.fusion)
    task = build_task(cfg, backbone, tokenizer, transform, root)
    train_set = task.dataset("train")
    n_train = len(train_set)
    per_rank = n_train // world.size
    if per_rank == 0:
        raise ConfigError(f"the training split has {n_train} samples: fewer than the "
                          f"{world.size} processes")
    batches_per_epoch = math.ceil(per_rank / cfg.train.batch_size)
    if cfg.epochs:
        cfg.train.steps = max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.train.grad_accum))
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, cfg.train, world)
    if main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tokenizer.save(out_dir / "tokenizer.json")

    ckpt_root = out_dir / "checkpoints"
    log_path = out_dir / "train_log.jsonl"
    epoch, batch_in_epoch, samples_seen, bad_steps_total = 0, 0, 0, 0
    skipped = 0
    if resume:
        folder = checkpoint.resolve(ckpt_root if resume == "latest" else resume)
        if not (folder / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{folder} has no {TRAINER_STATE}: not a complete vlp "
                                    "checkpoint")
        state = json.loads((folder / TRAINER_STATE).read_text())
        if state["world_size"] != world.size:
            raise ConfigError(f"{folder} was written by {state['world_size']} processes; resume "
                              f"it with the same number (this launch has {world.size})")
        engine.load(folder)
        set_rng_state(torch.load(folder / f"rng_rank{world.rank:05d}.pt", weights_only=True))
        epoch, batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        samples_seen, bad_steps_total = state["samples_seen"], state["bad_steps"]
        skipped = state["skipped"]
        if main:
            truncate_log(log_path, engine.global_step)
        say(f"resumed from {folder} at step {engine.global_step} (epoch {epoch}, batch "
            f"{batch_in_epoch})")

    def loader(ep: int, start_batch: int):
        order = epoch_order(n_train, cfg.train.seed, ep, world.rank, world.size)
        subset = torch.utils.data.Subset(train_set, order[start_batch * cfg.train.batch_size:]
                                         .tolist())
        workers = cfg.data.num_workers
        return torch.utils.data.DataLoader(subset, batch_size=cfg.train.batch_size,
                                           shuffle=False, num_workers=workers,
                                           collate_fn=task.collate,
                                           worker_init_fn=_ignore_signals if workers else None)

    log = JsonlLog(log_path) if main else None
    tensorboard = TensorBoardLog(out_dir / "tensorboard") if main and cfg.logging.tensorboard \
        else None
    say(f"vlp finetune {cfg.task}: {backbone.architecture} backbone "
        f"({backbone.visual_tokens} visual tokens) from {cfg.init_from}, {n_params / 1e6:.2f}M "
        f"params, {n_train} training samples, {world.size} process"
        f"{'es' * (world.size > 1)} x {threads} thread{'s' * (threads > 1)}, batch "
        f"{cfg.train.batch_size}, {cfg.train.steps} steps (~"
        f"{cfg.train.steps * cfg.train.grad_accum / batches_per_epoch:.1f} epochs), "
        f"{cfg.train.precision}, out={out_dir}")

    def save(step: int) -> None:
        name = f"step_{step:08d}"
        if main:
            checkpoint.begin(ckpt_root, name)
        dist.barrier()
        tmp = ckpt_root / f"{name}.tmp"
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{world.rank:05d}.pt")
        total_skipped = int(sum(dist.all_gather_object(skipped, world)))
        if main:
            state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                     "samples_seen": samples_seen, "bad_steps": bad_steps_total,
                     "skipped": total_skipped // world.size, "world_size": world.size,
                     "task": cfg.task}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
            shutil.copy(out_dir / "tokenizer.json", tmp / "tokenizer.json")
        dist.barrier()
        if main:
            checkpoint.commit(ckpt_root, name, cfg.train.keep_checkpoints)
        dist.barrier()

    bar = tqdm(total=cfg.train.steps, initial=engine.global_step, desc=f"finetune {cfg.task}",
               unit="step", disable=not progress, dynamic_ncols=True)
    engine.module.train()
    consecutive_bad, last_saved, stopped_early = 0, -1, False
    step_losses, step_samples = [], 0
    step_metrics = [[] for _ in task.metric_names]
    t_train = time.time()
    it = iter(loader(epoch, batch_in_epoch))
    with _StopRequests() as stop:
        while engine.global_step < cfg.train.steps:
            batch = next(it, None)
            if batch is None:  # every rank has the same number of batches per epoch
                epoch, batch_in_epoch = epoch + 1, 0
                it = iter(loader(epoch, 0))
                continue
            batch_in_epoch += 1
            skipped += batch.pop("skipped", 0)
            n = batch["batch_size"]
            if world.size > 1:
                # unreadable images leave ranks with different batch sizes; cross-rank losses
                # (retrieval's all_gather) need equal ones: every rank keeps the smallest
                smallest = int(dist.all_gather_rows([n], world)[:, 0].min())
                if smallest < n:
                    batch, n = _first_rows(batch, smallest), smallest
            if n:
                loss, values = task.loss(engine, batch)
                loss_value = loss.item()
            else:  # every sample of this micro-batch was unreadable on this rank
                loss, values, loss_value = None, [float("nan")] * len(task.metric_names), 0.0
            rows = dist.all_gather_rows([loss_value, n, stop.requested, *values], world)
            if not bool(torch.isfinite(rows[:, 0]).all()) or int(rows[:, 1].min()) == 0:
                consecutive_bad += 1
                bad_steps_total += 1
                if log:
                    log.write({"step": engine.global_step + 1, "event": "skipped_batch",
                               "loss": [float(x) for x in rows[:, 0]],
                               "samples": [int(x) for x in rows[:, 1]]})
                if consecutive_bad >= cfg.train.max_bad_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive batches were unusable (NaN/inf loss or "
                        f"no readable sample) at step {engine.global_step + 1}; lower train.lr "
                        f"(now {cfg.train.lr}) or check the data. Checkpoints: {ckpt_root}")
                continue
            consecutive_bad = 0
            engine.backward(loss)
            step_losses.append(float(rows[:, 0].mean()))
            step_samples += int(rows[:, 1].sum())
            for i, column in enumerate(step_metrics):
                column.append(float(rows[:, 3 + i].nanmean()))
            stop_now = bool(rows[:, 2].any())
            if not engine.step():
                continue
            samples_seen += step_samples
            step = engine.global_step
            loss_mean = sum(step_losses) / len(step_losses)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{engine.lr:.2e}", epoch=epoch)
            if log and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                record = {"step": step, "loss": loss_mean, "lr": engine.lr, "epoch": epoch,
                          "samples_seen": samples_seen, "grad_norm": engine.grad_norm(),
                          "bad_steps": bad_steps_total,
                          **{k: sum(v) / len(v) for k, v in zip(task.metric_names,
                                                                 step_metrics)},
                          "time_s": round(time.time() - t_train, 3)}
                log.write(record)
                if tensorboard:
                    tensorboard.write(step, {f"train/{k}": v for k, v in record.items()})
            step_losses, step_samples = [], 0
            step_metrics = [[] for _ in task.metric_names]
            if stop_now:
                save(step)
                last_saved, stopped_early = step, True
                break
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                save(step)
                last_saved = step
    bar.close()
    if stopped_early:
        say(f"\nstopped: checkpoint saved at step {engine.global_step}; continue with "
            f"`vlp finetune {cfg.task} --out {out_dir} --resume latest` (same config)")
        raise KeyboardInterrupt
    if last_saved != engine.global_step:
        save(engine.global_step)
    skipped_total = int(sum(dist.all_gather_object(skipped, world)))
    metrics: dict = {"train_steps": engine.global_step, "train_samples": samples_seen,
                     "train_time_s": round(time.time() - t_train, 1),
                     "train_bad_steps": bad_steps_total, "train_skipped_samples": skipped_total,
                     "train_processes": world.size}
    if not main:
        return metrics
    weights = engine.consolidated_state_dict(ckpt_root / f"step_{engine.global_step:08d}")
    # a fresh module: DeepSpeed's ZeRO turned the trained one's parameters into views of its
    # flat buffers (safetensors refuses to save those)
    final = task.build_model(Backbone(backbone.spec, tokenizer.vocab_size))
    final.load_state_dict(weights)
    final.eval()
    device = engine.device
    folder = save_finetuned(out_dir / "model", task, final, tokenizer, transform)
    say(f"trained {engine.global_step} steps in {metrics['train_time_s']:.0f} s; skipped "
        f"samples: {skipped_total}; model: {folder}")
    metrics.update(task.evaluate(final.to(device), cfg.eval.split, out_dir, progress))
    metrics["total_time_s"] = round(time.time() - t_start, 1)
    log.write({"step": engine.global_step, "event": "end", **metrics})
    log.close()
    if tensorboard:
        tensorboard.write(engine.global_step, {f"eval/{k}": v for k, v in metrics.items()})
        tensorboard.close()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    say(f"metrics: {out_dir / 'metrics.json'}")
    return metrics


def evaluate_finetuned(model_dir: str | Path, out_dir: str | Path, *, data_root: str = "",
                       split: str = "", overrides: list[str] | None = None,
                       progress: bool = True) -> dict:
    """`vlp eval <task> --model DIR`: score a fine-tuned model directory on a benchmark split
    (the shapes world's unless data.root / the task's file keys say otherwise), writing the
    official results file into out_dir."""
    from safetensors.torch import load_model

    from vlp.config import load_config
    from vlp.data.transforms import ImageTransform
    from vlp.finetune.backbone import read_model_dir
    from vlp.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    config = read_model_dir(model_dir)
    if config.get("architecture") != "finetuned":
        raise ConfigError(f"{model_dir} is a {config.get('architecture')!r} model, not a "
                          "fine-tuned one (vlp finetune TASK writes OUT/model)")
    cfg = load_config(None, [f"task={config['task']}", *(overrides or [])], cls=FinetuneConfig)
    # the run's own task settings (beam size, lengths...) unless the command line overrides them
    block = getattr(cfg, config["task"])
    given = {o.split("=", 1)[0] for o in overrides or []}
    for key, value in config.get("head", {}).items():
        if hasattr(block, key) and f"{config['task']}.{key}" not in given:
            setattr(block, key, value)
    if data_root:
        cfg.data.root = data_root
    root = benchmark_root(cfg, progress)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    backbone = Backbone(config["backbone"], tokenizer.vocab_size)
    transform = ImageTransform.from_dict(config["transform"])
    task = build_task(cfg, backbone, tokenizer, transform, root, saved=model_dir)
    model = task.build_model()
    load_model(model, str(model_dir / "model.safetensors"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return task.evaluate(model.eval(), split or cfg.eval.split, out_dir, progress)
