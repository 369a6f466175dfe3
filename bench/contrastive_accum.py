"""Peak memory and step time of `train.contrastive_accum=K` (GradCache) with micro-batches of
B/K against one contrastive batch of B. A side-by-side benchmark (not a test); bench/README.md
has results.

Every row is a fresh child process (so its peak memory is its own) that builds the default
dual tower (or `--width/--layers/--image-size`), the dual-tower recipe and a real one-process
DeepSpeed engine (ZeRO-2, `--precision`, accumulation K micro-steps), then trains on random
pixels and captions of random length:

    K = 1     recipe.loss -> engine.backward -> engine.step, batch B        (what the loop runs)
    K > 1     vlp.engine.gradcache.CachedStep over K micro-batches of B/K    (what the loop runs)

Reported per K: the median step time over `--steps` timed steps after one warm-up step, and
the memory of a training step: on CPU the process's peak resident memory (ru_maxrss) minus its
resident memory after the engine was built (the model, optimizer and DeepSpeed, before any
step), on CUDA torch.cuda.max_memory_allocated minus memory_allocated at the same point. The
rows alternate over `--rounds` rounds (the order reversed every round) and the ratios to K=1
are taken within each round.

    python bench/contrastive_accum.py                          # ~4 min on 2 cores
    python bench/contrastive_accum.py --batch 1024 --ks 1,4,16 --out accum.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    """One row, in this (fresh) process: prints its JSON."""
    import torch

    from vlp.config import PretrainConfig, TrainConfig
    from vlp.data.batch import Batch
    from vlp.engine import dist, gradcache
    from vlp.engine.engine import Engine
    from vlp.models import DualTower
    from vlp.recipes.dual_tower import DualTowerRecipe

    torch.set_num_threads(args.threads)
    world = dist.init()
    cfg = PretrainConfig()
    m = cfg.model
    m.vision.width = m.text.width = args.width
    m.vision.layers = m.text.layers = args.layers
    m.vision.image_size = args.image_size
    k, micro = args.child, args.batch // args.child
    vocab, length = 1000, m.text.context_length
    recipe = DualTowerRecipe(cfg, tokenizer=None, world_size=1)
    train = TrainConfig(batch_size=micro, grad_accum=k, steps=1000, lr=1e-4, warmup_steps=0,
                        precision=args.precision)
    torch.manual_seed(0)
    engine = Engine(DualTower(m, vocab), train, world)
    engine.module.train()
    cuda = torch.device(engine.device).type == "cuda"

    def batch(i: int) -> Batch:
        g = torch.Generator().manual_seed(i)
        lengths = torch.randint(8, length + 1, (micro,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        return Batch(keys=[str(j) for j in range(micro)],
                     input_ids=torch.randint(1, vocab, (micro, length), generator=g) * mask,
                     attention_mask=mask,
                     pixel_values=torch.randn(micro, 3, args.image_size, args.image_size,
                                              generator=g))

    def step(s: int) -> float:
        group = [batch(s * k + i) for i in range(k)]
        t = time.perf_counter()
        if k == 1:
            loss, _ = recipe.loss(engine, group[0])
            engine.backward(loss)
            assert engine.step()
        else:
            assert gradcache.CachedStep(recipe, engine, group).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    base_rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step(0)  # warm-up (the optimizer's states are made here, in every row alike)
    times = [step(s) for s in range(1, args.steps + 1)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"k": k, "micro_batch": micro, "batch": args.batch, "step_s": statistics.median(times),
           "step_times": [round(t, 4) for t in times], "base_rss_mb": round(base_rss, 1),
           "peak_rss_mb": round(peak_rss, 1), "step_mem_mb": round(peak_rss - base_rss, 1)}
    if cuda:
        out["step_mem_mb"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512, help="the contrastive batch B")
    p.add_argument("--ks", default="1,2,4,8", help="micro-batches per contrastive batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default="")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    ks = [int(k) for k in args.ks.split(",")]
    if any(args.batch % k for k in ks):
        p.error(f"--batch {args.batch} must be a multiple of every K in --ks {args.ks}")
    rows: dict[int, list[dict]] = {k: [] for k in ks}
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(args.rounds):
        order = ks if r % 2 == 0 else ks[::-1]
        this_round = {}
        for k in order:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(k)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
            if proc.returncode or line is None:
                sys.exit(f"K={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            row = json.loads(line[4:])
            print(f"round {r + 1} K={k}: {row}", flush=True)
            rows[k].append(row)
            this_round[k] = row["step_s"]
        for k in ks:
            ratios[k].append(this_round[k] / this_round[ks[0]])
    table = []
    for k in ks:
        table.append({"k": k, "micro_batch": args.batch // k,
                      "step_s": statistics.median(r["step_s"] for r in rows[k]),
                      "time_vs_first": statistics.median(ratios[k]),
                      "step_mem_mb": statistics.median(r["step_mem_mb"] for r in rows[k]),
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows[k])})
    print(f"\ncontrastive batch {args.batch}, {args.precision}, {args.threads} threads, width "
          f"{args.width} x {args.layers} layers, image {args.image_size}")
    print("| K | micro-batch | step s | time vs K=" f"{ks[0]} | step memory MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['k']} | {t['micro_batch']} | {t['step_s']:.3f} | "
              f"{t['time_vs_first']:.2f}x | {t['step_mem_mb']:.0f} | {t['peak_rss_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": table,
                                              "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
