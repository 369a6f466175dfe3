"""The optimizer's parameter groups, built in one place for every task: which parameters train,
the learning rate of each and its weight decay.

- Frozen towers (`train.lock_image`, `train.lock_text`; OpenCLIP's --lock-image / --lock-text,
  LiT): the tower's parameters get requires_grad=False and stay out of the optimizer, so they
  get no gradient buffers, no AdamW moments (the optimizer state shrinks by 2 floats per frozen
  weight) and no weight decay: they leave training bit for bit as they came.
  `train.lock_image_unlocked_layers=N` keeps the image tower's last N blocks trainable, and
  what follows them (final norm, projection); OpenCLIP's --lock-image-unlocked-groups G counts
  the projection as a group of its own: G >= 2 is our N = G - 1.
- Layer-wise learning-rate decay (`train.layer_decay=d`; BEiT's `LayerDecayValueAssigner`,
  also in OpenCLIP's and METER's fine-tuning): in each encoder stack of L blocks, block i
  (0-based, input side first) trains at lr * d^(L - i), the embeddings (patch/word/position
  embeddings, class token, pre-norm) at lr * d^(L + 1), what follows the blocks (final norm,
  projection) at lr. Stacks: each image tower (ViT, or Swin with its blocks counted across
  stages, a patch merging with the block after it), each text tower, and the single-stream
  Transformer (its embeddings: text, patches or regions, visual norm, end token).
- Fine-tuning task heads (`train.head_lr_mult`) train at lr * mult; everything else (fusion
  layers over towers, projections, logit scale) at lr.
- Weight decay: none on gains, biases, positions, class tokens and the logit scale (`no_decay`).

Every lr of the schedule (warmup, cosine, floor `train.min_lr`) is multiplied by the group's
`lr_scale`: the schedule's LambdaLR scales each group's own initial lr. Each group also names
its parameters (`names`), so what trains at which lr can be read back from the optimizer.
Towers are found by their module type, wherever the model holds them (a dual tower, the towers
of a combined model, a fine-tuning backbone).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlp.config import ConfigError, TrainConfig
from vlp.models.joint import FinetunedModel
from vlp.models.single_stream import SingleStream
from vlp.models.towers import TextTower, VisionTower


def no_decay(name: str, p: nn.Parameter) -> bool:
    """CLIP/OpenCLIP's exclusion rule: every parameter with fewer than 2 dims, plus position /
    token tables that are not matmul weights."""
    return p.ndim < 2 or "pos_embed" in name or "cls_token" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no decay] over the trainable parameters (see `no_decay`)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


@dataclass
class Stack:
    """An encoder stack: its parameters' layer ids (0: embeddings, 1..num_layers: the blocks,
    num_layers + 1: what follows them), keyed by id(parameter)."""

    kind: str  # "image", "text", "single_stream"
    where: str  # the module's name in the model, for messages
    num_layers: int
    layer: dict[int, int]


def _stack(kind: str, where: str, module: nn.Module, embeddings: tuple[str, ...],
           blocks: list[tuple[str, ...]], only: tuple[str, ...] = (),
           skip: tuple[str, ...] = ()) -> Stack:
    """Layer ids of `module`'s parameters (`only`: those under these prefixes; `skip`: not
    those): `embeddings` prefixes -> 0, `blocks[k]` prefixes -> k + 1, the rest -> L + 1."""
    L = len(blocks)
    layer = {}
    for rel, p in module.named_parameters():
        if (only and not rel.startswith(only)) or (skip and rel.startswith(skip)):
            continue
        if rel.startswith(embeddings):
            layer[id(p)] = 0
        else:
            layer[id(p)] = next((k + 1 for k, prefixes in enumerate(blocks)
                                 if rel.startswith(prefixes)), L + 1)
    return Stack(kind, where, L, layer)


def _swin_blocks(swin: nn.Module, prefix: str = "swin.") -> list[tuple[str, ...]]:
    """A Swin's blocks in order, across stages; the merging that feeds a stage goes with its
    first block."""
    blocks = []
    for s, stage in enumerate(swin.stages):
        for j in range(len(stage.blocks)):
            prefixes = (f"{prefix}stages.{s}.blocks.{j}.", f"{prefix}stages.{s}.rel_pos.{j}.")
            if j == 0 and s > 0:
                prefixes += (f"{prefix}merges.{s - 1}.",)
            blocks.append(prefixes)
    return blocks


def _vision_stack(where: str, tower: VisionTower) -> Stack:
    if tower.cfg.arch == "swin":
        return _stack("image", where, tower, ("swin.embed.",), _swin_blocks(tower.swin))
    blocks = [(f"transformer.blocks.{i}.",) for i in range(len(tower.transformer.blocks))]
    return _stack("image", where, tower, ("embed.", "ln_pre."), blocks)


def encoder_stacks(model: nn.Module) -> list[Stack]:
    """Every encoder stack in `model` (see the module docstring), in module order."""
    stacks = []
    for where, module in model.named_modules():
        if isinstance(module, VisionTower):
            stacks.append(_vision_stack(where, module))
        elif isinstance(module, TextTower):
            blocks = [(f"transformer.blocks.{i}.",) for i in range(len(module.transformer.blocks))]
            stacks.append(_stack("text", where, module, ("embed.",), blocks))
        elif isinstance(module, SingleStream):
            image = ()
            if module.kind == "roi_align" and module.swin_tokens:  # a Swin of its own
                image = ("swin.",)
                stacks.append(_stack("image", where, module, ("swin.embed.",),
                                     _swin_blocks(module.swin), only=image))
            elif module.kind == "roi_align":  # a patch encoder of its own before the regions
                image = ("patch_embed.", "visual_encoder.")
                blocks = [(f"visual_encoder.blocks.{i}.",)
                          for i in range(len(module.visual_encoder.blocks))]
                stacks.append(_stack("image", where, module, ("patch_embed.",), blocks,
                                     only=image))
            blocks = [(f"transformer.blocks.{i}.",) for i in range(len(module.transformer.blocks))]
            stacks.append(_stack("single_stream", where, module,
                                 ("text_embed.", "patch_embed.", "region_embed.", "visual_norm.",
                                  "end_token"), blocks, skip=image))
    return stacks


def _frozen(stacks: list[Stack], train: TrainConfig) -> set[int]:
    """ids of the parameters the lock_* keys freeze; a key that cannot apply is a ConfigError
    naming it."""
    frozen: set[int] = set()
    for key, kind in (("lock_image", "image"), ("lock_text", "text")):
        if not getattr(train, key):
            continue
        towers = [s for s in stacks if s.kind == kind]
        if not towers:
            has = ", ".join(sorted({s.kind for s in stacks})) or "none"
            raise ConfigError(f"train.{key}=true: this model has no {kind} tower to freeze "
                              f"(its encoder stacks: {has}); drop train.{key}")
        for s in towers:
            keep = train.lock_image_unlocked_layers if kind == "image" else 0
            if keep > s.num_layers:
                raise ConfigError(f"train.lock_image_unlocked_layers={keep} but the image tower "
                                  f"({s.where or 'the model'}) has {s.num_layers} blocks; "
                                  f"choose 0..{s.num_layers}")
            # keep > 0: layer ids above L - keep (the last blocks and what follows) train
            frozen |= {pid for pid, layer in s.layer.items()
                       if keep == 0 or layer <= s.num_layers - keep}
    return frozen


def lr_scales(model: nn.Module, stacks: list[Stack], train: TrainConfig) -> dict[int, float]:
    """id(parameter) -> its lr multiplier (layer decay, head_lr_mult; 1 elsewhere)."""
    scale: dict[int, float] = {}
    if train.layer_decay != 1.0:
        for s in stacks:
            for pid, layer in s.layer.items():
                scale.setdefault(pid, train.layer_decay ** (s.num_layers + 1 - layer))
    if train.head_lr_mult != 1.0:
        heads = [m.head for m in model.modules() if isinstance(m, FinetunedModel)]
        if not heads:
            raise ConfigError(f"train.head_lr_mult={train.head_lr_mult}: this model has no "
                              "fine-tuning task head; drop the key (or set it to 1)")
        for head in heads:
            for p in head.parameters():
                scale[id(p)] = train.head_lr_mult  # a head tied to an embedding: the head's lr
    return scale


def build_param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Freeze what `train` locks (requires_grad=False) and return the AdamW parameter groups of
    the rest: one per (lr scale, weight decay), larger scales first, decayed before not, each
    {"params", "names", "lr": train.lr * scale, "lr_scale", "weight_decay"}. Without locks or
    multipliers: exactly `param_groups`' two groups."""
    stacks = encoder_stacks(model)
    frozen = _frozen(stacks, train)
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    scales = lr_scales(model, stacks, train)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale, decays = scales.get(id(p), 1.0), not no_decay(name, p)
        group = groups.setdefault((scale, decays), {
            "params": [], "names": [], "lr": train.lr * scale, "lr_scale": scale,
            "weight_decay": train.weight_decay if decays else 0.0})
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise ConfigError("every parameter is frozen (train.lock_image / train.lock_text): "
                          "nothing would train; unlock a tower")
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]
