"""The public inference API: `vlp.load(path)` on any model directory a run or a conversion
writes (format: vlp/modeldir.py).

    dual_tower, combined -> `Pretrained` (encode_image / encode_text, L2-normalised)
    finetuned            -> the task's inference object (VQAModel.answer, CaptionModel.caption,
                            VCRModel.choose, RetrievalModel.encode_* / rerank,
                            RefCOCOModel.locate)

A single-stream pretraining directory has no inference object: it is a starting point for
`vlp finetune`.

`image_size=` loads any of them at another image size than it was trained at: the learned
patch positions are resampled and the image transform follows (vlp/models/resize.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlp import modeldir
from vlp.models.pretrained import Pretrained
from vlp.models.resize import at_image_size

LOADABLE = ("dual_tower", "combined", "finetuned")


def load(path: str | Path, device: str | torch.device | None = None, *, image_size: int = 0):
    """Load a model directory written by `vlp pretrain`, `vlp finetune` or `vlp convert`, onto
    `device` (None: the GPU when there is one, else the CPU). `image_size` > 0: the model at
    that image size (a ViT's a multiple of its patch size), its position table resampled
    bicubically and its transform resizing to it; 0: the size it was trained at."""
    folder = modeldir.read(path)
    if folder.architecture == "single_stream":
        raise modeldir.ModelDirError(
            f"{folder.path / modeldir.CONFIG}: a single_stream pretraining directory has no "
            f"inference model; it is a starting point for `vlp finetune` (init_from=...). "
            f"vlp.load reads {list(LOADABLE)}")
    folder = at_image_size(folder, image_size)
    if folder.architecture == "finetuned":
        return load_finetuned(folder, device)
    return Pretrained.from_dir(folder, device)


def load_finetuned(folder: modeldir.ModelDir, device: str | torch.device | None = None):
    """A fine-tuned model directory (vlp finetune) -> the task's inference object."""
    task = folder.config.get("task")
    if task == "vqa":
        from vlp.tasks.vqa import VQAModel

        return VQAModel(folder, device)
    if task == "caption":
        from vlp.tasks.caption import CaptionModel

        return CaptionModel(folder, device)
    if task == "vcr":
        from vlp.tasks.vcr import VCRModel

        return VCRModel(folder, device)
    if task == "retrieval":
        from vlp.tasks.retrieval import RetrievalModel

        return RetrievalModel(folder, device)
    if task == "refcoco":
        from vlp.tasks.refcoco import RefCOCOModel

        return RefCOCOModel(folder, device)
    raise modeldir.ModelDirError(f"{folder.path / modeldir.CONFIG}: unknown fine-tuned task "
                                 f"{task!r}; expected vqa, caption, vcr, retrieval or refcoco")


__all__ = ["load", "load_finetuned", "Pretrained"]
