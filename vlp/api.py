"""The model directory and the public inference API.

A model directory holds `config.json` (model config + image transform settings),
`model.safetensors` (weights; never a pickle) and `tokenizer.json`. `vlp.load(path)` returns a
`Pretrained` with `encode_image` and `encode_text`, both returning L2-normalised float tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlp.config import ModelConfig, from_dict, to_dict
from vlp.data.transforms import ImageTransform
from vlp.models import DualTower
from vlp.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1


class Pretrained:
    """A dual tower with its tokenizer and eval image transform, ready for inference."""

    def __init__(self, model: DualTower, tokenizer: Tokenizer, transform: ImageTransform,
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.transform = transform
        self.device = torch.device(device)

    @property
    def context_length(self) -> int:
        return self.model.cfg.text.context_length

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image | np.ndarray] | torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
        """PIL images (or HWC uint8 arrays) or an already transformed (B, 3, H, W) tensor
        -> (B, embed_dim) L2-normalised float32."""
        if isinstance(images, torch.Tensor):
            pixels = images if images.ndim == 4 else images[None]
        else:
            pixels = torch.stack([self.transform(im) for im in images]) if len(images) else \
                torch.empty(0, 3, self.transform.image_size, self.transform.image_size)
        out = [self.model.encode_image(pixels[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str] | torch.Tensor, batch_size: int = 1024,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """list of strings, or right-padded token ids (B, T) with T <= context_length
        -> (N, embed_dim) L2-normalised float32.

        For ids the mask (1 = real token) is `attention_mask` when given, else
        `tokenizer.attention_mask(ids)`: ids != pad, or, where the pad is also a text or
        end-of-text token (CLIP), everything up to and including the first end-of-text.
        """
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings; wrap a single one in [...]")
        if isinstance(texts, torch.Tensor):
            ids = texts if texts.ndim == 2 else texts[None]
            if ids.dtype.is_floating_point:
                raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
            mask = self.tokenizer.attention_mask(ids) if attention_mask is None else \
                attention_mask.reshape(ids.shape)
            batches = [(ids[i:i + batch_size], mask[i:i + batch_size])
                       for i in range(0, len(ids), batch_size)]
        else:
            batches = (self.tokenizer(list(texts[i:i + batch_size]), self.context_length)
                       for i in range(0, len(texts), batch_size))
        out = [self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu()
               for ids, mask in batches]
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

    def save(self, path: str | Path) -> Path:
        """Write config.json, model.safetensors and tokenizer.json into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "architecture": "dual_tower",
                  "model": to_dict(self.model.cfg), "transform": self.transform.to_dict()}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        self.tokenizer.save(path / "tokenizer.json")
        return path


def load(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a model directory written by `vlp pretrain` (or `Pretrained.save`)."""
    path = Path(path)
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json")
               if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a vlp model directory: missing {', '.join(missing)}"
                                " (a run writes one to OUT/model)")
    config = json.loads((path / "config.json").read_text())
    if config.get("architecture") == "finetuned":
        return load_finetuned(path, config.get("task"), device)
    # a combined (ALBEF-style) run's directory holds its dual tower in model.safetensors
    if config.get("architecture") not in ("dual_tower", "combined"):
        raise ValueError(f"{path}/config.json: architecture {config.get('architecture')!r} is not "
                         "supported by vlp.load (expected 'dual_tower', 'combined' or "
                         "'finetuned'; a single-stream pretraining run is a starting point for "
                         "`vlp finetune`)")
    model_cfg = from_dict(ModelConfig, config["model"])
    model = DualTower(model_cfg)
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state)
    return Pretrained(model, load_tokenizer(path / "tokenizer.json"),
                      ImageTransform.from_dict(config["transform"]), device)


def load_finetuned(path: Path, task: str | None, device: str | torch.device = "cpu"):
    """A fine-tuned model directory (vlp finetune) -> the task's inference object."""
    if task == "vqa":
        from vlp.tasks.vqa import VQAModel

        return VQAModel(path, device)
    if task == "caption":
        from vlp.tasks.caption import CaptionModel

        return CaptionModel(path, device)
    if task == "vcr":
        from vlp.tasks.vcr import VCRModel

        return VCRModel(path, device)
    if task == "retrieval":
        from vlp.tasks.retrieval import load_retrieval_model

        return load_retrieval_model(path, device)
    raise ValueError(f"{path}/config.json: unknown fine-tuned task {task!r}; expected vqa, "
                     "caption, vcr or retrieval")
