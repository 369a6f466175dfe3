"""Visual and word tokenizers in front of the unified Transformer.

PatchEmbed: image -> (class token +) patch tokens with learned or fixed 2-D sin-cos positions.
TextEmbed:  token ids -> token + learned position embeddings.
"""
from __future__ import annotations

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] embedding (Transformer / MAE convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (dim/2,)
    out = positions.double()[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid*grid, dim): half the channels encode the row, half the column (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # row index of each patch, row-major
    cols = coords.repeat(grid_size)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear projection (a strided conv) -> + positions."""

    def __init__(self, image_size: int, patch_size: int, width: int, *, class_token: bool = True,
                 pos_embed: str = "learned"):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        n_tokens = self.num_patches + (1 if class_token else 0)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        elif pos_embed == "sincos":
            table = sincos_2d(width, self.grid_size)
            if class_token:  # the class token gets the zero position, as in MAE
                table = torch.cat([torch.zeros(1, width), table])
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose learned or sincos")
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {H}x{W}")
        x = self.proj(pixel_values)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, num_patches, width), row-major patches
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed.to(x.dtype)


class TextEmbed(nn.Module):
    def __init__(self, vocab_size: int, width: int, context_length: int):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"sequence length {L} exceeds context_length={self.context_length}")
        return self.token_embed(input_ids) + self.pos_embed[:, :L]  # (B, L, width)
