"""A dual tower ready for inference: its tokenizer and eval image transform around it, images
and texts in, L2-normalised embeddings out. What `vlp.load` returns for dual_tower and
combined model directories, and what retrieval, zero-shot evaluation and the conversions use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlp import modeldir
from vlp.config import to_dict
from vlp.data.transforms import ImageTransform
from vlp.models.device import eval_autocast, resolve_device
from vlp.models.towers import DualTower
from vlp.tokenizer import Tokenizer


class Pretrained:
    """A dual tower with its tokenizer and eval image transform, ready for inference."""

    def __init__(self, model: DualTower, tokenizer: Tokenizer, transform: ImageTransform,
                 device: str | torch.device | None = None):
        """`device`: vlp.models.device.resolve_device's rule (None: the GPU when there is
        one, else the CPU)."""
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.transform = transform

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
        with eval_autocast(self.device):
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
        with eval_autocast(self.device):
            out = [self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu()
                   for ids, mask in batches]
        return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

    def save(self, path: str | Path) -> Path:
        """Write a dual_tower model directory (vlp.modeldir) into `path`."""
        return modeldir.write(path, "dual_tower", {"model": to_dict(self.model.cfg)},
                              self.model.state_dict(), self.tokenizer, self.transform)

    @classmethod
    def from_dir(cls, folder: modeldir.ModelDir, device: str | torch.device | None = None
                 ) -> "Pretrained":
        """The dual tower of a dual_tower or combined model directory (a combined one keeps
        its towers in model.safetensors)."""
        model = DualTower(folder.model_config())
        modeldir.load_weights(model, folder.weights(), str(folder.path / modeldir.WEIGHTS))
        return cls(model, folder.tokenizer(), folder.transform(), device)
