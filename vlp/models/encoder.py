"""The one Transformer of vlp: pre-LN blocks on `scaled_dot_product_attention` (on CPU in bf16,
short sequences take the same attention written out instead: see `attention_math`).
`norm_first=False` gives BERT's post-LN blocks instead, so a Hugging Face BERT checkpoint loads
into it (vlp/models/bert_init.py).

Every tower (image, text) and the joint single-stream model use this module; what differs
between them is only the embedding in front and the attention mask passed in. A mask is either
boolean with True = "may attend" (SDPA's convention) or a float tensor added to the attention
scores (an additive bias: Swin's relative position bias plus its shifted-window mask), shaped to
broadcast to (..., heads, L, L). A block can also attend within groups of tokens instead of over
the whole sequence (`TokenGroups`: Swin's windows), so Swin is built from this same block.

Decoding one token at a time, a `KVCache` holds the keys and values of the tokens already
encoded: `transformer(x_new, mask, cache=cache)` runs only the new tokens, their queries attend
over the cached keys followed by their own, and their keys/values are appended. That is exact
wherever earlier tokens' states do not depend on later tokens (causal text, the prefix-LM mask's
prefix), as in a caption decoder.
"""
from __future__ import annotations

import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MaskKind = Literal["bidirectional", "causal", "prefix"]


class _QuickGELUFn(torch.autograd.Function):
    """x * sigmoid(1.702 x) = silu(z) / 1.702 with z = 1.702 x.

    d/dx [silu(1.702 x) / 1.702] = silu'(z): the two 1.702 factors cancel, so the backward is one
    `silu_backward` on the saved z. Plain autograd on the formula saves two tensors and runs
    five elementwise passes (three for the silu form) over the (B, L, mlp_ratio * width)
    activations, each into a fresh buffer. Forward + backward on (128, 65, 1024), 2-core CPU:
    bf16 24 -> 8 ms, fp32 77 -> 33 ms (fresh fp32 buffers this size page-fault on CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        z = x * 1.702
        ctx.save_for_backward(z)
        return F.silu(z).mul_(1 / 1.702)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, z)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x) (their checkpoints need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuickGELUFn.apply(x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    if name == "gelu_tanh":  # the tanh approximation (HF's gelu_new / gelu_pytorch_tanh)
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; choose one of gelu, quick_gelu, relu, "
                     "gelu_tanh")


def build_attention_mask(kind: MaskKind, seq_len: int, *, padding_mask: torch.Tensor | None = None,
                         prefix_len: torch.Tensor | int | None = None,
                         device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean attention mask, True where query i may attend key j.

    kind: "bidirectional" (every token sees every token), "causal" (j <= i), or "prefix"
    (prefix-LM: the first `prefix_len` tokens see each other bidirectionally, later tokens see the
    prefix plus earlier tokens). `padding_mask` (B, L) with 1 = real token hides padded keys:
    they get exactly zero weight, as under BERT's additive mask, while padded queries still
    attend the real keys (so BERT's outputs match at every position). Returns None for a plain
    bidirectional mask without padding (SDPA's fastest path), else a tensor of shape
    (B or 1, 1, L, L).
    """
    if padding_mask is not None:
        device = padding_mask.device
    i = torch.arange(seq_len, device=device)
    if kind == "bidirectional":
        mask = None
    elif kind == "causal":
        mask = (i[None, :] <= i[:, None])[None, None]  # (1, 1, L, L)
    elif kind == "prefix":
        if prefix_len is None:
            raise ValueError("a prefix mask needs prefix_len (an int or a (B,) tensor)")
        p = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        causal = i[None, :] <= i[:, None]  # (L, L)
        key_in_prefix = i[None, :] < p  # (B, 1, 1, L)
        mask = causal[None, None] | key_in_prefix
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose bidirectional, causal or prefix")
    if padding_mask is not None:
        keys = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        mask = keys if mask is None else (mask & keys)
    return mask


