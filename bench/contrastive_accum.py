"""Peak memory and step time of `train.contrastive_accum=K` (GradCache) with micro-batches of
B/K against one contrastive batch of B. A side-by-side benchmark (not a test); bench/README.md
has results.

Every row is a fresh child process (so its peak memory is its own) that builds the default
dual tower (or `--width/--layers/--image-size`), the dual-tower recipe and a real one-process
DeepSpeed engine (ZeRO-2, `--precision`, accumulation K micro-steps), then trains on random
pixels and captions of random length:

    K = 1          recipe.loss -> engine.backward -> engine.step, batch B   (what the loop runs)
    K > 1          vlp.engine.gradcache.CachedStep over K micro-batches of B/K (the loop's
                   train.contrastive_accum=K): one contrastive batch of B
    K > 1, plain   the same K micro-batches with plain accumulation (train.grad_accum=K): K
                   contrastive batches of B/K, the same micro-batch shapes without the cached
                   forward, so the ratio of the two is GradCache's own cost

Reported per K: the median step time over `--steps` timed steps after one warm-up step, the
median CPU seconds of a step (process time: with `--threads 1` the work done, which other
jobs on the machine hardly change, unlike the wall time), and
the memory of a training step: on CPU the process's peak resident memory (ru_maxrss) minus its
resident memory after the engine was built (the model, optimizer and DeepSpeed, before any
step), on CUDA torch.cuda.max_memory_allocated minus memory_allocated at the same point. The
rows alternate over `--rounds` rounds (the order reversed every round) and the ratios are
taken within each round.

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
    plain = args.plain
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

    def step(s: int) -> tuple[float, float]:
        group = [batch(s * k + i) for i in range(k)]
        t, cpu = time.perf_counter(), time.process_time()
        if k == 1 or plain:
            for b in group:
                loss, _ = recipe.loss(engine, b)
                engine.backward(loss)
                boundary = engine.step()
            assert boundary
        else:
            assert gradcache.CachedStep(recipe, engine, group).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - cpu

    base_rss = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step(0)  # warm-up (the optimizer's states are made here, in every row alike)
    times, cpu = zip(*[step(s) for s in range(1, args.steps + 1)])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"k": k, "plain": plain, "micro_batch": micro, "batch": args.batch,
           "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
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
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    ks = [int(k) for k in args.ks.split(",")]
    if any(args.batch % k for k in ks):
        p.error(f"--batch {args.batch} must be a multiple of every K in --ks {args.ks}")
    configs = [(k, False) for k in ks] + [(k, True) for k in ks if k > 1]
    rows: dict[tuple, list[dict]] = {c: [] for c in configs}
    vs_big: dict[tuple, list[float]] = {c: [] for c in configs}
    vs_plain: dict[tuple, list[float]] = {c: [] for c in configs}
    cpu_vs_big: dict[tuple, list[float]] = {c: [] for c in configs}
    cpu_vs_plain: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        this_round = {}
        for k, plain in (configs if r % 2 == 0 else configs[::-1]):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", str(k)] + \
                (["--plain"] if plain else [])
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
            if proc.returncode or line is None:
                sys.exit(f"K={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            row = json.loads(line[4:])
            print(f"round {r + 1} K={k}{' plain' if plain else ''}: {row}", flush=True)
            rows[(k, plain)].append(row)
            this_round[(k, plain)] = row
        big = this_round[(ks[0], False)]
        for k, plain in configs:
            row = this_round[(k, plain)]
            vs_big[(k, plain)].append(row["step_s"] / big["step_s"])
            cpu_vs_big[(k, plain)].append(row["cpu_s"] / big["cpu_s"])
            if k > 1 and not plain:
                vs_plain[(k, plain)].append(row["step_s"] / this_round[(k, True)]["step_s"])
                cpu_vs_plain[(k, plain)].append(row["cpu_s"] / this_round[(k, True)]["cpu_s"])
    table = []
    for k, plain in configs:
        c = (k, plain)
        table.append({"k": k, "plain": plain, "micro_batch": args.batch // k,
                      "contrastive_batch": args.batch // k if plain else args.batch,
                      "step_s": statistics.median(r["step_s"] for r in rows[c]),
                      "time_vs_first": statistics.median(vs_big[c]),
                      "time_vs_plain": statistics.median(vs_plain[c]) if vs_plain[c] else None,
                      "cpu_s": statistics.median(r["cpu_s"] for r in rows[c]),
                      "cpu_vs_first": statistics.median(cpu_vs_big[c]),
                      "cpu_vs_plain": statistics.median(cpu_vs_plain[c]) if cpu_vs_plain[c]
                      else None,
                      "step_mem_mb": statistics.median(r["step_mem_mb"] for r in rows[c]),
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows[c])})
    print(f"\nbatch {args.batch} per step, {args.precision}, {args.threads} threads, width "
          f"{args.width} x {args.layers} layers, image {args.image_size}")
    print(f"| run | micro-batch | contrastive batch | step memory MB | peak RSS MB | step s | "
          f"CPU s | CPU vs K={ks[0]} | CPU vs plain accumulation | wall vs K={ks[0]} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        name = f"grad_accum={t['k']}" if t["plain"] else (
            f"contrastive_accum={t['k']}" if t["k"] > 1 else "one batch")
        ratio = f"{t['cpu_vs_plain']:.2f}x" if t["cpu_vs_plain"] else ""
        print(f"| {name} | {t['micro_batch']} | {t['contrastive_batch']} | "
              f"{t['step_mem_mb']:.0f} | {t['peak_rss_mb']:.0f} | {t['step_s']:.2f} | "
              f"{t['cpu_s']:.2f} | {t['cpu_vs_first']:.2f}x | {ratio} | "
              f"{t['time_vs_first']:.2f}x |")
    if args.out:
        runs = {f"{k}{'-plain' if plain else ''}": v for (k, plain), v in rows.items()}
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": table,
                                              "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
