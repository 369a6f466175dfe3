"""Training-step throughput: vlp's DualTower against `transformers.CLIPModel` of the same shape.

A side-by-side benchmark (not a test); `bench/README.md` records results. Both models get the
same dimensions, batch, inputs, precision, loss (`vlp.objectives.clip_loss` on the L2-normalised
features), optimizer (fused AdamW, as in vlp's engine) and thread count; CLIPModel runs
with attn_implementation="sdpa". A step = forward + symmetric InfoNCE + backward + AdamW step.

This CPU's timings drift 10-25% between runs, so after warm-up the two models alternate, round
by round (the one that goes first alternates too); each round times `--steps` steps of each and
the report gives the median samples/s and the median of the per-round ratios (ours / CLIPModel).
Each round also prints CPU seconds per wall second: ~`--threads` on a quiet machine, lower
when other processes took the cores (such rounds are slow for reasons outside the models).

Achieved GFLOP/s = training FLOPs per step (`train_flops`, analytic: torch's FlopCounterMode
does not count CPU SDPA kernels) / median step time, the same count for both models, and its
share of a 2048^3 matmul peak measured in the same run (fp32 and bf16, median of 10).

    python bench/clip_throughput.py                     # fp32 and bf16 autocast, batch 128
    python bench/clip_throughput.py --precisions fp32,bf16,pure-bf16 --compile --out bench.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.models import DualTower
from vlp.objectives import clip_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16",
                   help="comma list of fp32, bf16 (autocast, as vlp's engine runs it), "
                        "pure-bf16 (bf16 weights, no autocast)")
    p.add_argument("--compile", action="store_true",
                   help="add a bf16 row with torch.compile applied to both models")
    p.add_argument("--full-length", action="store_true",
                   help="every caption fills the context (default: random lengths 8..context, "
                        "right-padded, as real captions are)")
    # model shape: a 22.5M-parameter CLIP (ViT 256x6 at 128px/16, text 256x6 at 32 tokens)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=49408)
    p.add_argument("--act", default="quick_gelu", choices=["quick_gelu", "gelu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    bad = set(a.precisions.split(",")) - {"fp32", "bf16", "pure-bf16"}
    if bad:
        p.error(f"unknown --precisions {sorted(bad)}; choose from fp32, bf16, pure-bf16")
    return a


def build_ours(a: argparse.Namespace) -> torch.nn.Module:
    shape = dict(width=a.width, layers=a.layers, heads=a.heads, mlp_ratio=4.0, act=a.act)
    cfg = ModelConfig(embed_dim=a.embed_dim,
                      vision=VisionConfig(image_size=a.image_size, patch_size=a.patch_size,
                                          **shape),
                      text=TextConfig(context_length=a.context, **shape))
    return DualTower(cfg, vocab_size=a.vocab_size)


def build_peer(a: argparse.Namespace) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    shape = dict(hidden_size=a.width, intermediate_size=4 * a.width, num_hidden_layers=a.layers,
                 num_attention_heads=a.heads, hidden_act=a.act, layer_norm_eps=1e-5)
    text = CLIPTextConfig(vocab_size=a.vocab_size, max_position_embeddings=a.context,
                          eos_token_id=a.vocab_size - 1, pad_token_id=0, **shape)
    vision = CLIPVisionConfig(image_size=a.image_size, patch_size=a.patch_size, **shape)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                     projection_dim=a.embed_dim)
    return CLIPModel._from_config(cfg, attn_implementation="sdpa")


def make_batch(a: argparse.Namespace) -> dict:
    """Random pixels; random ids ending in end-of-text (id vocab-1, CLIP's pooling position)."""
    g = torch.Generator().manual_seed(a.seed)
    B, L = a.batch_size, a.context
    lengths = (torch.full((B,), L) if a.full_length else torch.randint(8, L + 1, (B,), generator=g))
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L), 1 = real token
    ids = torch.randint(1, a.vocab_size - 1, (B, L), generator=g) * mask  # pad id 0
    ids[torch.arange(B), lengths - 1] = a.vocab_size - 1
    pixels = torch.randn(B, 3, a.image_size, a.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def features_ours(model, b):
    return model(b["pixel_values"], b["input_ids"], b["attention_mask"])


def features_peer(model, b):
    out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                attention_mask=b["attention_mask"])
    return out.image_embeds, out.text_embeds, model.logit_scale.exp()


