"""Pieces every task shares: a map-style dataset over benchmark records whose unreadable
images are skipped and counted, batch collation, and reading official JSON files with clear
errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from vlp.finetune.visual import VisualError, VisualReader, collate_visual


def read_json(path: str | Path, what: str):
    """A JSON file, or a clear error naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{what}: {path} line {n} is not valid JSON ({e})") from None
    return rows


def require(record: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")


class RecordDataset(torch.utils.data.Dataset):
    """records[i] -> make_item(record, visual inputs) or None when its image is unusable (the
    collate function drops and counts those)."""

    def __init__(self, records: list, image_of: Callable, reader: VisualReader,
                 make_item: Callable, object_boxes_of: Callable | None = None):
        self.records, self.image_of, self.reader = records, image_of, reader
        self.make_item, self.object_boxes_of = make_item, object_boxes_of

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        try:
            boxes = self.object_boxes_of(record) if self.object_boxes_of else None
            visual = self.reader.read(self.image_of(record), boxes)
        except VisualError:
            return None
        return self.make_item(record, visual)


def collate_items(items: list, text_fields: Callable | None = None) -> dict:
    """Drop None items (counted in "skipped"), collate the visual inputs into "visual", stack
    tensor fields, keep lists of everything else. "batch_size": the items kept."""
    kept = [it for it in items if it is not None]
    batch: dict = {"skipped": len(items) - len(kept), "batch_size": len(kept)}
    if not kept:
        return batch
    batch["visual"] = collate_visual([it["visual"] for it in kept])
    for key in kept[0]:
        if key == "visual":
            continue
        values = [it[key] for it in kept]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def eval_loader(task, split: str) -> torch.utils.data.DataLoader:
    """The task's `split` in order, in eval.batch_size batches, through its collate."""
    return torch.utils.data.DataLoader(task.dataset(split), batch_size=task.cfg.eval.batch_size,
                                       num_workers=task.cfg.data.num_workers,
                                       collate_fn=task.collate)
