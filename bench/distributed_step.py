"""Per-step time of `vlp pretrain` with 1 vs 2 processes on this machine, and the cost of
activation checkpointing. A side-by-side benchmark (not a test); bench/README.md has results.

Every row is a real `vlp pretrain` run on the shapes world (the default model, bf16, ZeRO-2,
eval off, no checkpoints) with the same *global* batch, launched as a user would:

    1 process      python -m vlp pretrain train.batch_size=B            (all cores)
    2 processes    deepspeed --num_gpus 2 --module vlp pretrain train.batch_size=B/2
                   (gloo on CPU; each process gets cores/2 threads)
    1 process + activation checkpointing (train.grad_checkpointing=true)

The step time is read from the runs' own train_log.jsonl (`time_s` per step): the median of
per-step differences after `--warmup` steps, so start-up, data generation and the tokenizer are
not counted. Rows run one after another, never concurrently (2 cores).

    python bench/distributed_step.py                       # ~4 min
    python bench/distributed_step.py --steps 60 --batch 256 --out bench_dist.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, nproc: int, overrides: list[str], steps: int, warmup: int, out: Path) -> dict:
    args = ["--out", str(out / name), "--no-progress", f"train.steps={steps}",
            "train.save_every=0", "eval.at_end=false", "train.log_every=1", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlp", "pretrain", *args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()),
               "--module", "vlp", "pretrain", *args]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in log if "loss" in r and "event" not in r]
    deltas = [b - a for a, b in zip(times[warmup:], times[warmup + 1:])]
    return {"name": name, "processes": nproc, "step_s": statistics.median(deltas),
            "steps_timed": len(deltas)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="global batch (per step)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    common = ["train.precision=bf16"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = [
            run("1 process", 1, [*common, f"train.batch_size={args.batch}"], args.steps,
                args.warmup, out),
            run("2 processes", 2, [*common, f"train.batch_size={args.batch // 2}"], args.steps,
                args.warmup, out),
            run("1 process, activation checkpointing", 1,
                [*common, f"train.batch_size={args.batch}", "train.grad_checkpointing=true"],
                args.steps, args.warmup, out),
        ]
    base = rows[0]["step_s"]
    print(f"\nglobal batch {args.batch}, {os.cpu_count()} cores, median of "
          f"{rows[0]['steps_timed']} steps after {args.warmup} warm-up steps\n")
    print("| run | processes | ms/step | samples/s | vs 1 process |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['processes']} | {1000 * r['step_s']:.0f} | "
              f"{args.batch / r['step_s']:.0f} | {r['step_s'] / base:.2f}x time |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