# Longest sequence for which `attention_math` replaces SDPA on CPU in bf16: up to here the
# (B, nh, L, L) probabilities it keeps for backward are no larger than the MLP's hidden
# activation (B, L, 4C), as nh * L <= 4C when head size is 64.
MATH_ATTENTION_MAX_LEN = 256


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + bias) v written out; same semantics as SDPA (a bool mask, True =
    may attend, a query that may attend no key gets zeros; or a float mask added to the scores).
    q, k, v: (..., nh, L, hs).

    Why it exists: on CPU in bf16, SDPA's fused kernel (aten::_scaled_dot_product_flash_
    attention_for_cpu) is slow for short sequences, its backward above all. Measured here
    (2-core EPYC, 1 thread, B=128, 4 heads of 64): forward+backward at L=65 126 ms fused vs
    29 ms written out; at L=257 147 vs 91 ms. In fp32 the fused kernel is the faster one.
    The scores are rounded to bf16 before the softmax (as in any eager attention under
    autocast): the error against fp64 is ~1.5x that of the fused kernel, both at the level of
    bf16's own rounding.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, L, L)
    if is_causal:
        L = q.shape[-2]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
    if attn_mask is None:
        return scores.softmax(dim=-1) @ v
    if attn_mask.dtype != torch.bool:
        if scores.dtype == torch.bfloat16 and scores.shape[-1] < 32:
            # rows shorter than one AVX-512 register of bf16 (Swin's 4x4 windows): the CPU's
            # bf16 softmax is slower there than an fp32 one (bench/README.md, Swin)
            return (scores.float() + attn_mask).softmax(dim=-1).to(v.dtype) @ v
        # otherwise the bias is rounded to the scores' dtype (bf16) like the scores themselves:
        # an fp32 add and softmax over (B, windows, nh, N, N) would be a large part of the work
        return (scores + attn_mask.to(scores.dtype)).softmax(dim=-1) @ v
    probs = scores.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1)
    # a fully masked row is NaN after the softmax; SDPA returns zeros there, and so do we
    return probs.masked_fill(~attn_mask, 0.0) @ v


