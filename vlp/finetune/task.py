"""What every fine-tuning task provides to the one fine-tuning loop (vlp/finetune/loop.py), and
the fine-tuned model directory they all share.

A task (vlp/tasks/<name>.py) reads its benchmark's official files, builds the model
(`FinetunedModel`: the pretrained backbone + the task's head from vlp/models/heads), computes
its loss from a batch, and evaluates with the benchmark's official metric, writing the official
results file. The loop owns everything else: DeepSpeed, steps, checkpoints, resume, logging.

The fine-tuned model directory (OUT/model): config.json {"architecture": "finetuned", "task",
"backbone" (the Backbone spec), "head" (the task's settings), "transform"}, model.safetensors
(backbone + head), tokenizer.json, and the task's own files (e.g. VQA's answers.json).
`vlp.load(dir)` returns the task's inference object (`.answer(image, question)`,
`.caption(image)`, ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from vlp.data.transforms import ImageTransform
from vlp.finetune.backbone import Backbone
from vlp.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1


class FinetunedModel(nn.Module):
    """The backbone and one task head; forward(**batch) is the head's (so DeepSpeed sees one
    module and one forward per micro-batch)."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enabled)

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        return self.head(self.backbone, **inputs)


class Task(Protocol):
    name: str
    metric_names: tuple[str, ...]  # per-step training metrics, logged beside the loss

    def dataset(self, split: str) -> torch.utils.data.Dataset:
        """Items are dicts (collated by `collate`) or None for a skipped sample."""

    def collate(self, items: list) -> dict:
        """-> a batch dict with "batch_size" (items kept) and "skipped" (None items
        dropped)."""

    def build_model(self, backbone: Backbone | None = None) -> FinetunedModel:
        """The task's backbone (or the one given: a fresh copy) with a new head."""

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, list[float]]:
        """(loss, values for metric_names) of one micro-batch through engine(**inputs)."""

    def evaluate(self, model: FinetunedModel, split: str, out_dir: Path,
                 progress: bool) -> dict:
        """Score `split` with the official metric; write the official results file into
        out_dir; return flat metrics."""

    def head_config(self) -> dict:
        """What a loaded model needs besides the weights (saved in config.json "head")."""

    def save_files(self, folder: Path) -> None:
        """The task's own files in the model directory (may do nothing)."""


def save_finetuned(folder: Path, task: Task, model: FinetunedModel, tokenizer: Tokenizer,
                   transform: ImageTransform) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "architecture": "finetuned", "task": task.name,
              "backbone": model.backbone.spec, "head": task.head_config(),
              "transform": transform.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(folder / "model.safetensors"))  # tied weights stored once
    tokenizer.save(folder / "tokenizer.json")
    task.save_files(folder)
    return folder


def load_finetuned_parts(folder: str | Path, build_head) -> tuple[dict, FinetunedModel,
                                                                  Tokenizer, ImageTransform]:
    """(config, model with its weights, tokenizer, eval transform) of a fine-tuned model
    directory; `build_head(config, backbone, tokenizer)` makes the task's head."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    backbone = Backbone(config["backbone"], tokenizer.vocab_size)
    model = FinetunedModel(backbone, build_head(config, backbone, tokenizer))
    load_model(model, str(folder / "model.safetensors"))
    return config, model.eval(), tokenizer, ImageTransform.from_dict(config["transform"])
