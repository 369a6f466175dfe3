"""The DeepSpeed config of a run: a JSON file (configs/deepspeed/zero{0,1,2,3}.json) for what is
DeepSpeed's business (ZeRO stage, buckets, offload, loss-scaler tuning), with the keys that
vlp's own config decides filled in from `train.*`.

Keys vlp owns may be "auto" or absent in the JSON (like Hugging Face's Trainer); any other value
must agree with vlp's, so one run never has two different batch sizes or clipping thresholds.

Two defaults differ from DeepSpeed's own (issue 18):
- Gradients are reduced across processes in fp32 under bf16 autocast. DeepSpeed 0.19 gives the
  parameters of its `lower_precision_safe_modules` (by default Linear and Conv1d/2d/3d, i.e.
  nearly all weights) a bf16 `comm_dtype`, and ZeRO 1-3 then reduce their gradients in bf16
  buckets (runtime/torch_autocast.py, zero/stage_1_and_2.py): every sum over ranks rounded to
  8 bits of mantissa. An empty list keeps every gradient's own dtype, fp32; a JSON that lists
  modules gets what it lists.
- Buckets of 5e7 elements (200 MB in fp32) instead of 5e8 (2 GB each; with overlap_comm
  DeepSpeed holds several). `overlap_comm` ("auto") overlaps reduction with the backward pass
  on CUDA only: DeepSpeed's CPU accelerator has no streams to overlap on.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from vlp.config import ConfigError, TrainConfig

# The built-in default, identical to configs/deepspeed/zero2.json (tests/test_engine.py pins it).
DEFAULT = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "torch_autocast": {"enabled": "auto", "dtype": "auto", "lower_precision_safe_modules": []},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "overlap_comm": "auto", "contiguous_gradients": True,
                          "reduce_scatter": True, "reduce_bucket_size": 50000000,
                          "allgather_bucket_size": 50000000},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}

# DeepSpeed builds these from its own config blocks; vlp builds AdamW + warmup/cosine from
# train.* and hands them over, so the JSON must not name them.
_VLP_BUILT = ("optimizer", "scheduler")


def load(path: str) -> dict:
    """The JSON at `path`, or DEFAULT when `path` is empty."""
    if not path:
        return copy.deepcopy(DEFAULT)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.deepspeed={path!r}: no such file (DeepSpeed JSON configs are in "
                          "configs/deepspeed/: zero0.json ... zero3.json)")
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"train.deepspeed={path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed={path!r} must hold a JSON object")
    return data


def _fill(cfg: dict, key: str, value, owner: str, source: str) -> None:
    """cfg[key] = value when absent or "auto"; otherwise it must already equal value."""
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(f"{source}: {key}={current!r} conflicts with {owner}={value!r}; set it "
                          f"to \"auto\" in the JSON and choose the value with {owner}")


def build(train: TrainConfig, world_size: int, cuda: bool | None = None) -> dict:
    """The complete DeepSpeed config for `train` on `world_size` processes, on CUDA GPUs when
    `cuda` (default: when torch sees one)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    source = train.deepspeed or "built-in DeepSpeed config"
    cfg = load(train.deepspeed)
    for key in _VLP_BUILT:
        if key in cfg:
            raise ConfigError(f"{source}: remove the {key!r} block; vlp builds AdamW and the "
                              "warmup+cosine schedule from train.lr, train.weight_decay, "
                              "train.warmup_steps, ...")
    _fill(cfg, "train_micro_batch_size_per_gpu", train.batch_size, "train.batch_size", source)
    _fill(cfg, "gradient_accumulation_steps", train.grad_accum, "train.grad_accum", source)
    _fill(cfg, "train_batch_size", train.batch_size * train.grad_accum * world_size,
          "train.batch_size x train.grad_accum x processes", source)
    _fill(cfg, "gradient_clipping", float(train.grad_clip), "train.grad_clip", source)

    fp16 = dict(cfg.get("fp16") or {})
    autocast = dict(cfg.get("torch_autocast") or {})
    native_bf16 = (cfg.get("bf16") or {}).get("enabled") is True
    if native_bf16 and train.precision != "bf16":
        raise ConfigError(f"{source}: bf16.enabled=true conflicts with "
                          f"train.precision={train.precision!r}")
    _fill(fp16, "enabled", train.precision == "fp16", "train.precision", source)
    # bf16 is autocast over fp32 master weights, unless the JSON asks for DeepSpeed's native
    # bf16 (weights in bf16, fp32 copies in the optimizer).
    _fill(autocast, "enabled", train.precision == "bf16" and not native_bf16, "train.precision",
          source)
    _fill(autocast, "dtype", "bfloat16", "train.precision", source)
    autocast.setdefault("lower_precision_safe_modules", [])  # reduce in fp32 (docstring)
    cfg["fp16"], cfg["torch_autocast"] = fp16, autocast
    if train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator "
                          "has no fp16); use train.precision=bf16 or fp32 on CPU")
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; choose 0, 1, 2 or 3")
    zero = dict(cfg.get("zero_optimization") or {})
    if zero.get("overlap_comm") == "auto" or (stage >= 1 and "overlap_comm" not in zero):
        zero["overlap_comm"] = cuda and stage >= 1
    if zero:
        cfg["zero_optimization"] = zero
    return cfg


def zero_stage(cfg: dict) -> int:
    return (cfg.get("zero_optimization") or {}).get("stage", 0)
