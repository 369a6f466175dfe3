"""Caption decoding with and without the key/value cache, side by side (not a test;
bench/README.md records results).

The same model and the same images decode 20-token captions (min_length = max_length = 20, so
every caption is exactly 20 tokens whatever the weights) by greedy search (beam 1) and beam
search (beam 3), once with `caption_step(..., cached=True)` (each step encodes one word against
the cached keys/values of the visual tokens and earlier words) and once without (each step
encodes the visual tokens and the whole word prefix again, as before the cache). Reported per
family and beam: images/s for a batch of `--batch` images, and per-caption latency (one image
alone), each the median over rounds, and the median of the per-round ratios uncached / cached;
also the batch's CPU seconds (this process, one thread: the work done, which other processes on
a shared machine disturb less than the wall time) and their ratio.

Models (random weights: the timing does not depend on them, the caption length is fixed):
- `regions`: the single-stream model of configs/pretrain/vlbert_shapes.yaml (width 128, 4 layers,
  4 heads, `--regions` region features of width 64 as visual tokens);
- `patches`: configs/pretrain/vilt_shapes.yaml (64 patch tokens, width 128, 4 layers);
- `dual_tower`: configs/pretrain/clip_shapes.yaml (ViT 128 x 4 on 64-px images, text 128 x 4)
  with the fine-tuning default's fresh 2-layer fusion;
with the shapes world's vocabulary size (1,000); and, not by default, `regions_base`: the size
of the BERT-base captioners (Unified-VLP, OSCAR-B): 768 wide, 12 layers, 12 heads, 36 regions
of 2,048-d features, a 30,522-word vocabulary.

This CPU is shared and its timings drift, so after a warm-up the two ways alternate round by
round (and which goes first alternates too); each round prints CPU seconds per wall second
(~`--threads` on a quiet machine). One thread by default: on a shared 2-core machine two
OpenMP threads mostly wait for each other.

    python bench/caption_decode.py                       # ~6 min, 1 thread
    python bench/caption_decode.py --families regions --beams 3 --rounds 3 --out dec.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vlp.config import FinetuneConfig, PretrainConfig, load_config, to_dict
from vlp.models.heads.caption import CaptionHead, beam_search, greedy_search
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.caption import caption_step

CONFIGS = {"regions": "configs/pretrain/vlbert_shapes.yaml",
           "regions_base": "configs/pretrain/vlbert_shapes.yaml",
           "patches": "configs/pretrain/vilt_shapes.yaml",
           "dual_tower": "configs/pretrain/clip_shapes.yaml"}
BOS, EOS, BANNED = 2, 3, (0, 1, 2, 4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="regions,dual_tower",
                   help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--beams", default="1,3")
    p.add_argument("--length", type=int, default=20, help="tokens per caption")
    p.add_argument("--batch", type=int, default=32, help="images per batch (images/s)")
    p.add_argument("--regions", type=int, default=36, help="regions family: regions per image")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-repeats", type=int, default=5,
                   help="single-image decodes timed per round (their median is the round's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args()


def build(family: str, regions: int) -> tuple[FinetunedModel, dict]:
    """(caption model with random weights, a function of n -> n images' visual inputs)."""
    cfg = load_config(CONFIGS[family], cls=PretrainConfig).model
    vocab, feature_dim = 1000, 64
    if family == "regions_base":
        cfg.fusion.width, cfg.fusion.layers, cfg.fusion.heads = 768, 12, 12
        vocab, feature_dim = 30522, 2048
    if family.startswith("regions"):
        cfg.max_regions = regions
    spec = {"architecture": "dual_tower" if family == "dual_tower" else "single_stream",
            "model": to_dict(cfg),
            "region_feature_dim": feature_dim if family.startswith("regions") else 0}
    if family == "dual_tower":
        spec["fusion"] = to_dict(FinetuneConfig().fusion)
    torch.manual_seed(0)
    model = FinetunedModel(JointEncoder(spec, vocab), CaptionHead()).eval()
    g = torch.Generator().manual_seed(1)
    size = cfg.vision.image_size

    def images(n: int) -> dict:
        if not family.startswith("regions"):
            return {"pixel_values": torch.randn(n, 3, size, size, generator=g)}
        xy = torch.rand(n, regions, 2, generator=g) * 0.6
        return {"region_features": torch.randn(n, regions, feature_dim, generator=g),
                "region_boxes": torch.cat([xy, xy + 0.3], -1),
                "region_mask": torch.ones(n, regions, dtype=torch.bool)}

    return model, images


@torch.no_grad()
def decode(model: FinetunedModel, visual: dict, beam: int, length: int, cached: bool):
    step, n, _ = caption_step(model, visual, cached=cached)
    common = dict(bos_id=BOS, eos_id=EOS, max_length=length, min_length=length,
                  banned_ids=BANNED, reorder=step.reorder if cached else None)
    if beam == 1:
        out = greedy_search(step, n, **common)
    else:
        out = beam_search(step, n, beam_size=beam, **common)
    assert all(len(s) == length for s in out)  # every caption has `length` tokens
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_one(model, images, beam: int, args) -> dict:
    batch, single = images(args.batch), images(1)
    ways = {"cached": True, "uncached": False}
    # the same captions both ways (the tests check this in general; here on the bench model)
    assert decode(model, batch, beam, args.length, True) == \
        decode(model, batch, beam, args.length, False)
    for cached in ways.values():  # warm-up
        decode(model, single, beam, args.length, cached)
    keys = ("images_per_s", "latency_ms", "batch_cpu_s", "latency_cpu_ms")
    results = {way: {k: [] for k in keys} for way in ways}
    ratios = {k: [] for k in keys}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(ways)[::-1]
        cpu = wall = 0.0
        batch_s, single_s, single_cpu = {}, {way: [] for way in ways}, {way: [] for way in ways}
        for way in order:
            w, c = timed(lambda: decode(model, batch, beam, args.length, ways[way]))
            batch_s[way], wall, cpu = w, wall + w, cpu + c
            results[way]["batch_cpu_s"].append(c)
        for _ in range(args.latency_repeats):  # single images, the two ways alternating
            for way in order:
                w, c = timed(lambda: decode(model, single, beam, args.length, ways[way]))
                single_s[way].append(w)
                single_cpu[way].append(c)
                wall, cpu = wall + w, cpu + c
        for way in ways:
            results[way]["images_per_s"].append(args.batch / batch_s[way])
            results[way]["latency_ms"].append(1000 * statistics.median(single_s[way]))
            results[way]["latency_cpu_ms"].append(1000 * statistics.median(single_cpu[way]))
        c_ips, u_ips = (results[w]["images_per_s"][-1] for w in ways)
        c_ms, u_ms = (results[w]["latency_ms"][-1] for w in ways)
        ratios["images_per_s"].append(c_ips / u_ips)
        ratios["latency_ms"].append(u_ms / c_ms)
        for k in ("batch_cpu_s", "latency_cpu_ms"):
            ratios[k].append(results["uncached"][k][-1] / results["cached"][k][-1])
        print(f"    round {r}: cached {c_ips:7.1f} img/s {c_ms:7.1f} ms | uncached "
              f"{u_ips:7.1f} img/s {u_ms:7.1f} ms | cpu/wall {cpu / wall:.2f}", flush=True)
    out = {way: {k: statistics.median(v) for k, v in d.items()} for way, d in results.items()}
    out["speedup_images_per_s"] = statistics.median(ratios["images_per_s"])
    out["speedup_latency"] = statistics.median(ratios["latency_ms"])
    out["speedup_batch_cpu"] = statistics.median(ratios["batch_cpu_s"])
    out["speedup_latency_cpu"] = statistics.median(ratios["latency_cpu_ms"])
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.length}-token captions, "
          f"batch {args.batch}, {args.rounds} rounds")
    report = {"args": vars(args), "rows": []}
    for family in args.families.split(","):
        model, images = build(family, args.regions)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for beam in (int(b) for b in args.beams.split(",")):
            print(f"{family} ({params:.1f}M parameters), beam {beam}:", flush=True)
            row = {"family": family, "beam": beam, **bench_one(model, images, beam, args)}
            report["rows"].append(row)
    print("\n| family | beam | img/s cached / uncached | speed-up (CPU s) | ms/caption cached "
          "/ uncached | speed-up (CPU ms: cached / uncached, speed-up) |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        c, u = r["cached"], r["uncached"]
        print(f"| {r['family']} | {r['beam']} | {c['images_per_s']:.1f} / "
              f"{u['images_per_s']:.1f} | {r['speedup_images_per_s']:.2f}x "
              f"({r['speedup_batch_cpu']:.2f}x) | {c['latency_ms']:.1f} / {u['latency_ms']:.1f} "
              f"| {r['speedup_latency']:.2f}x ({c['latency_cpu_ms']:.1f} / "
              f"{u['latency_cpu_ms']:.1f}, {r['speedup_latency_cpu']:.2f}x) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
