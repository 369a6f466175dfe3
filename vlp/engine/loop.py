"""The one training loop: every pretraining recipe and every fine-tuning task runs through
`train(task, source, cfg, out_dir, world)`, one process or many.

    task.build_model() -> DeepSpeed engine (resumed from a checkpoint) -> per micro-batch:
    source.next() -> task.loss(engine, batch) -> backward -> step -> log / checkpoint /
    evaluate -> final checkpoint -> consolidated fp32 weights -> task.save_model (OUT/model)
    -> task.evaluate -> OUT/metrics.json

Per micro-batch the ranks exchange two small rows: [has a batch, its size], so that when one
rank's epoch is over all start the next (uneven shards must not leave a rank waiting in a
collective) and cross-rank losses see equal batch sizes; then [loss, samples, stop request,
batch digest, the task's metrics], so that they agree without further communication on
skipping a step whose loss is NaN/inf on any rank and on stopping at the same step on
SIGTERM/Ctrl-C. With `train.contrastive_accum=K` the loss is that of K micro-batches at once
(GradCache, vlp/engine/gradcache.py): the second row is exchanged once per K, and the K
micro-batches go through the engine as K micro-steps. A checkpoint holds DeepSpeed's files,
each rank's RNG state and data position, and the trainer state, published by an atomic rename
(vlp/engine/checkpoint.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlp.config import ConfigError, read_yaml, resume_changes, to_dict
from vlp.data.pipeline import accumulate, format_skips, skipped_samples
from vlp.data.sources import DataSource
from vlp.engine import checkpoint, dist, gradcache, safe_load
from vlp.engine.engine import Engine, rng_state, set_rng_state
from vlp.engine.logs import JsonlLog, TensorBoardLog, truncate_log
from vlp.engine.task import Task
from vlp.models.device import eval_autocast

TRAINER_STATE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """`train.max_bad_steps` consecutive batches had a NaN/inf loss."""


class StopRequests:
    """SIGTERM (schedulers, `kill`, launchers) and a first Ctrl-C ask for a checkpoint and a
    clean stop at the next optimizer step that all ranks agree on; a second Ctrl-C stops now.

    `watch_parent` (a launched rank): the launcher dying asks for the same stop. torchrun puts
    every rank in a session of its own, so `kill -- -PGID` of the launcher reaches the launcher
    only, and the orphaned ranks would go on training (and race a `--resume` started
    meanwhile). If the stop cannot complete within `grace_s` (another rank is gone too, and a
    collective waits for it), the process exits."""

    def __init__(self, watch_parent: bool = False, grace_s: float = 120.0):
        self.requested = False
        self._previous = {}
        self._watch, self._grace = watch_parent, grace_s
        self._done = threading.Event()

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self._watch:
            threading.Thread(target=self._watch_parent, args=(os.getppid(),), daemon=True,
                             name="vlp-parent-watch").start()
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def _watch_parent(self, parent: int) -> None:
        while not self._done.wait(0.5):
            if os.getppid() != parent:
                print(f"vlp: the launcher (pid {parent}) is gone: saving a checkpoint and "
                      "stopping", file=sys.stderr, flush=True)
                self.requested = True
                if not self._done.wait(self._grace):
                    os._exit(143)  # the stop could not complete: do not train on, orphaned
                return

    def __exit__(self, *exc):
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunLock:
    """OUT/.lock, held by rank 0 while a run uses OUT (an OS file lock: released when the
    process ends, however it ends). A second run on the same OUT is refused while it is held,
    so a `--resume` cannot race ranks that are still training."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise ConfigError(f"{out_dir} is in use by another run ({holder}; {self.path}): "
                              "wait for it to end or stop it (kill -TERM -- -PGID of its "
                              "launcher), or use another --out") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (same initial weights on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_digest(keys: list[str]) -> int:
    """52 bits of a hash of the batch's keys: exact in a float64, for the per-step exchange."""
    return int.from_bytes(hashlib.sha1("\n".join(keys).encode()).digest()[:8], "little") >> 12


def resolve_resume(out_dir: Path, resume: str | None) -> Path | None:
    """--resume: 'latest' (OUT/checkpoints' pointer) or a checkpoint folder -> the folder,
    checked to be a complete vlp checkpoint; None without --resume."""
    if not resume:
        return None
    folder = checkpoint.resolve(Path(out_dir) / "checkpoints" if resume == "latest" else resume)
    if not (folder / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{folder} has no {TRAINER_STATE}: not a complete vlp "
                                "checkpoint (or one written by an older vlp)")
    return folder


def saved_config_path(out_dir: str | Path, resume: str | None) -> Path | None:
    """The config.yaml of the run `--resume` continues: the checkpoint's own copy, else the
    run folder's (checkpoints written before the copy existed); None without --resume or
    when neither exists."""
    folder = resolve_resume(out_dir, resume)
    if folder is None:
        return None
    for path in (folder / "config.yaml", Path(out_dir) / "config.yaml"):
        if path.is_file():
            return path
    return None


def check_resumed_config(cfg, out_dir: Path, resume_from: Path | None, say) -> None:
    """A resumed run's (resolved) config against the one its checkpoint was written with: a
    change a resumed run cannot take is refused by name, the others are logged."""
    if resume_from is None:
        return
    path = saved_config_path(out_dir, str(resume_from))
    if path is None:
        return
    for change in resume_changes(read_yaml(path), to_dict(cfg), str(path)):
        say(f"resume: {change}")


def total_skips(skipped: dict, world: dist.World) -> dict:
    """Skip counts summed over ranks (each rank reads, and counts, its own data)."""
    total: dict[str, int] = {}
    for counts in dist.all_gather_object(dict(skipped), world):
        accumulate(total, counts)
    return total


def restore_checkpoint(engine: Engine, source: DataSource, state: dict, folder: Path,
                       world: dist.World, seed: int) -> str:
    """Restore the engine, RNG states, skip counts and data position of checkpoint `folder`
    (`state`: its trainer state). On the number of processes that wrote it, each rank takes
    its own; on another (elastic resume), the ZeRO partitions are re-sharded
    (checkpoint.load_resharded), the data's unread rest of the epoch is re-dealt
    (`source.resume`), each rank's generators are seeded anew from (train.seed, step, rank)
    and rank 0 carries all the skip counts. Returns the rest of the one resume line: the step,
    and what changed."""
    saved = state["world_size"]
    note = source.resume(state["data"], world.rank, world.size)  # refuses before any loading
    if saved == world.size:
        engine.load(folder)
        set_rng_state(safe_load.load(folder / f"rng_rank{world.rank:05d}.pt"))
        source.skipped.update(state["skipped"][world.rank])
        return f"{engine.global_step}" + (f"; {note}" if note else "")
    done = checkpoint.load_resharded(engine, folder, saved, world)
    # the old ranks' streams belong to ranks that are gone (or renumbered): fresh, distinct
    # ones, not a replay of the run's first steps
    dist.seed_for_rank(dist.rank_seed(seed, engine.global_step), world.rank)
    if world.is_main:
        for counts in state["skipped"]:
            accumulate(source.skipped, counts)
    return (f"{engine.global_step}: {saved} -> {world.size} processes; {done}; {note}; random "
            "generators re-seeded from (train.seed, step, rank)")


def train(task: Task, source: DataSource, cfg, out_dir: str | Path, world: dist.World, *,
          resume_from: Path | None = None, progress: bool = True, command: str = "train",
          started: float | None = None) -> dict:
    """Train `task` on `source` (all processes of a launch call this) for `cfg.train.steps`
    optimizer steps: checkpoints in OUT/checkpoints, the log in OUT/train_log.jsonl, the model
    directory in OUT/model and the evaluation in OUT/metrics.json (rank 0). `cfg`: a run
    config with `train`, `logging` and `eval` (`every`, `at_end`) blocks, already resolved
    (what OUT/config.yaml says). Returns the metrics."""
    out_dir = Path(out_dir)
    started = started or time.time()
    main = world.is_main
    say = print if main else (lambda *a, **k: None)
    t = cfg.train
    best_metric = getattr(cfg.eval, "best_metric", "")  # fine-tuning keeps its best weights
    if best_metric and task.eval_metrics and best_metric not in task.eval_metrics:
        raise ConfigError(f"eval.best_metric={best_metric!r} is not a metric of {task.name}'s "
                          f"evaluation; choose one of {list(task.eval_metrics)}")
    accum = t.contrastive_accum  # micro-batches per contrastive batch (GradCache)
    if accum > 1 and not gradcache.supports(task):
        raise ConfigError(f"train.contrastive_accum={accum}: {task.name} has no contrastive "
                          "loss to split (recipe=dual_tower has); use train.grad_accum")
    seed_everything(t.seed)  # the same initial weights (and fresh heads) on every rank
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    # DeepSpeed counts micro-steps: K per contrastive batch, grad_accum contrastive batches
    engine = Engine(model, replace(t, grad_accum=t.grad_accum * accum), world)
    # from here on each rank draws its own masks, pairs and dropout (the weights above are
    # the same everywhere); a resume restores the saved states over these
    dist.seed_for_rank(t.seed, world.rank)
    ckpt_root, log_path = out_dir / "checkpoints", out_dir / "train_log.jsonl"
    samples_seen, bad_steps_total = 0, 0
    best = {"metric": best_metric, "value": None, "step": None}
    shown: dict[str, str] = {}  # the latest evaluation, on the progress bar
    if resume_from:
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        samples_seen, bad_steps_total = state["samples_seen"], state["bad_steps"]
        if state.get("best", {}).get("metric") == best_metric:
            best = state["best"]  # the best so far, and OUT/model holds it
        where = restore_checkpoint(engine, source, state, resume_from, world, t.seed)
        if main:
            truncate_log(log_path, engine.global_step)
        say(f"resumed from {resume_from} at step {where}")
    log = JsonlLog(log_path) if main else None
    tensorboard = TensorBoardLog(out_dir / "tensorboard") if main and cfg.logging.tensorboard \
        else None
    threads = torch.get_num_threads()
    plural = "es" if world.size > 1 else ""
    data = source.describe()
    say(f"vlp {command}: {task.describe()}, {n_params / 1e6:.2f}M params, {world.size} process"
        f"{plural} x {threads} thread{'s' * (threads > 1)}, ZeRO-{engine.zero_stage}"
        f"{', ' + data if data else ''}, batch {t.batch_size} x {world.size} process{plural} x "
        f"{t.grad_accum} accumulation"
        f"{f' x {accum} contrastive accumulation (GradCache)' if accum > 1 else ''}, "
        f"{t.steps} steps, {t.precision}, out={out_dir}")

    def save(step: int) -> None:
        """All ranks: DeepSpeed's files, each rank's RNG state; rank 0: the trainer state with
        every rank's data position, then the atomic publish."""
        name = f"step_{step:08d}"
        if main:
            checkpoint.begin(ckpt_root, name)
        dist.barrier()
        tmp = ckpt_root / f"{name}.tmp"
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{world.rank:05d}.pt")
        positions = dist.all_gather_object(source.state(), world)
        skips = dist.all_gather_object(dict(source.skipped), world)
        if main:
            for file in ("tokenizer.json", "config.yaml"):  # resumable from the folder alone
                if (out_dir / file).is_file():
                    shutil.copy(out_dir / file, tmp / file)
            state = {"step": step, "task": task.name, "samples_seen": samples_seen,
                     "skipped": skips, "bad_steps": bad_steps_total, "epoch": source.epoch,
                     "world_size": world.size, "data": positions, "best": best}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        dist.barrier()
        if main:
            checkpoint.commit(ckpt_root, name, t.keep_checkpoints)
        dist.barrier()

    def keep_if_best(model, metrics: dict, step: int) -> None:
        """eval.best_metric: `model` becomes OUT/model when it scores best so far."""
        nonlocal best
        if not best_metric:
            return
        if best_metric not in metrics:
            raise ConfigError(f"eval.best_metric={best_metric!r} is not a metric of this "
                              f"evaluation; it reports {sorted(metrics)}")
        value = float(metrics[best_metric])
        if best["value"] is None or value > best["value"]:
            task.save_model(model, out_dir / "model")
            best = {"metric": best_metric, "value": value, "step": step}
            log.write({"step": step, "event": "best", best_metric: value})

    def evaluate(step: int) -> None:
        """`eval.every`: the live weights (gathered across ranks under ZeRO-3) evaluated on
        rank 0 while the others wait, on at most eval.max_samples of pretraining's data.val
        (a benchmark's whole split); the best so far kept with eval.best_metric."""
        weights = engine.full_state_dict()  # a collective under ZeRO-3
        if main:
            model = task.build_model(pretrained=False)
            model.load_state_dict(weights)
            with eval_autocast(engine.device):
                metrics = task.evaluate(model.eval().to(engine.device), out_dir, False,
                                        max_samples=getattr(cfg.eval, "max_samples", 0))
            log.write({"step": step, "event": "eval", **metrics})
            if tensorboard:
                tensorboard.write(step, {f"eval/{k}": v for k, v in metrics.items()})
            keep_if_best(model, metrics, step)
            key = best_metric or next((k for k, v in metrics.items()
                                       if isinstance(v, float)), None)
            shown.clear()
            if key:
                shown[key] = f"{metrics[key]:.2f}"
        dist.barrier()
        engine.module.train()

    bar = tqdm(total=t.steps, initial=engine.global_step, desc=command, unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    engine.module.train()
    consecutive_bad, rate, last_saved, stopped_early = 0, None, -1, False
    t_train = t_last = time.time()
    step_losses: list[float] = []
    step_samples, step_digest = 0, hashlib.sha1()
    step_metrics: list[list[float]] = [[] for _ in task.metric_names]
    group: list = []  # contrastive_accum: the micro-batches of one contrastive batch so far
    with StopRequests(watch_parent=world.launched) as stop:
        while engine.global_step < t.steps:
            batch = source.next()
            sizes = dist.all_gather_rows([batch is not None, len(batch) if batch else 0], world)
            if not bool(sizes[:, 0].all()):  # some rank's epoch is over: everyone's is
                source.new_epoch()
                continue
            smallest = int(sizes[:, 1].min())
            if smallest < len(batch):  # unreadable samples left this rank's batch larger
                batch = batch.first(smallest)
            cached = None
            if accum > 1:
                group.append(batch)
                if len(group) < accum:
                    continue  # the contrastive batch needs more micro-batches
                cached = gradcache.CachedStep(task, engine, group)  # no graphs but the loss's
                loss, values = cached.loss, cached.values
                samples, keys = sum(len(b) for b in group), [k for b in group for k in b.keys]
                group = []
            else:
                loss, values = task.loss(engine, batch)
                samples, keys = len(batch), batch.keys
            rows = dist.all_gather_rows([loss.item(), samples, stop.requested, batch_digest(keys),
                                         *values], world)
            if not bool(torch.isfinite(rows[:, 0]).all()):
                consecutive_bad += 1
                bad_steps_total += 1
                if log:
                    log.write({"step": engine.global_step + 1, "event": "non_finite_loss",
                               "loss": [float(x) for x in rows[:, 0]]})
                if consecutive_bad >= t.max_bad_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"loss was NaN/inf for {consecutive_bad} consecutive batches at step "
                        f"{engine.global_step + 1}; lower train.lr (now {t.lr}) or check "
                        f"the data. The last good checkpoint is in {ckpt_root}.")
                continue  # no backward: the batch is dropped, the step takes the next one
            consecutive_bad = 0
            if cached is not None:
                boundary = cached.backward()  # K micro-steps
            else:
                engine.backward(loss)
                boundary = engine.step()
            step_losses.append(float(rows[:, 0].mean()))
            step_samples += int(rows[:, 1].sum())
            step_digest.update(rows[:, 3].numpy().tobytes())
            for i, column in enumerate(step_metrics):  # averaged over processes
                column.append(float(rows[:, 4 + i].nanmean()))
            stop_now = bool(rows[:, 2].any())
            if not boundary:
                continue  # more micro-batches to accumulate
            samples_seen += step_samples
            step = engine.global_step
            now = time.time()
            inst = step_samples / max(now - t_last, 1e-9)
            rate = inst if rate is None else 0.9 * rate + 0.1 * inst
            t_last = now
            loss_value = sum(step_losses) / len(step_losses)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{engine.lr:.2e}",
                            samples_s=f"{rate:.0f}", **shown)
            log_step = step % t.log_every == 0 or step == t.steps
            if log_step:
                all_skipped = total_skips(source.skipped, world)  # a collective: every rank
            if log and log_step:
                record = {"step": step, "loss": loss_value, "lr": engine.lr,
                          "samples_per_s": rate, "samples_seen": samples_seen,
                          "epoch": source.epoch_progress(samples_seen),
                          **{name: sum(v) / len(v) for name, v in
                             zip(task.metric_names, step_metrics)},
                          "grad_norm": engine.grad_norm(),
                          "skipped": all_skipped, "bad_steps": bad_steps_total,
                          "fp16_overflow_steps": engine.overflow_steps,
                          "data_digest": step_digest.hexdigest()[:16],
                          "time_s": round(now - t_train, 3)}
                log.write(record)
                if tensorboard:
                    tensorboard.write(step, {f"train/{k}": v for k, v in record.items()})
            step_losses, step_samples, step_digest = [], 0, hashlib.sha1()
            step_metrics = [[] for _ in task.metric_names]
            if stop_now:
                save(step)
                last_saved, stopped_early = step, True
                break
            if t.save_every and step % t.save_every == 0:
                save(step)
                last_saved = step
            if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
                evaluate(step)
    bar.close()
    if stopped_early:
        say(f"\nstopped: checkpoint saved at step {engine.global_step}; continue with "
            f"`vlp {command} --out {out_dir} --resume latest` (same config; pretraining may "
            "change the number of processes or data.num_workers)")
        raise KeyboardInterrupt
    if last_saved != engine.global_step:
        save(engine.global_step)
    skipped = total_skips(source.skipped, world)
    metrics: dict = {"train_steps": engine.global_step, "train_samples": samples_seen,
                     "train_time_s": round(time.time() - t_train, 1),
                     "train_bad_steps": bad_steps_total,
                     "train_skipped_samples": skipped_samples(skipped),
                     "train_processes": world.size}
    metrics.update({f"train_skipped_{k}": v for k, v in sorted(skipped.items())})
    if not main:
        return metrics

    # The model directory: full fp32 weights, merged from ZeRO partitions when there are any,
    # in a fresh module.
    weights = engine.consolidated_state_dict(ckpt_root / f"step_{engine.global_step:08d}")
    say(f"trained {engine.global_step} steps, {samples_seen} samples in "
        f"{metrics['train_time_s']:.0f} s; skipped samples: {format_skips(skipped)}")
    final = task.build_model(pretrained=False)
    final.load_state_dict(weights)
    final.eval()
    # with eval.best_metric, OUT/model is the best evaluated weights and these the last
    folder = task.save_model(final, out_dir / ("model-last" if best_metric else "model"))
    step, device = engine.global_step, engine.device
    engine.release()  # the optimizer state and the engine's copy of the model: before evaluating
    if cfg.eval.at_end:
        with eval_autocast(device):
            metrics.update(task.evaluate(final.to(device), out_dir, progress))
        keep_if_best(final, metrics, step)
    if best_metric:
        # the end-of-run evaluation came after the last checkpoint: a run resumed from it (to
        # train longer) must know this best too
        state_file = ckpt_root / f"step_{step:08d}" / TRAINER_STATE
        state = json.loads(state_file.read_text())
        if state.get("best") != best:
            state["best"] = best
            tmp = state_file.with_name(TRAINER_STATE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1) + "\n")
            os.replace(tmp, state_file)
        if best["value"] is None:  # nothing evaluated: the last weights are all there is
            task.save_model(final, out_dir / "model")
        metrics.update({"best_step": best["step"], f"best_{best_metric}": best["value"]})
        folder = out_dir / "model"
        say(f"best {best_metric}: {best['value']} at step {best['step']} (OUT/model); the last "
            f"weights: {out_dir / 'model-last'}")
    metrics["total_time_s"] = round(time.time() - started, 1)
    log.write({"step": step, "event": "end", **metrics})
    log.close()
    if tensorboard:
        tensorboard.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        tensorboard.close()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    say(f"model: {folder}  metrics: {out_dir / 'metrics.json'}")
    return metrics
