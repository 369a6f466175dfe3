"""Swin towers, side by side (not a test; bench/README.md records results).

1. `--part hf`: a training step of vlp's Swin dual tower against `transformers.SwinModel` (5.x,
   attn_implementation="sdpa") + the same text tower, projections and logit scale, at the same
   shape: the same inputs, loss (`vlp.objectives.clip_loss`), fused AdamW and threads. Shapes:
   `shapes` (configs/pretrain/clip_swin_shapes.yaml's image tower, batch 128) and `swin-t`
   (Swin-T at 224 px, batch 16, with a 256 x 4 text tower). fp32 and bf16 autocast.
2. `--part growth`: a training step of a ViT and a Swin image tower alone (pooled, projected,
   a squared-norm loss, AdamW) at image sizes 64, 128, 256, 384 with the same `width`, patch and
   number of blocks (ViT: 6 layers of 64 wide, 2 heads; Swin: depths 2-2-2 from 64 wide, heads
   2-4-8, window 8), batch 8, bf16 autocast: how each grows with the image.

This CPU's timings drift and other processes share it, so after warm-up the models alternate
round by round (the first one alternates too); each round times `--steps` steps of each; the
report gives median times and the median of the per-round ratios. CPU seconds per wall second
are printed per round: ~`--threads` on a quiet machine, lower when other processes took cores.

    python bench/swin_bench.py                        # both parts (~10 min on 2 cores)
    python bench/swin_bench.py --part hf --shapes shapes --out swin.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from torch import nn

from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.models import DualTower
from vlp.models.towers import TextTower, VisionTower
from vlp.objectives import clip_loss

SHAPES = {
    "shapes": dict(image_size=64, patch_size=4, width=32, depths=(2, 2, 2), heads=(1, 2, 4),
                   window=4, batch=128, text=(128, 4, 4), context=32, embed_dim=128, vocab=1000),
    "swin-t": dict(image_size=224, patch_size=4, width=96, depths=(2, 2, 6, 2),
                   heads=(3, 6, 12, 24), window=7, batch=16, text=(256, 4, 4), context=32,
                   embed_dim=256, vocab=8000),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="hf,growth", help="comma list of hf, growth")
    p.add_argument("--shapes", default="shapes,swin-t", help=f"hf part: {', '.join(SHAPES)}")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--sizes", default="64,128,256,384", help="growth part: image sizes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args()


# ------------------------------------------------------------------ models
def _text_cfg(s: dict) -> TextConfig:
    w, layers, heads = s["text"]
    return TextConfig(width=w, layers=layers, heads=heads, context_length=s["context"])


def _swin_cfg(s: dict) -> VisionConfig:
    return VisionConfig(arch="swin", image_size=s["image_size"], patch_size=s["patch_size"],
                        width=s["width"], stage_depths=tuple(s["depths"]),
                        stage_heads=tuple(s["heads"]), window_size=s["window"], pool="mean")


def build_ours(s: dict) -> nn.Module:
    cfg = ModelConfig(embed_dim=s["embed_dim"], vision=_swin_cfg(s), text=_text_cfg(s))
    return DualTower(cfg, vocab_size=s["vocab"])


class HFSwinDual(nn.Module):
    """transformers.SwinModel (pooler_output) + vlp's text tower, projections, logit scale."""

    def __init__(self, s: dict):
        super().__init__()
        from transformers import SwinConfig, SwinModel

        cfg = SwinConfig(image_size=s["image_size"], patch_size=s["patch_size"],
                         embed_dim=s["width"], depths=list(s["depths"]),
                         num_heads=list(s["heads"]), window_size=s["window"],
                         drop_path_rate=0.0)
        self.swin = SwinModel._from_config(cfg, attn_implementation="sdpa")
        self.proj = nn.Linear(self.swin.num_features, s["embed_dim"], bias=False)
        self.text = TextTower(_text_cfg(s), s["vocab"], s["embed_dim"])
        self.logit_scale = nn.Parameter(torch.full((1,), 2.659))

    def forward(self, pixels, ids, mask):
        img = nn.functional.normalize(self.proj(self.swin(pixels).pooler_output), dim=-1)
        txt = nn.functional.normalize(self.text(ids, mask), dim=-1)
        return img, txt, self.logit_scale.clamp(max=4.6052).exp()[0]


