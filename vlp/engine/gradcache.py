"""GradCache: one contrastive batch of K micro-batches, with the activation memory of one
(`train.contrastive_accum=K`; the loop runs it in place of `task.loss` + backward).

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup";
OpenCLIP's `--accum-freq` does the same:

 1. every micro-batch forward without a graph; keep its features (B x D: small) and the RNG
    state before it;
 2. the task's loss over the K micro-batches' features at once (across processes through the
    loss's own exchanges), and its gradient with respect to those features and to the shared
    scalars (temperature, bias) only;
 3. per micro-batch: the RNG state of step 1 restored (dropout or any other draw repeats
    exactly), the forward again with a graph, backward of sum(features x their gradient), one
    DeepSpeed micro-step; the last micro-step of train.grad_accum such groups ends the
    optimizer step.

The parameter gradients are those of the loss over the whole contrastive batch
(tests/test_gradcache.py: equal to one big batch's, on 1 and 2 processes) for one extra
forward per micro-batch. The loss graph of step 2 is the only thing alive across micro-batches.

A task that supports it (recipe=dual_tower) splits its `loss` into two methods:
    embed(engine, batch) -> (rows, shared): per-sample tensors (B, ...) and tensors shared by
        the whole batch (the temperature), in fp32, from one forward of `engine`
    embedding_loss(rows, shared) -> (loss, values): what `Task.loss` returns, from them
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlp.data.batch import Batch


def supports(task) -> bool:
    return callable(getattr(task, "embed", None)) and \
        callable(getattr(task, "embedding_loss", None))


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class CachedStep:
    """Steps 1 and 2 at construction (`loss`, `values`: the loss over all K micro-batches, for
    the loop's checks and logs); `backward()` runs step 3 and returns whether the last
    micro-step ended an optimizer step. A loss the loop drops (NaN/inf) is simply not
    backpropagated: no micro-step was taken."""

    def __init__(self, task, engine, batches: Sequence[Batch]):
        self.task, self.engine, self.batches = task, engine, list(batches)
        steps = engine.config["gradient_accumulation_steps"]
        if steps % len(self.batches):
            raise ValueError(f"GradCache over {len(self.batches)} micro-batches needs an engine "
                             "that accumulates a multiple of that many micro-steps "
                             f"(gradient_accumulation_steps={steps})")
        device = torch.device(engine.device)
        self._states, per_batch, shared = [], [], ()
        with torch.no_grad():
            for batch in self.batches:
                self._states.append(_rng_state(device))
                rows, shared = task.embed(engine, batch)
                per_batch.append(rows)
        self._after = _rng_state(device)
        self._sizes = [len(rows[0]) for rows in per_batch]
        # leaves of the loss graph: the cached features of all K micro-batches, concatenated
        self._rows = [torch.cat(parts).requires_grad_() for parts in zip(*per_batch)]
        self._shared = [s.detach().requires_grad_() for s in shared]
        with torch.enable_grad():
            self.loss, self.values = task.embedding_loss(self._rows, self._shared)

    def backward(self) -> bool:
        leaves = [*self._rows, *self._shared]
        grads = torch.autograd.grad(self.loss, leaves, allow_unused=True)
        row_grads = [g.split(self._sizes) for g in grads[:len(self._rows)]]
        shared_grads = grads[len(self._rows):]
        device = torch.device(self.engine.device)
        k, boundary = len(self.batches), False
        for i, batch in enumerate(self.batches):
            _set_rng_state(self._states[i], device)
            rows, shared = self.task.embed(self.engine, batch)
            surrogate = sum((r * g[i]).sum() for r, g in zip(rows, row_grads))
            if i == 0:  # the shared scalars are the same in every forward: their gradient once
                surrogate = surrogate + sum((s * g).sum() for s, g in zip(shared, shared_grads)
                                            if g is not None)
            # DeepSpeed divides every micro-step by its accumulation steps (grad_accum x K);
            # the group's K micro-steps carry one loss, so they must add up to it
            self.engine.backward(surrogate * k)
            boundary = self.engine.step()
        _set_rng_state(self._after, device)  # the stream continues as after step 1
        self.loss = self.loss.detach()
        return boundary
