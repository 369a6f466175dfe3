"""VCR evaluation time with each image encoded once per question vs once per sequence (not a
test; the README's VCR section and bench/README.md record results).

`VCRTask.predict` (the whole evaluation pass: reading images and region files, tokenizing,
collating, the model, softmax) over the shapes world's VCR val questions, 20 sequences a
question (4 answers, 4 rationales given each answer), with the current `VCRHead` (visual tokens
and grounded objects computed once per question, shared by its 20 sequences) and with the
former head (each sequence got the raw visual inputs, so the image was encoded 20 times),
copied here as `former_forward`. Same model, same questions; the two alternate round by round
(and which goes first alternates too). The per-question probabilities are checked equal.
Reported: median wall seconds and questions/s, the median of the per-round ratios, and the
same in CPU seconds of this process (one thread: the work done, which other processes on a
shared machine disturb less than the wall time).

Models: a 1-step `vlp pretrain` of configs/pretrain/vlbert_shapes.yaml (`regions`: single
stream over region features, what configs/finetune/vcr_shapes.yaml fine-tunes),
vlbert_shapes_roi_align.yaml (`roi_align`: a 2-layer patch encoder pooled over the boxes) and
clip_shapes.yaml (`dual_tower`: ViT 128 x 4 on 64-px images, with the fine-tuning default's
fresh 2-layer fusion); the VCR head is fresh (the time does not depend on the weights).

    python bench/vcr_eval.py                          # ~10 min, 1 thread
    python bench/vcr_eval.py --families dual_tower --benchmark-images 200 --rounds 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlp.cli import main as vlp_main
from vlp.config import FinetuneConfig
from vlp.data.synth import generate
from vlp.models.heads.vcr import VCRHead
from vlp.models.joint import JointEncoder
from vlp.tasks.vcr import VCRTask

CONFIGS = {"regions": "configs/pretrain/vlbert_shapes.yaml",
           "roi_align": "configs/pretrain/vlbert_shapes_roi_align.yaml",
           "dual_tower": "configs/pretrain/clip_shapes.yaml"}


def former_forward(self, backbone, *, input_ids, attention_mask, token_objects, visual):
    """VCRHead.forward before issue 16: the raw visual inputs repeated for every sequence."""
    b, g, c, length = input_ids.shape
    visual = dict(visual)
    boxes, box_mask = visual.pop("object_boxes", None), visual.pop("object_mask", None)

    def per_sequence(t):
        return None if t is None else t.repeat_interleave(g * c, dim=0)

    hidden = backbone(input_ids.reshape(-1, length), attention_mask.reshape(-1, length),
                      {k: per_sequence(v) for k, v in visual.items()},
                      token_objects=None if token_objects is None
                      else token_objects.reshape(-1, length),
                      object_boxes=per_sequence(boxes), object_mask=per_sequence(box_mask))
    return {"logits": self.scorer(hidden[:, 0]).view(b, g, c)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="regions,roi_align,dual_tower",
                   help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--benchmark-images", type=int, default=400,
                   help="shapes-world benchmark images (a fifth are VCR val images)")
    p.add_argument("--batch-size", type=int, default=32, help="eval.batch_size (questions)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", help="folder for the world and models (default: a temp folder)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args()


def timed_predict(task: VCRTask, model) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = task.predict(model, "val", progress=False)
    return time.perf_counter() - start, rows


@contextlib.contextmanager
def former_head():
    current = VCRHead.forward
    VCRHead.forward = former_forward
    try:
        yield
    finally:
        VCRHead.forward = current


def bench_family(family: str, world: Path, work: Path, args) -> dict:
    out = work / f"pre_{family}"
    if not (out / "model").is_dir():
        assert vlp_main(["pretrain", "--config", CONFIGS[family], "--out", str(out),
                         "--no-progress", f"data.train={world}/train", "data.val=",
                         "eval.at_end=false", "train.steps=1", "train.batch_size=16",
                         "train.save_every=0", "data.num_workers=0",
                         f"train.threads={args.threads}"]) == 0
    cfg = FinetuneConfig(task="vcr")
    cfg.data.num_workers, cfg.eval.batch_size = 0, args.batch_size
    backbone, tokenizer, transform = JointEncoder.from_pretrained(out / "model")
    task = VCRTask(cfg, backbone, tokenizer, transform, world / "benchmarks")
    model = task.build_model().eval()
    questions = len(task.records("val"))
    timed_predict(task, model)  # warm-up (and the page cache)
    times = {"once": [], "per_sequence": []}
    cpus = {"once": [], "per_sequence": []}
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):
        order = ["once", "per_sequence"] if r % 2 == 0 else ["per_sequence", "once"]
        rows = {}
        for way in order:
            with former_head() if way == "per_sequence" else contextlib.nullcontext():
                cpu = time.process_time()
                seconds, rows[way] = timed_predict(task, model)
                cpu = time.process_time() - cpu
            times[way].append(seconds)
            cpus[way].append(cpu)
            print(f"    round {r} {way:12s} {seconds:7.2f} s  cpu/wall {cpu / seconds:.2f}",
                  flush=True)
        for a, b in zip(rows["once"], rows["per_sequence"]):
            assert a["annot_id"] == b["annot_id"]
            assert max(abs(x - y) for x, y in zip(a["answer_probs"], b["answer_probs"])) < 1e-5
        ratios.append(times["per_sequence"][-1] / times["once"][-1])
        cpu_ratios.append(cpus["per_sequence"][-1] / cpus["once"][-1])
    once, per_seq = statistics.median(times["once"]), statistics.median(times["per_sequence"])
    return {"family": family, "questions": questions, "once_s": once, "per_sequence_s": per_seq,
            "once_questions_per_s": questions / once,
            "per_sequence_questions_per_s": questions / per_seq,
            "speedup": statistics.median(ratios),
            "once_cpu_s": statistics.median(cpus["once"]),
            "per_sequence_cpu_s": statistics.median(cpus["per_sequence"]),
            "cpu_speedup": statistics.median(cpu_ratios)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        world = work / "world"
        if not (world / "MANIFEST.json").is_file():
            generate(world, images=256, val_images=0, benchmark_images=args.benchmark_images,
                     shard_size=64, progress=False)
        rows = []
        for family in args.families.split(","):
            print(f"{family}:", flush=True)
            rows.append(bench_family(family, world, work, args))
    print("\n| backbone | questions | image once per question | once per sequence (former) "
          "| speed-up | CPU s once / former | CPU speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['questions']} | {r['once_s']:.1f} s "
              f"({r['once_questions_per_s']:.1f} q/s) | {r['per_sequence_s']:.1f} s "
              f"({r['per_sequence_questions_per_s']:.1f} q/s) | {r['speedup']:.2f}x | "
              f"{r['once_cpu_s']:.1f} / {r['per_sequence_cpu_s']:.1f} | "
              f"{r['cpu_speedup']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