class LayerKV:
    """One layer's cached keys and values, each (N, nh, S, hs) (None before the first tokens)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' k, v (N, nh, L, hs); -> every key and value (N, nh, S+L, hs)."""
        if self.keys is not None:
            k = torch.cat([self.keys, k], dim=-2)
            v = torch.cat([self.values, v], dim=-2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """The keys and values a Transformer computed for the tokens it has seen, one `LayerKV` per
    block; rows are sequences. Pass it as `Transformer.forward(..., cache=)`: the call's tokens
    come after the cached ones, and their attention mask covers the cached keys first, then
    their own, broadcasting to (N, nh, L, S + L). `select` keeps or reorders rows (a beam
    search's surviving hypotheses, finished captions dropped, one image's tokens given to
    several beams)."""

    def __init__(self, layers: int):
        self.layers = [LayerKV() for _ in range(layers)]

    def __len__(self) -> int:
        """How many positions are cached."""
        keys = self.layers[0].keys if self.layers else None
        return 0 if keys is None else keys.shape[-2]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (N',) long, in that order (repeats allowed)."""
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # fused: one matmul instead of three
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, cache: LayerKV | None = None) -> torch.Tensor:
        """x: (..., L, C) -> (..., L, C); the leading dims are batch dims (Swin: (B, windows)).
        attn_mask: bool (True = may attend) or float (added to the scores), broadcasting to
        (..., nh, L, L), or to (N, nh, L, S + L) with a `cache` of S earlier positions (whose
        keys/values come first; this call's are appended to it)."""
        *lead, L, C = x.shape
        qkv = self.qkv(x).view(*lead, L, 3, self.heads, C // self.heads)  # (..., L, 3, nh, hs)
        # Split on the qkv axis, then transpose views: the backward stacks dq, dk, dv straight
        # into the (..., L, 3, nh, hs) layout of the qkv output. (Unbinding a permuted
        # (3, B, nh, L, hs) view instead costs an extra copy of that gradient per layer.)
        q, k, v = (t.transpose(-3, -2) for t in qkv.unbind(-3))  # each (..., nh, L, hs), strided
        if cache is not None:
            if is_causal and cache.keys is not None:
                # SDPA aligns is_causal to the top-left corner: wrong once keys precede queries
                raise ValueError("is_causal with a non-empty KVCache is ambiguous; pass an "
                                 "attn_mask over the cached and the new keys instead")
            if len(lead) != 1:
                raise ValueError("a KVCache needs x of shape (N, L, C) (no token groups)")
            k, v = cache.extend(k, v)  # (N, nh, S + L, hs)
        if x.device.type == "cpu" and (
                (q.dtype == torch.bfloat16 and L <= MATH_ATTENTION_MAX_LEN)
                # a learned additive bias (Swin's relative positions): SDPA has no fused CPU
                # kernel that returns the mask's gradient, and its composite fallback wants the
                # bias expanded over the whole batch; written out, the bias broadcasts
                or (attn_mask is not None and attn_mask.requires_grad)):
            y = attention_math(q, k, v, attn_mask, is_causal)  # see its docstring for why
        else:
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in q's dtype
            if len(lead) > 1:
                # SDPA's fused kernels take (B, nh, L, hs) only (5-D inputs fall back to its
                # slower composite path): fold the group dims into the batch (a view) and give
                # the mask that batch
                q, k, v = (t.flatten(0, -4) for t in (q, k, v))  # (B * G, nh, L, hs)
                if attn_mask is not None:
                    attn_mask = attn_mask.expand(*lead, self.heads, L, L).flatten(0, -4)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(-3, -2).reshape(*lead, L, C)  # (..., L, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float, act: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenGroups(Protocol):
    """Attention within groups of tokens instead of over the whole sequence (Swin's windows).

    `split` (B, L, C) -> (B, G, N, C) runs between the block's norm and its attention (so tokens
    it adds, such as Swin's zero padding, enter the attention as zeros, as in Swin); `join`
    (B, G, N, C) -> (B, L, C) undoes it before the residual sum. The MLP sees the L tokens.
    """

    def split(self, x: torch.Tensor) -> torch.Tensor: ...

    def join(self, x: torch.Tensor) -> torch.Tensor: ...


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016; timm's DropPath): in training, each sample's
    residual branch `x` is dropped with probability p, and kept ones are scaled by 1/(1-p) so
    the expectation is the branch itself; the identity otherwise."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def set_drop_path(blocks, rate: float) -> None:
    """Give `blocks` (in forward order) timm's linear stochastic-depth schedule,
    torch.linspace(0, rate, n): none for the first block, `rate` for the last."""
    blocks = list(blocks)
    n = len(blocks)
    for i, block in enumerate(blocks):  # plain floats: towers are also built on "meta"
        block.drop_path = rate * i / (n - 1) if n > 1 else 0.0


class Block(nn.Module):
    """Residual block. Pre-LN (norm_first=True, GPT-2/CLIP/ViT/Swin): x + attn(ln_1(x)), then
    x + mlp(ln_2(x)). Post-LN (norm_first=False, BERT): ln_1(x + attn(x)), then
    ln_2(x + mlp(x)); ln_1/ln_2 are BERT's attention.output.LayerNorm / output.LayerNorm.
    With `groups`, the attention runs within each group (see TokenGroups) and `attn_mask` is
    per group, e.g. an additive (G, nh, N, N) bias. `drop_path` > 0: stochastic depth on both
    residual branches in training (set_drop_path).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, norm_eps: float,
                 norm_first: bool = True):
        super().__init__()
        self.norm_first = norm_first
        self.drop_path = 0.0
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_ratio, act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, groups: TokenGroups | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        p, training = self.drop_path, self.training
        if self.norm_first:
            x = x + drop_path(self._attend(self.ln_1(x), attn_mask, is_causal, groups, cache),
                              p, training)
            return x + drop_path(self.mlp(self.ln_2(x)), p, training)
        x = self.ln_1(x + drop_path(self._attend(x, attn_mask, is_causal, groups, cache), p,
                                    training))
        return self.ln_2(x + drop_path(self.mlp(x), p, training))

    def _attend(self, h: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
                groups: TokenGroups | None, cache: LayerKV | None = None) -> torch.Tensor:
        if groups is None:
            return self.attn(h, attn_mask, is_causal, cache)
        return groups.join(self.attn(groups.split(h), attn_mask, is_causal, cache))


class Transformer(nn.Module):
    """A stack of blocks: pre-LN with a final LayerNorm `ln_f` (default), or BERT's post-LN
    (norm_first=False), whose blocks end in a LayerNorm already, so `ln_f` is an Identity there
    (no parameters: the state dict holds the blocks and nothing else)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 act: str = "gelu", norm_eps: float = 1e-5, norm_first: bool = True):
        super().__init__()
        self.width = width
        self.norm_first = norm_first
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, norm_eps, norm_first)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, eps=norm_eps) if norm_first else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers) so depth keeps the
        # residual stream's variance in check.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, L, width) -> (B, L, width). With `cache` (made for this Transformer's
        layers): x holds the tokens after the cached ones, whose keys/values it appends; the
        mask then spans the cached keys and x's (see KVCache)."""
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(f"a KVCache of {len(cache.layers)} layers for a Transformer of "
                             f"{len(self.blocks)}")
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, attn_mask, is_causal, cache=cache.layers[i])
            elif self.grad_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask, is_causal)
        return self.ln_f(x)