def train_flops(a: argparse.Namespace) -> float:
    """Training FLOPs of one step, counted analytically (the same number for both models).

    Forward per sample: 2 x (weights in matmuls) x tokens, i.e. per tower and layer
    2 * 12 d^2 * N (qkv 3d^2, out 1d^2, MLP 8d^2) plus attention 4 N^2 d (QK^T and AV, full
    square, causal not halved), the projections 2 d D, the B x B logits (2 matmuls, 2 B D
    each per sample), and the patch conv 2 * 3p^2 d * patches. Training = 3 x forward
    (backward computes input and weight gradients), except 2 x for the patch conv (no pixel
    gradient). Embedding lookups, norms, activations, softmax and AdamW are not counted. This
    equals torch's FlopCounterMode total on our bf16 step (where attention runs as bmm).
    """
    d, l, D, p = a.width, a.layers, a.embed_dim, a.patch_size
    n_img = (a.image_size // p) ** 2 + 1
    def tower(n):
        return l * (24 * d * d * n + 4 * n * n * d) + 2 * d * D
    fwd = tower(n_img) + tower(a.context) + 2 * 2 * a.batch_size * D
    conv = 2 * 3 * p * p * d * (n_img - 1)
    return (3.0 * fwd + 2.0 * conv) * a.batch_size


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n^3 matmul in `dtype`, median of `reps` after one warm-up."""
    x, y = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x @ y
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x @ y
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


class Runner:
    """One model + its AdamW + the step function, under one precision."""

    def __init__(self, model, features, batch, precision: str, compile_: bool):
        if precision == "pure-bf16":
            model = model.to(torch.bfloat16)
            batch = {**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)}
        self.model, self.batch, self.features = model.train(), batch, features
        self.fn = torch.compile(model) if compile_ else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    def step(self) -> None:
        with self.autocast:
            img, txt, scale = self.features(self.fn, self.batch)
            loss = clip_loss(img, txt, scale)["contrastive_loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> tuple[float, float]:
        """(seconds per step, CPU seconds per wall second) over `steps` steps. With T threads
        the second is ~T on a quiet machine and drops when other processes take the cores."""
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        wall = time.perf_counter() - t
        return wall / steps, (time.process_time() - c) / wall


def bench_row(a, precision: str, batch: dict, compile_: bool = False) -> dict:
    torch.manual_seed(a.seed)
    ours = Runner(build_ours(a), features_ours, batch, precision, compile_)
    torch.manual_seed(a.seed)
    peer = Runner(build_peer(a), features_peer, batch, precision, compile_)
    for r in (ours, peer):
        for _ in range(a.warmup):
            r.step()
    times = {"ours": [], "peer": []}  # seconds per step, one entry per round
    util = {"ours": [], "peer": []}  # CPU seconds per wall second in that round
    for i in range(a.rounds):
        for who in (("ours", "peer") if i % 2 == 0 else ("peer", "ours")):
            t, u = (ours if who == "ours" else peer).timed(a.steps)
            times[who].append(t)
            util[who].append(u)
        print(f"  {precision}{'+compile' if compile_ else ''} round {i}: ours "
              f"{times['ours'][-1]:.3f} s/step, CLIPModel {times['peer'][-1]:.3f} s/step "
              f"(cpu util {util['ours'][-1]:.2f}, {util['peer'][-1]:.2f})", flush=True)
    if min(util["ours"] + util["peer"]) < 0.9 * a.threads:
        print(f"  warning: cpu util below {0.9 * a.threads:.1f} in some rounds: other processes "
              "took cores; those rounds are slow (the medians absorb a minority of them)")
    B = a.batch_size
    return {"ours_samples_s": B / statistics.median(times["ours"]),
            "peer_samples_s": B / statistics.median(times["peer"]),
            "ratio": statistics.median(tp / to for to, tp in zip(times["ours"], times["peer"])),
            "ours_step_s": times["ours"], "peer_step_s": times["peer"],
            "ours_cpu_util": util["ours"], "peer_cpu_util": util["peer"]}


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    batch = make_batch(a)
    n_ours = sum(p.numel() for p in build_ours(a).parameters())
    n_peer = sum(p.numel() for p in build_peer(a).parameters())
    print(f"params: ours {n_ours / 1e6:.2f}M, CLIPModel {n_peer / 1e6:.2f}M; batch {a.batch_size}, "
          f"{a.threads} threads, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul 2048^3 peak (start): fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    flops = train_flops(a)
    print(f"training FLOPs per step (analytic): {flops / 1e9:.1f} GFLOP")

    rows = [(p, False) for p in a.precisions.split(",")]
    rows += [("bf16", True)] * a.compile
    results = {}
    for precision, compile_ in rows:
        name = precision + ("+compile" if compile_ else "")
        try:
            res = bench_row(a, precision, batch, compile_)
        except Exception as e:  # e.g. torch.compile without a working C++ compiler
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        results[name] = res
    # Measured again at the end and the higher kept: a busy neighbour or a cold start can only
    # lower a peak measurement (a first run here once read fp32 102 instead of ~168 GFLOP/s).
    end = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul 2048^3 peak (end): fp32 {end['fp32']:.0f} GFLOP/s, "
          f"bf16 {end['bf16']:.0f} GFLOP/s; the higher of start and end is used")
    peak = {k: max(peak[k], end[k]) for k in peak}
    for name, res in results.items():
        pk = peak["fp32" if name == "fp32" else "bf16"]
        for who in ("ours", "peer"):
            res[f"{who}_gflops"] = flops * res[f"{who}_samples_s"] / a.batch_size / 1e9
            res[f"{who}_pct_peak"] = 100 * res[f"{who}_gflops"] / pk

    print("\nratio = ours / CLIPModel samples/s, median over rounds; % of the matmul peak of the "
          "precision the matmuls run in (bf16 for bf16 rows)")
    print(f"| precision | ours samples/s | CLIPModel samples/s | ratio | ours GFLOP/s (% peak) "
          f"| CLIPModel GFLOP/s (% peak) |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ours_samples_s']:.1f} | {r['peer_samples_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['ours_gflops']:.0f} ({r['ours_pct_peak']:.0f}%) | "
              f"{r['peer_gflops']:.0f} ({r['peer_pct_peak']:.0f}%) |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "params_ours": n_ours, "params_peer": n_peer,
                       "peak_gflops": peak, "train_gflop_per_step": flops / 1e9,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
