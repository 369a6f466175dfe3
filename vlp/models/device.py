"""The one device rule for inference and evaluation: the device asked for, else CUDA when it is
available, else the CPU; on CUDA, evaluation runs under bf16 autocast (what training runs
under), on the CPU in fp32 (exact, and what the parity tests compare)."""
from __future__ import annotations

import contextlib

import torch

from vlp.config import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else "cuda" when a GPU is visible, else "cpu"."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: no CUDA device is visible here; use --device "
                         "cpu (or leave it out: the GPU when there is one, else the CPU)")
    return device


def eval_autocast(device: str | torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
