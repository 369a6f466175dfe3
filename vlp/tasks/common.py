"""What every fine-tuning task shares: the task base class (the joint encoder from
`init_from`, its model directory, evaluation on `eval.split`), a map-style dataset over
benchmark records whose unusable images are skipped and counted, collation into a `Batch`, and
reading official JSON files with clear errors."""
from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from vlp import modeldir
from vlp.config import FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.transforms import ImageTransform
from vlp.data.visual import VisualError, VisualReader, collate_visual
from vlp.engine.task import Task
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tokenizer import Tokenizer


class Skipped(NamedTuple):
    """A dataset item whose image (or region file, or object) cannot be used."""
    reason: str


class RecordDataset(torch.utils.data.Dataset):
    """records[i] -> make_item(record, visual inputs), or `Skipped(reason)` when its visual
    input is unusable (`collate_items` drops and counts those). `make_item` may itself return
    a Skipped (e.g. a question about an object the image has no region for).

    With `seed`, make_item also gets `rng=`, a numpy Generator seeded by (seed, epoch, i): an
    item's random choices then depend on nothing but the item and the epoch (`set_epoch`, which
    MapSource calls), so a run resumed mid-epoch, in other loader workers, draws the same."""

    def __init__(self, records: list, image_of: Callable, reader: VisualReader,
                 make_item: Callable, object_boxes_of: Callable | None = None,
                 seed: int | None = None):
        self.records, self.image_of, self.reader = records, image_of, reader
        self.make_item, self.object_boxes_of = make_item, object_boxes_of
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        try:
            boxes = self.object_boxes_of(record) if self.object_boxes_of else None
            visual = self.reader.read(self.image_of(record), boxes)
        except VisualError as e:
            return Skipped(e.reason)
        if self.seed is None:
            return self.make_item(record, visual)
        return self.make_item(record, visual, rng=np.random.default_rng([self.seed, self.epoch,
                                                                         i]))


def collate_items(items: list, key: str) -> Batch:
    """Items -> a Batch: Skipped items dropped and counted by reason, the visual inputs into
    the Batch's fields, `key` (an item field) naming each sample, and every other field into
    `batch.fields` (tensors stacked, other values as lists)."""
    kept = [it for it in items if not isinstance(it, Skipped)]
    skipped = dict(Counter(it.reason for it in items if isinstance(it, Skipped)))
    if not kept:
        return Batch([], skipped=skipped)
    batch = Batch([str(it[key]) for it in kept], skipped=skipped,
                  **collate_visual([it["visual"] for it in kept]))
    for name in kept[0]:
        if name == "visual":
            continue
        values = [it[name] for it in kept]
        batch.fields[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) \
            else values
    return batch


def reader_for(encoder: JointEncoder, transform: ImageTransform,
               regions_dir: str | Path | None) -> VisualReader:
    """The visual reader for what `encoder`'s visual tokens need."""
    return VisualReader(encoder.visual_needs(), transform, regions_dir)


class FinetuneTask(Task):
    """A benchmark task: the joint encoder of `init_from` (or of a fine-tuned model directory)
    plus the task's head. Subclasses give the head, the data and the official metric."""

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer: Tokenizer,
                 transform: ImageTransform, root: Path, world_size: int = 1):
        """`encoder`: the loaded pretrained joint encoder, handed to the first
        `build_model()`; its spec builds fresh copies (`build_model(pretrained=False)`)."""
        self.cfg, self.tokenizer, self.transform, self.root = cfg, tokenizer, transform, root
        self.world_size = world_size
        self.spec = encoder.spec
        self.encoder = encoder  # what its properties say (width, visual tokens, text length)
        self._pretrained: JointEncoder | None = encoder

    # ------------------------------------------------------------------ what a task gives
    @abstractmethod
    def make_head(self, encoder: JointEncoder) -> nn.Module:
        """A new head for `encoder`."""

    @abstractmethod
    def dataset(self, split: str) -> torch.utils.data.Dataset:
        """The split's items (`collate` turns a list of them into a Batch)."""

    @abstractmethod
    def collate(self, items: list) -> Batch:
        ...

    @abstractmethod
    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        """Run `model` on `split`, write the official results file into out_dir, score it with
        the official metric; print a table and return flat metrics."""

    def head_config(self) -> dict:
        """What a loaded model needs besides the weights (config.json "head")."""
        return {}

    def task_files(self) -> dict[str, object]:
        """The task's own files in the model directory: name -> JSON value."""
        return {}

    # ------------------------------------------------------------------ Task
    def describe(self) -> str:
        return (f"{self.name}, {self.encoder.architecture} encoder "
                f"({self.encoder.visual_tokens} visual tokens) from {self.cfg.init_from}")

    def build_model(self, pretrained: bool = True) -> FinetunedModel:
        if pretrained and self._pretrained is not None:
            encoder, self._pretrained = self._pretrained, None  # handed out once
        else:
            encoder = JointEncoder(self.spec, self.tokenizer.vocab_size)
        return FinetunedModel(encoder, self.make_head(encoder))

    def save_model(self, model: FinetunedModel, folder: Path) -> Path:
        config = {"task": self.name, "backbone": model.backbone.spec,
                  "head": self.head_config()}
        return modeldir.write(folder, "finetuned", config, modeldir.untied_state_dict(model),
                              self.tokenizer, self.transform, files=self.task_files())

    def evaluate(self, model: FinetunedModel, out_dir: Path, progress: bool,
                 max_samples: int = 0) -> dict:
        """The whole eval.split, scored by the official metric (max_samples is not used: a
        partial results file is no official score)."""
        return self.score(model.eval(), self.cfg.eval.split, out_dir, progress)

    def eval_loader(self, split: str) -> torch.utils.data.DataLoader:
        """`split` in order, in eval.batch_size batches, through `collate`."""
        return torch.utils.data.DataLoader(self.dataset(split),
                                           batch_size=self.cfg.eval.batch_size,
                                           num_workers=self.cfg.data.num_workers,
                                           collate_fn=self.collate)


def load_finetuned_parts(folder: str | Path | modeldir.ModelDir, make_head: Callable
                         ) -> tuple[modeldir.ModelDir, FinetunedModel, Tokenizer,
                                    ImageTransform]:
    """(the model directory, the model with its weights in eval mode, tokenizer, eval
    transform) of a fine-tuned model directory; `make_head(config, encoder)` builds the
    task's head."""
    if not isinstance(folder, modeldir.ModelDir):
        folder = modeldir.read(folder, ("finetuned",))
    tokenizer = folder.tokenizer()
    encoder = JointEncoder(folder.config["backbone"], tokenizer.vocab_size)
    model = FinetunedModel(encoder, make_head(folder.config, encoder))
    modeldir.load_weights(model, folder.weights(), str(folder.path / modeldir.WEIGHTS))
    return folder, model.eval(), tokenizer, folder.transform()
