"""The one train loop: `pretrain(cfg, out_dir)`, the same for one process or many.

    shards -> this rank's Batches -> DeepSpeed engine (forward, loss over all ranks' features,
    backward, step) -> log / checkpoint -> consolidated model directory -> evaluation

Per micro-batch the ranks exchange one small row each (loss, samples, a stop request, a digest
of the batch keys) so that they agree, without further communication, on: skipping a step whose
loss is NaN/inf on any rank, ending an epoch when any rank runs out of data (uneven shards must
not leave one rank waiting in a collective), and stopping at the same step on SIGTERM/Ctrl-C.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vlp.config import ConfigError, PretrainConfig, to_dict
from vlp.data.pipeline import StreamPosition, accumulate, format_skips, make_loader, \
    skipped_samples
from vlp.data.shards import check_shards_vs_workers, count_samples, expand_urls
from vlp.data.transforms import ImageTransform
from vlp.engine import checkpoint, dist
from vlp.engine.engine import Engine, rng_state, set_rng_state
from vlp.engine.setup import build_tokenizer, resolve_data, tokenizer_cache
from vlp.recipes import build_recipe
from vlp.tokenizer import load_tokenizer

TRAINER_STATE = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    pass


class JsonlLog:
    """Append-only JSON-lines metrics log, flushed per record so a killed run keeps it."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._fh.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step`: a resumed run redoes those steps, and a log with two
    different step 7s would be wrong to plot."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= step and record.get("event") != "end":
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class TensorBoardLog:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def write(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RankStream:
    """This rank's batches, epoch after epoch, with the position of every loader worker so a
    resumed run continues mid-epoch exactly where the checkpoint was taken."""

    def __init__(self, make_loader_for, skipped: dict, epoch: int = 0,
                 start: dict | None = None):
        self._make, self.skipped = make_loader_for, skipped
        self._open(epoch, start)

    def _open(self, epoch: int, start: dict | None) -> None:
        self.epoch = epoch
        try:
            loader = self._make(epoch, start)
        except ValueError as e:  # a saved data position that does not fit this run's data
            if start is None:
                raise
            raise ConfigError(f"cannot continue the checkpoint's data stream: {e}. Resume with "
                              "the data settings the checkpoint was written with.") from None
        self.position = StreamPosition.for_loader(loader)  # continues `start` when resuming
        self.batches_this_epoch = 0
        self._it = iter(loader)

    def next(self):
        """The next non-empty Batch of this epoch, or None when this rank's epoch is over."""
        for batch in self._it:
            accumulate(self.skipped, batch.skipped)
            self.position.update(batch)
            if len(batch):
                self.batches_this_epoch += 1
                return batch
        return None

    def new_epoch(self) -> None:
        if self.batches_this_epoch == 0:
            raise RuntimeError("a whole epoch produced no usable batch on this process; skipped "
                               f"so far: {format_skips(self.skipped)}. Check data.train and "
                               "train.batch_size (larger than the data per process?).")
        self._open(self.epoch + 1, None)

    def state(self) -> dict:
        return self.position.state_dict()


def _total_skips(skipped: dict, world) -> dict:
    """Skip counts summed over ranks (each rank reads, and counts, its own shards)."""
    total: dict[str, int] = {}
    for counts in dist.all_gather_object(dict(skipped), world):
        accumulate(total, counts)
    return total


def _digest(keys: list[str]) -> int:
    """52 bits of a hash of the batch's keys: exact in a float64, for the per-step exchange."""
    return int.from_bytes(hashlib.sha1("\n".join(keys).encode()).digest()[:8], "little") >> 12


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_logging(cfg: PretrainConfig) -> None:
    import importlib.util

    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard (or set logging.tensorboard=false)")


class _StopRequests:
    """SIGTERM (schedulers, `kill`, launchers) and a first Ctrl-C ask for a checkpoint and a
    clean stop at the next optimizer step that all ranks agree on; a second Ctrl-C stops now."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: str | None = None,
             progress: bool = True) -> dict:
    """Train `cfg.recipe`'s model (vlp/recipes) on this process's share of the data (all
    processes of a launch call this), write checkpoints, the model directory (`OUT/model`) and evaluation
    metrics (`OUT/metrics.json`, rank 0). Returns the metrics."""
    out_dir = Path(out_dir)
    t_start = time.time()
    _check_logging(cfg)
    if cfg.recipe == "single_stream":
        from vlp.recipes.single_stream import adopt_bert_shape

        adopted = adopt_bert_shape(cfg)  # before anything is built from the config
    world = dist.init()
    main = world.is_main
    say = print if main else (lambda *a, **k: None)
    threads = dist.set_threads(world, cfg.train.threads)
    if cfg.recipe == "single_stream" and adopted:
        say(f"model.init_text_from: taking the BERT folder's {', '.join(adopted)}")
    progress = progress and main
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.train.seed)  # same initial weights on every rank

    # Shapes world and tokenizer: made once (per node / by rank 0), read by all.
    if world.local_rank == 0:
        train_spec, val_spec = resolve_data(cfg.data, progress=progress)
    dist.barrier()
    if world.local_rank != 0:
        train_spec, val_spec = resolve_data(cfg.data, progress=False)
    urls = expand_urls(train_spec)
    if not cfg.data.resampled:
        check_shards_vs_workers(len(urls), world.size, cfg.data.num_workers)
    n_train = count_samples(urls)
    saved_tokenizer = out_dir / "tokenizer.json"
    resume_from = checkpoint.resolve(out_dir / "checkpoints" if resume == "latest" else resume) \
        if resume else None
    if resume_from and not (resume_from / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{resume_from} has no {TRAINER_STATE}: not a complete vlp "
                                "checkpoint (or one written by an older vlp)")
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

    recipe = build_recipe(cfg, tokenizer, urls, world.size)
    model = recipe.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, cfg.train, world)
    ckpt_root = out_dir / "checkpoints"
    log_path = out_dir / "train_log.jsonl"

    skipped: dict[str, int] = {}
    samples_seen, bad_steps_total, epoch, data_start = 0, 0, 0, None
    if resume_from:
        folder = resume_from
        state = json.loads((folder / TRAINER_STATE).read_text())
        if state["world_size"] != world.size:
            raise ConfigError(f"{folder} was written by {state['world_size']} processes; resume "
                              f"it with the same number (this launch has {world.size})")
        engine.load(folder)
        set_rng_state(torch.load(folder / f"rng_rank{world.rank:05d}.pt", weights_only=True))
        samples_seen, skipped = state["samples_seen"], dict(state["skipped"][world.rank])
        bad_steps_total, epoch = state["bad_steps"], state["epoch"]
        data_start = state["data"][world.rank]
        if main:
            truncate_log(log_path, engine.global_step)
        say(f"resumed from {folder} at step {engine.global_step}")

    train_tf = ImageTransform(cfg.model.vision.image_size, train=True)

    def loader_for(ep: int, start: dict | None):
        return make_loader(urls, tokenizer=tokenizer, transform=train_tf,
                           batch_size=cfg.train.batch_size,
                           context_length=cfg.model.text.context_length,
                           num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                           seed=cfg.train.seed, rank=world.rank, world_size=world.size,
                           resampled=cfg.data.resampled, caption=cfg.data.caption, epoch=ep,
                           start=start, **recipe.loader_kwargs())

    stream = RankStream(loader_for, skipped, epoch=epoch, start=data_start)
    log = JsonlLog(log_path) if main else None
    tensorboard = TensorBoardLog(out_dir / "tensorboard") if main and cfg.logging.tensorboard \
        else None
    say(f"vlp pretrain: {cfg.recipe}, {n_params / 1e6:.2f}M params, {world.size} process"
        f"{'es' * (world.size > 1)} x {threads} thread{'s' * (threads > 1)}, ZeRO-"
        f"{engine.zero_stage}, {len(urls)} train shards"
        f"{f', {n_train} samples' if n_train else ''}, batch {cfg.train.batch_size} x "
        f"{world.size} process{'es' * (world.size > 1)} x {cfg.train.grad_accum} accumulation, "
        f"{cfg.train.steps} steps, {cfg.train.precision}, out={out_dir}")

    def save(step: int) -> None:
        """All ranks: DeepSpeed's files, each rank's RNG state; rank 0: the trainer state with
        every rank's data position, then the atomic publish."""
        name = f"step_{step:08d}"
        if main:
            tmp = checkpoint.begin(ckpt_root, name)
        dist.barrier()
        tmp = ckpt_root / f"{name}.tmp"
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{world.rank:05d}.pt")
        data = dist.all_gather_object(stream.state(), world)
        skips = dist.all_gather_object(dict(skipped), world)
        if main:
            shutil.copy(saved_tokenizer, tmp / "tokenizer.json")  # resumable from any folder
            state = {"step": step, "samples_seen": samples_seen, "skipped": skips,
                     "bad_steps": bad_steps_total, "epoch": stream.epoch,
                     "world_size": world.size, "data": data}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        dist.barrier()
        if main:
            checkpoint.commit(ckpt_root, name, cfg.train.keep_checkpoints)
        dist.barrier()

    bar = tqdm(total=cfg.train.steps, initial=engine.global_step, desc="pretrain", unit="step",
               disable=not progress, dynamic_ncols=True)
    engine.module.train()
    consecutive_bad, rate, last_saved = 0, None, -1
    t_train = t_last = time.time()
    step_losses: list[float] = []
    step_samples, step_digest = 0, hashlib.sha1()
    step_metrics = [[] for _ in recipe.metric_names]
    stopped_early = False
    with _StopRequests() as stop:
        while engine.global_step < cfg.train.steps:
            batch = stream.next()
            if not cfg.data.resampled:
                have = dist.all_gather_rows([batch is not None], world)[:, 0]
                if not bool(have.all()):  # some rank's epoch is over: everyone's is
                    stream.new_epoch()
                    continue
            elif batch is None:  # a resampled stream is endless; only a crash ends it
                raise RuntimeError("the resampled data stream ended unexpectedly")
            loss, values = recipe.loss(engine, batch)
            rows = dist.all_gather_rows([loss.item(), len(batch), stop.requested,
                                         _digest(batch.keys), *values], world)
            if not bool(torch.isfinite(rows[:, 0]).all()):
                consecutive_bad += 1
                bad_steps_total += 1
                if log:
                    log.write({"step": engine.global_step + 1, "event": "non_finite_loss",
                               "loss": [float(x) for x in rows[:, 0]]})
                if consecutive_bad >= cfg.train.max_bad_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"loss was NaN/inf for {consecutive_bad} consecutive batches at step "
                        f"{engine.global_step + 1}; lower train.lr (now {cfg.train.lr}) or check "
                        f"the data. The last good checkpoint is in {ckpt_root}.")
                continue  # no backward: the batch is dropped, the step takes the next one
            consecutive_bad = 0
            engine.backward(loss)
            step_losses.append(float(rows[:, 0].mean()))
            step_samples += int(rows[:, 1].sum())
            step_digest.update(rows[:, 3].numpy().tobytes())
            for i, column in enumerate(step_metrics):  # averaged over processes
                column.append(float(rows[:, 4 + i].nanmean()))
            stop_now = bool(rows[:, 2].any())
            if not engine.step():
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
                            samples_s=f"{rate:.0f}")
            log_step = step % cfg.train.log_every == 0 or step == cfg.train.steps
            if log_step:
                all_skipped = _total_skips(skipped, world)  # a collective: every rank
            if log and log_step:
                record = {"step": step, "loss": loss_value, "lr": engine.lr,
                          "samples_per_s": rate, "samples_seen": samples_seen,
                          "epoch": stream.epoch if not cfg.data.resampled or not n_train
                          else samples_seen / n_train,
                          **{name: sum(v) / len(v) for name, v in
                             zip(recipe.metric_names, step_metrics)},
                          "grad_norm": engine.grad_norm(),
                          "skipped": all_skipped, "bad_steps": bad_steps_total,
                          "fp16_overflow_steps": engine.overflow_steps,
                          "data_digest": step_digest.hexdigest()[:16],
                          "time_s": round(now - t_train, 3)}
                log.write(record)
                if tensorboard:
                    tensorboard.write(step, {f"train/{k}": v for k, v in record.items()})
            step_losses, step_samples, step_digest = [], 0, hashlib.sha1()
            step_metrics = [[] for _ in recipe.metric_names]
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
            f"`vlp pretrain --out {out_dir} --resume latest` (same config and process count)")
        raise KeyboardInterrupt
    if last_saved != engine.global_step:
        save(engine.global_step)
    train_time = time.time() - t_start
    skipped = _total_skips(skipped, world)
    metrics: dict = {"train_steps": engine.global_step, "train_samples": samples_seen,
                     "train_time_s": round(train_time, 1), "train_bad_steps": bad_steps_total,
                     "train_skipped_samples": skipped_samples(skipped),
                     "train_processes": world.size}
    metrics.update({f"train_skipped_{k}": v for k, v in sorted(skipped.items())})
    if not main:
        return metrics

    # The model directory: full fp32 weights, merged from ZeRO partitions when there are any.
    weights = engine.consolidated_state_dict(ckpt_root / f"step_{engine.global_step:08d}")
    say(f"trained {engine.global_step} steps, {samples_seen} samples in {train_time:.0f} s; "
        f"skipped samples: {format_skips(skipped)}")
    metrics.update(recipe.finish(weights, out_dir, val_spec, progress))
    metrics["total_time_s"] = round(time.time() - t_start, 1)
    log.write({"step": engine.global_step, "event": "end", **metrics})
    log.close()
    if tensorboard:
        tensorboard.write(engine.global_step, {f"eval/{k}": v for k, v in metrics.items()})
        tensorboard.close()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    say(f"model: {out_dir / 'model'}  metrics: {out_dir / 'metrics.json'}")
    return metrics
