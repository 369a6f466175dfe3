"""The training engine: DeepSpeed, for one process or many.

vlp builds the optimizer (AdamW over the parameter groups of vlp.engine.optim: frozen towers
left out, layer-wise learning rates, no decay on gains/biases/positions) and the warmup+cosine
schedule from `train.*` and hands them to `deepspeed.initialize` with the config from
`vlp.engine.deepspeed_config`; DeepSpeed does ZeRO partitioning, gradient reduction,
accumulation, clipping, mixed precision and its own checkpoint files. `Engine` adds what a run
needs around it: the step/boundary bookkeeping the loop reads, and a consolidated fp32 state dict
for the model directory whatever the ZeRO stage.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlp.config import TrainConfig
from vlp.engine import deepspeed_config, safe_load
from vlp.engine.dist import World
from vlp.engine.optim import build_param_groups
from vlp.engine.schedule import warmup_cosine


def rng_state() -> dict:
    """This process's generators: Python, NumPy, torch CPU and, with CUDA, every visible GPU's.
    Only ints, lists and CPU tensors: the file reads back with `torch.load(weights_only=True)`."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": keys.tolist(),
             "numpy_pos": [int(pos), int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_device"] = torch.cuda.current_device()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = np.random.get_state()
    # position and cached gaussian too (older files held only the keys: keep ours)
    rest = state.get("numpy_pos", np_state[2:])
    np.random.set_state((np_state[0], np.asarray(state["numpy"], dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # other GPUs visible than when saved (e.g. one per process now): ours is enough
            torch.cuda.set_rng_state(cuda[state["cuda_device"]])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class Engine:
    """A DeepSpeed engine for `model` configured from `train` (see module docstring). The
    parameters `train.lock_*` freeze get requires_grad=False on `model` itself."""

    def __init__(self, model: nn.Module, train: TrainConfig, world: World):
        import deepspeed

        self.config = deepspeed_config.build(train, world.size)
        self.zero_stage = deepspeed_config.zero_stage(self.config)
        if train.precision == "fp32" and torch.cuda.is_available():
            # fp32 matmuls and convolutions on tensor cores (TF32); torch leaves matmuls at full
            # fp32, several times slower on A100/H100 for no gain in training
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        if train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        # frozen towers leave the optimizer here (requires_grad=False); each group has its lr
        groups = build_param_groups(model, train)
        self.trainable_params = sum(p.numel() for g in groups for p in g["params"])
        # The frozen weights as they came, for the model directory: DeepSpeed may move, cast
        # (fp16 / native bf16) or partition (ZeRO-3) the module's copies, and ZeRO-1
        # checkpoints leave frozen weights out. References, not copies (rank 0 only): they
        # cost memory only where DeepSpeed replaces the module's tensors.
        self._frozen = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
                        if not p.requires_grad} if world.is_main else {}
        # fused: one kernel over all parameters (the optimizer step timed in bench/README.md).
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2),
                                      eps=train.eps, fused=True)

        def lr_factor(step: int) -> float:  # LambdaLR multiplies each group's lr
            lr = warmup_cosine(step, base_lr=train.lr, min_lr=train.min_lr,
                               warmup_steps=train.warmup_steps, total_steps=train.steps)
            return lr / train.lr if train.lr else 0.0

        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor))
        self.module = self.ds.module
        self.device = self.ds.device
        # DeepSpeed's fp16 (and native bf16) cast the module; inputs must match its dtype.
        self.input_dtype = next(self.module.parameters()).dtype

    # ---------------------------------------------------------------- step
    def __call__(self, *inputs, **kwargs):
        return self.ds(*inputs, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> bool:
        """Finish a micro-batch; True when this one completed an optimizer step (DeepSpeed
        counts micro-batches and steps at every train.grad_accum-th)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        return boundary

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (fp16 steps skipped by the loss scaler included)."""
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        """The schedule's lr this step (train.lr's), whatever the groups' multipliers."""
        group = self.ds.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)

    def param_group_lrs(self) -> list[tuple[float, list[str]]]:
        """(lr now, parameter names) of every optimizer group."""
        return [(float(g["lr"]), list(g["names"])) for g in self.ds.optimizer.param_groups]

    @property
    def overflow_steps(self) -> int:
        """fp16 steps the dynamic loss scaler skipped (inf/NaN gradients)."""
        return int(self.ds.skipped_steps)

    def grad_norm(self) -> float | None:
        """Norm of the last step's gradients before clipping, when DeepSpeed computed one."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ---------------------------------------------------------------- checkpoints
    def save(self, folder: Path) -> None:
        """Every rank writes its part of DeepSpeed's checkpoint into `folder`."""
        folder = Path(folder)
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        """Restore DeepSpeed's state from checkpoint `folder`, reading no file that could run
        code: every `.pt` in it is checked weights-only first (a refusal names the file, on
        every rank alike), then DeepSpeed's own reads are forced weights-only too."""
        folder = Path(folder)
        safe_load.check_folder(folder)
        with safe_load.weights_only_loads():
            path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed checkpoint this run can load")

    def consolidated_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        """The full fp32 model weights as of checkpoint `folder` (on rank 0): merged from the
        ZeRO partitions' fp32 master copies (stage >= 1), else the module's own weights."""
        if self.zero_stage >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            folder = Path(folder)
            with safe_load.weights_only_loads():  # files this run wrote, read safely all the same
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent),
                                                                 tag=folder.name)
        else:
            state = self._module_state_fp32()
        state = {**state, **self._frozen}
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    def _module_state_fp32(self) -> dict[str, torch.Tensor]:
        """The module's state dict with each 16-bit parameter replaced by the optimizer's fp32
        master copy: ZeRO-0 with DeepSpeed's fp16 or native bf16 keeps the module in 16 bits
        (FP16_Optimizer / FP16_UnfusedOptimizer hold the fp32 masters), and a model directory
        written from the module would carry weights rounded to 16 bits."""
        state = self.module.state_dict(keep_vars=True)
        optimizer = getattr(self.ds, "optimizer", None)
        groups16 = getattr(optimizer, "fp16_groups", None)
        if groups16 is None:
            return state
        masters: dict[int, torch.Tensor] = {}
        if hasattr(optimizer, "fp32_groups"):  # unfused: one fp32 copy per parameter
            for g16, g32 in zip(groups16, optimizer.fp32_groups):
                masters.update({id(p16): p32 for p16, p32 in zip(g16, g32)})
        elif hasattr(optimizer, "fp32_groups_flat"):  # fused: one flat fp32 buffer per group
            for g16, flat in zip(groups16, optimizer.fp32_groups_flat):
                offset = 0
                for p16 in g16:
                    n = p16.numel()
                    masters[id(p16)] = flat[offset:offset + n].view_as(p16)
                    offset += n
        return {k: masters.get(id(v), v) for k, v in state.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The live weights as full float32 CPU tensors, for evaluation during training. Every
        rank must call it: under ZeRO-3 the partitions are gathered (a collective)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()),
                                                   modifier_rank=None):
                state = dict(self.module.state_dict())
                return {k: v.detach().float().cpu().clone()
                        for k, v in {**state, **self._frozen}.items()}
        return {k: v.detach().float().cpu().clone()
                for k, v in {**self._module_state_fp32(), **self._frozen}.items()}

    def release(self) -> None:
        """Free the engine (optimizer states, gradient buffers, its copy of the model), e.g.
        before a final evaluation with a fresh model; the engine is unusable afterwards."""
        import gc

        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()
        del self.ds, self.module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
