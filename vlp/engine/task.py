"""The one interface every kind of training implements, and the one loop (vlp/engine/loop.py)
runs: each pretraining recipe (vlp/recipes: dual tower, single stream, combined) and each
fine-tuning task (vlp/tasks: VQA, captioning, VCR, retrieval).

A task owns its model, what its batches mean, its loss, its model directory and its metric;
the loop owns everything else: the DeepSpeed engine, resume, atomic checkpoints, stop
signals, non-finite-loss skipping, logging and the progress bar, periodic evaluation and the
consolidation of the trained weights. Its batches come from a `vlp.data.sources.DataSource`.

Where to add things: a new pretraining objective is a recipe in vlp/recipes (its loss from
vlp/objectives); a new benchmark is a task in vlp/tasks (its official files, its head from
vlp/models/heads, its metric from vlp/eval). Neither touches the loop.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from vlp.data.batch import Batch


class Task(ABC):
    name: str  # "dual_tower", "vqa", ...: the run's kind, in logs and the header
    metric_names: tuple[str, ...] = ()  # per-step values `loss` returns, logged by name
    # metrics `evaluate` reports that eval.best_metric may name (checked before any work)
    eval_metrics: tuple[str, ...] = ()

    @abstractmethod
    def build_model(self, pretrained: bool = True) -> nn.Module:
        """A new model to train. pretrained=True: with its starting weights (a fine-tuning
        task's pretrained encoder, a BERT text tower); False: the same architecture with its
        weights as built, for the loop to load trained weights into (a fresh module: ZeRO turns
        the trained one's parameters into views of its flat buffers)."""

    @abstractmethod
    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        """(loss, values named by `metric_names`) of one micro-batch, through `engine(...)`
        (the DeepSpeed engine's forward: mixed precision, ZeRO); inputs go to `engine.device`
        (floats in `engine.input_dtype`). A value that does not apply to this batch is NaN."""

    @abstractmethod
    def save_model(self, model: nn.Module, folder: Path) -> Path:
        """Write `model` (trained weights loaded, eval mode, on CPU) as a model directory
        (vlp.modeldir) at `folder`; returns it."""

    def evaluate(self, model: nn.Module, out_dir: Path, progress: bool,
                 max_samples: int = 0) -> dict:
        """Score `model` (eval mode, on the device to evaluate on) with the task's metric:
        print a table, write any official results file into `out_dir`, return flat metrics
        ({} when there is nothing to evaluate). The loop calls it at the end of a run and every
        `eval.every` steps; `max_samples` > 0 bounds how much of the evaluation data is read
        (during training; benchmark tasks score their whole split with the official metric)."""
        return {}

    def describe(self) -> str:
        """What the run header says about the task (model family, data)."""
        return self.name