class TowerLoss(nn.Module):
    """An image tower alone: a squared-norm loss on its projected pooled output."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.tower = VisionTower(cfg, 64)

    def forward(self, pixels):
        return self.tower(pixels).float().square().mean()


# ------------------------------------------------------------------ timing
class Runner:
    def __init__(self, model: nn.Module, step_loss, precision: str):
        self.model, self.step_loss = model.train(), step_loss
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())

    def step(self) -> None:
        with self.autocast:
            loss = self.step_loss(self.model)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        wall = time.perf_counter() - t
        return wall / steps, (time.process_time() - c) / wall


def interleaved(runners: dict[str, Runner], a: argparse.Namespace, label: str) -> dict:
    """Median seconds/step per runner and its CPU use, rounds alternating the order."""
    for r in runners.values():
        for _ in range(a.warmup):
            r.step()
    times = {k: [] for k in runners}
    util = {k: [] for k in runners}
    names = list(runners)
    for i in range(a.rounds):
        for k in (names if i % 2 == 0 else names[::-1]):
            t, u = runners[k].timed(a.steps)
            times[k].append(t)
            util[k].append(u)
        print(f"  {label} round {i}: " + ", ".join(
            f"{k} {times[k][-1]:.3f} s (cpu {util[k][-1]:.2f})" for k in names), flush=True)
    return {"times": times, "util": util, "median": {k: statistics.median(v)
                                                     for k, v in times.items()}}


def _ratio(times: dict, slow: str, fast: str) -> float:
    """Median over rounds of times[slow] / times[fast] (> 1: `fast` is faster)."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast]))


def part_hf(a: argparse.Namespace) -> dict:
    results = {}
    for shape in a.shapes.split(","):
        s = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        B, L = s["batch"], s["context"]
        pixels = torch.randn(B, 3, s["image_size"], s["image_size"], generator=g)
        lengths = torch.randint(8, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        ids = torch.randint(1, s["vocab"], (B, L), generator=g) * mask

        def loss(model):
            img, txt, scale = model(pixels, ids, mask)
            return clip_loss(img.float(), txt.float(), scale.float())["contrastive_loss"]

        torch.manual_seed(0)
        n_ours = sum(p.numel() for p in build_ours(s).visual.parameters())
        n_hf = sum(p.numel() for p in HFSwinDual(s).swin.parameters())
        print(f"{shape}: image tower params ours {n_ours / 1e6:.3f}M (with projection), "
              f"SwinModel {n_hf / 1e6:.3f}M; batch {B}")
        for precision in a.precisions.split(","):
            torch.manual_seed(0)
            runners = {"ours": Runner(build_ours(s), loss, precision),
                       "SwinModel": Runner(HFSwinDual(s), loss, precision)}
            r = interleaved(runners, a, f"{shape} {precision}")
            r["ratio"] = _ratio(r["times"], "SwinModel", "ours")
            r["samples_s"] = {k: B / v for k, v in r["median"].items()}
            results[f"{shape}/{precision}"] = r
    print("\nratio = ours / SwinModel samples/s (median of per-round ratios)")
    print("| shape | precision | ours samples/s | SwinModel samples/s | ratio |\n"
          "|---|---|---|---|---|")
    for key, r in results.items():
        shape, precision = key.split("/")
        print(f"| {shape} | {precision} | {r['samples_s']['ours']:.1f} | "
              f"{r['samples_s']['SwinModel']:.1f} | {r['ratio']:.2f}x |")
    return results


def part_growth(a: argparse.Namespace) -> dict:
    width, patch, batch = 64, 8, 8
    results = {}
    for size in (int(x) for x in a.sizes.split(",")):
        vit = VisionConfig(image_size=size, patch_size=patch, width=width, layers=6, heads=2)
        swin = VisionConfig(arch="swin", image_size=size, patch_size=patch, width=width,
                            stage_depths=(2, 2, 2), stage_heads=(2, 4, 8), window_size=8,
                            pool="mean")
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        runners = {"vit": Runner(TowerLoss(vit), lambda m: m(pixels), "bf16"),
                   "swin": Runner(TowerLoss(swin), lambda m: m(pixels), "bf16")}
        r = interleaved(runners, a, f"{size}px")
        r["vit_over_swin"] = _ratio(r["times"], "vit", "swin")
        results[size] = r
    first = min(results)
    print(f"\nbatch {batch}, bf16 autocast; ViT {width} wide x 6 layers (2 heads), Swin "
          f"{width}-{2 * width}-{4 * width} wide x 2-2-2 (heads 2-4-8, window 8), patch {patch}")
    print("| image | ViT tokens | ViT ms/step | × at 64 | Swin tokens (stage 1) | Swin ms/step | "
          "× at 64 | ViT / Swin |\n|---|---|---|---|---|---|---|---|")
    for size, r in results.items():
        m, m0 = r["median"], results[first]["median"]
        g = size // patch
        print(f"| {size} | {g * g + 1} | {1000 * m['vit']:.0f} | {m['vit'] / m0['vit']:.1f} | "
              f"{g * g} | {1000 * m['swin']:.0f} | {m['swin'] / m0['swin']:.1f} | "
              f"{r['vit_over_swin']:.2f} |")
    return results


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} threads, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    out = {"args": vars(a)}
    parts = a.part.split(",")
    if "hf" in parts:
        out["hf"] = part_hf(a)
    if "growth" in parts:
        out["growth"] = part_growth(a)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
