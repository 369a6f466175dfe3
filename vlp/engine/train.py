"""The one train loop: `pretrain(cfg, out_dir)`.

data (shards -> Batch) -> model -> loss -> engine (backward, step) -> log / checkpoint, then
the model directory and the retrieval evaluation. Recipes differ only in their config.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from vlp.api import Pretrained
from vlp.config import PretrainConfig, to_dict
from vlp.data.pipeline import accumulate, format_skips, make_loader, skipped_samples
from vlp.data.shards import check_shards_vs_workers, count_samples, expand_urls
from vlp.data.transforms import ImageTransform
from vlp.engine import checkpoint
from vlp.engine.engine import TorchEngine
from vlp.engine.setup import resolve_data, build_tokenizer
from vlp.models import DualTower
from vlp.objectives import clip_loss
from vlp.tokenizer import load_tokenizer


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


class _Stream:
    """Endless iterator over training batches: restarts the loader each epoch (new shuffle
    seed), folds in the skip counts that workers report, and never yields an empty batch."""

    def __init__(self, make, skipped: dict, epoch: int = 0):
        self._make, self.skipped, self.epoch = make, skipped, epoch
        self._it = iter(self._make(self.epoch))

    def __next__(self):
        empty_epochs = 0
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch += 1
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError("a whole epoch produced no usable batch; skipped so far: "
                                       f"{format_skips(self.skipped)}. Check data.train and "
                                       "train.batch_size (larger than the data?).") from None
                self._it = iter(self._make(self.epoch))
                continue
            accumulate(self.skipped, batch.skipped)
            if len(batch):
                return batch


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: str | None = None,
             progress: bool = True) -> dict:
    """Train a dual tower per `cfg`, write checkpoints, the model directory (`OUT/model`) and
    evaluation metrics (`OUT/metrics.json`). Returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    _seed_everything(cfg.train.seed)

    train_spec, val_spec = resolve_data(cfg.data, progress=progress)
    urls = expand_urls(train_spec)
    if not cfg.data.resampled:
        check_shards_vs_workers(len(urls), 1, cfg.data.num_workers)
    n_train = count_samples(urls)
    saved_tokenizer = out_dir / "tokenizer.json"
    if resume and not cfg.tokenizer.path and saved_tokenizer.is_file():
        tokenizer = load_tokenizer(saved_tokenizer)  # the vocabulary the checkpoint was trained on
    else:
        tokenizer = build_tokenizer(cfg.tokenizer, urls, saved_tokenizer)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model = DualTower(cfg.model, tokenizer.vocab_size)
    engine = TorchEngine(model, cfg.train)
    ckpt_root = out_dir / "checkpoints"
    skipped: dict[str, int] = {}
    samples_seen, bad_steps_total, start_epoch = 0, 0, 0
    if resume:
        folder = checkpoint.resolve(ckpt_root if resume == "latest" else resume)
        client = engine.load_checkpoint(folder)
        samples_seen, skipped = client["samples_seen"], dict(client["skipped"])
        bad_steps_total = client.get("bad_steps", 0)
        start_epoch = client.get("epoch", 0) + 1
        print(f"resumed from {folder} at step {engine.global_step}")

    train_tf = ImageTransform(cfg.model.vision.image_size, train=True)
    eval_tf = ImageTransform(cfg.model.vision.image_size, train=False)

    def make_epoch(epoch: int):
        return make_loader(urls, tokenizer=tokenizer, transform=train_tf,
                           batch_size=cfg.train.batch_size,
                           context_length=cfg.model.text.context_length,
                           num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                           seed=cfg.train.seed, resampled=cfg.data.resampled,
                           caption=cfg.data.caption, epoch=epoch)

    # A resumed run starts a fresh epoch (new shuffle); resuming mid-epoch at the exact data
    # position is the distributed issue's work (README.md, "Next steps").
    stream = _Stream(make_epoch, skipped, epoch=start_epoch)
    log = JsonlLog(out_dir / "train_log.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vlp pretrain: {n_params / 1e6:.2f}M params, {len(urls)} train shards"
          f"{f', {n_train} samples' if n_train else ''}, batch {cfg.train.batch_size}, "
          f"{cfg.train.steps} steps, {cfg.train.precision}, out={out_dir}")

    def save(tag_step: int) -> None:
        name = f"step_{tag_step:08d}"
        tmp = checkpoint.begin(ckpt_root, name)
        engine.save_checkpoint(tmp, {"samples_seen": samples_seen, "skipped": dict(skipped),
                                     "bad_steps": bad_steps_total, "epoch": stream.epoch})
        checkpoint.commit(ckpt_root, name, cfg.train.keep_checkpoints)

    # SIGTERM (schedulers, `kill`) takes the same path as Ctrl-C: save, then stop.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    bar = tqdm(total=cfg.train.steps, initial=engine.global_step, desc="pretrain", unit="step",
               disable=not progress, dynamic_ncols=True)
    model.train()
    consecutive_bad, rate, t_last = 0, None, time.time()
    try:
        while engine.global_step < cfg.train.steps:
            batch = next(stream)
            with engine.autocast():
                image_features, text_features, scale = model(
                    batch.pixel_values, batch.input_ids, batch.attention_mask)
                loss = clip_loss(image_features, text_features, scale)["contrastive_loss"]
            if not torch.isfinite(loss):
                engine.skip_step()
                consecutive_bad += 1
                bad_steps_total += 1
                log.write({"step": engine.global_step, "event": "non_finite_loss",
                           "loss": float(loss.detach())})
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise NonFiniteLossError(
                        f"loss was NaN/inf for {consecutive_bad} consecutive steps (steps "
                        f"{engine.global_step - consecutive_bad + 1}..{engine.global_step}); "
                        f"lower train.lr (now {cfg.train.lr}) or check the data. The last good "
                        f"checkpoint is in {ckpt_root}.")
                continue
            consecutive_bad = 0
            engine.backward(loss)
            grad_norm = engine.step()
            samples_seen += len(batch)
            now = time.time()
            inst = len(batch) / max(now - t_last, 1e-9)
            rate = inst if rate is None else 0.9 * rate + 0.1 * inst
            t_last = now
            step = engine.global_step
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{engine.lr:.2e}",
                            samples_s=f"{rate:.0f}")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                log.write({"step": step, "loss": loss.item(), "lr": engine.lr,
                           "samples_per_s": rate, "samples_seen": samples_seen,
                           "epoch": stream.epoch, "logit_scale": float(scale.detach()),
                           "grad_norm": grad_norm, "skipped": dict(skipped),
                           "bad_steps": bad_steps_total})
            if cfg.train.save_every and step % cfg.train.save_every == 0 \
                    and step != cfg.train.steps:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        save(engine.global_step)
        print(f"\ninterrupted: checkpoint saved at step {engine.global_step}; continue with "
              f"`vlp pretrain --out {out_dir} --resume latest`")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    save(engine.global_step)
    train_time = time.time() - t_start

    pretrained = Pretrained(model, tokenizer, eval_tf)
    pretrained.save(out_dir / "model")
    metrics: dict = {"train_steps": engine.global_step, "train_samples": samples_seen,
                     "train_time_s": round(train_time, 1), "train_bad_steps": bad_steps_total,
                     "train_skipped_samples": skipped_samples(skipped)}
    metrics.update({f"train_skipped_{k}": v for k, v in sorted(skipped.items())})
    print(f"trained {engine.global_step} steps, {samples_seen} samples in {train_time:.0f} s; "
          f"skipped samples: {format_skips(skipped)}")
    if cfg.eval.at_end and val_spec:
        from vlp.eval.retrieval import evaluate_retrieval, format_table
        pretrained.model.eval()
        metrics.update(evaluate_retrieval(pretrained, val_spec, batch_size=cfg.eval.batch_size,
                                          progress=progress))
        print(format_table(metrics))
    metrics["total_time_s"] = round(time.time() - t_start, 1)
    log.write({"step": engine.global_step, "event": "end", **metrics})
    log.close()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"model: {out_dir / 'model'}  metrics: {out_dir / 'metrics.json'}")
    return metrics
