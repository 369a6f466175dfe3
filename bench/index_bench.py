"""faiss index families side by side: build time, queries/s and recall@10 against exact
search, for indexed-style and cross-modal-style queries; and embedding throughput of a model.
A benchmark, not a test; bench/README.md has results.

Vectors: n L2-normalised points around 1000 random unit centres (isotropic noise of norm
--noise, default 1.0: a point keeps cos ~0.7 to its centre, like image embeddings of one corpus,
which cluster by content without separating cleanly; at 0.6 the clusters are so tight that
IVF with nprobe=1 already reaches 0.99 recall, at 1.5 the data is nearly structureless).
Two query sets of --queries each:
  image  points drawn like the corpus (new noise): what autofaiss measures recall with;
  text   the same centres plus a fixed offset of norm 0.8 (the "modality gap" of contrastive
         models, Liang et al. 2022): queries off the corpus' distribution, like captions
         searched against an image index; an index's recall for them can differ either way.
Each family is built with vlp.retrieval.index (the code `vlp index build` runs: the factory
string for n and d, training on a sample, then tuning nprobe / efSearch to the fastest setting
with recall@10 >= --target on both sets, or the best reachable). Reported: build s (train +
add), bytes of the serialised index, recall@10 per set, queries/s (one batch of all queries),
and the median latency of single queries.

    python bench/index_bench.py                          # 100k and 1M vectors, d=128
    python bench/index_bench.py --sizes 20000 --families flat,ivf,hnsw   # a quick check
    python bench/index_bench.py --dim 512 --model runs/a/model --out bench_index.json
"""
from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch

from vlp.retrieval.index import (INDEX_TYPES, apply_parameters, exact_knn, factory_for,
                                 measure, pq_bits, train_and_add, tune)

FAMILIES = [t for t in INDEX_TYPES if t != "auto"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="corpus sizes, comma-separated")
    p.add_argument("--dim", type=int, default=128, help="vector size (vlp's default embed_dim "
                   "is 128; CLIP ViT-B is 512)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"of {FAMILIES}")
    p.add_argument("--pq-bytes", type=int, default=0,
                   help="PQ code bytes per vector (default dim/8: 16x smaller than float32)")
    p.add_argument("--queries", type=int, default=1000, help="queries per set")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the tuning aims at")
    p.add_argument("--embed-batches", type=int, default=5,
                   help="batches of 256 timed for embedding throughput (0: skip)")
    p.add_argument("--model", help="model directory for embedding throughput (default: the "
                   "default 1.7M-parameter dual tower, randomly initialised)")
    p.add_argument("--noise", type=float, default=1.0, help="noise norm around the centres")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the rows as JSON here")
    return p.parse_args()


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, d: int, queries: int, seed: int,
              noise_norm: float = 1.0) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.normal(size=(1000, d)))
    noise = lambda k: noise_norm * rng.normal(size=(k, d)) / np.sqrt(d)  # noqa: E731
    x = np.empty((n, d), np.float32)
    for i in range(0, n, 100_000):  # in blocks: 1M x 512 float64 temporaries would be 4 GB
        k = min(100_000, n - i)
        x[i:i + k] = _normalise(centres[rng.integers(0, 1000, k)] + noise(k))
    gap = 0.8 * _normalise(rng.normal(size=(1, d)))
    image = _normalise(centres[rng.integers(0, 1000, queries)] + noise(queries))
    text = _normalise(centres[rng.integers(0, 1000, queries)] + noise(queries) + gap)
    return x, {"image": image, "text": text}


def chunks_of(x: np.ndarray, size: int = 100_000):
    return lambda: ((i, x[i:i + size]) for i in range(0, len(x), size))


def bench_family(family: str, x: np.ndarray, sets: dict, pq_bytes: int, target: float) -> dict:
    n, d = x.shape
    factory, _ = factory_for(family, n, d, pq_bytes, pq_bits(n))
    t = time.perf_counter()
    index, stats = train_and_add(factory, d, n, chunks_of(x), lambda ids: x[ids])
    build_s = time.perf_counter() - t
    params, _ = tune(index, factory, sets, target)
    apply_parameters(index, params)
    m = measure(index, sets)
    return {"n": n, "dim": d, "family": family, "factory": factory, "params": params,
            "build_s": round(build_s, 1), "train_s": stats["train_s"],
            "bytes": int(faiss.serialize_index(index).nbytes),
            "recall@10_image": m["recall@10"]["image"], "recall@10_text": m["recall@10"]["text"],
            "qps": m["qps"], "latency_ms": m["latency_ms"]}


def embedding_throughput(model_dir: str | None, batches: int) -> dict:
    import vlp
    from vlp.api import Pretrained
    from vlp.config import ModelConfig
    from vlp.data.transforms import ImageTransform
    from vlp.models import DualTower

    if model_dir:
        model = vlp.load(model_dir)
    else:
        cfg = ModelConfig()  # the default run's shape; weights do not change the speed
        cfg.text.vocab_size = 1000
        model = Pretrained(DualTower(cfg), tokenizer=None,
                           transform=ImageTransform(cfg.vision.image_size))
    size = model.transform.image_size
    pixels = torch.randn(256, 3, size, size)
    model.encode_image(pixels[:32])  # warm-up
    t = time.perf_counter()
    for _ in range(batches):
        model.encode_image(pixels)
    images_s = 256 * batches / (time.perf_counter() - t)
    params = sum(p.numel() for p in model.model.parameters())
    return {"model": model_dir or "default dual tower (random init)", "params": params,
            "image_size": size, "images_per_s": round(images_s, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    a = parse_args()
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; valid: {FAMILIES}")
    pq_bytes = a.pq_bytes or max(4, a.dim // 8)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {a.dim}, "
          f"noise {a.noise}, PQ codes {pq_bytes} bytes, {a.queries} queries per set, target "
          f"recall {a.target}")
    rows = []
    header = ("| n | family | factory | search params | build s | MB | recall@10 image | "
              "recall@10 text | queries/s | latency ms |")
    print(header + "\n|" + "---|" * 10, flush=True)
    for n in (int(s) for s in a.sizes.split(",")):
        x, queries = make_data(n, a.dim, a.queries, a.seed, a.noise)
        sets = {name: (q, exact_knn(q, chunks_of(x)())[1]) for name, q in queries.items()}
        for family in families:
            r = bench_family(family, x, sets, pq_bytes, a.target)
            rows.append(r)
            print(f"| {n:,} | {family} | `{r['factory']}` | {r['params'] or '-'} | "
                  f"{r['build_s']} | {r['bytes'] / 1e6:.1f} | {r['recall@10_image']:.3f} | "
                  f"{r['recall@10_text']:.3f} | {r['qps']:,.0f} | {r['latency_ms']:.2f} |",
                  flush=True)
        del x
    result = {"index": rows}
    if a.embed_batches:
        e = embedding_throughput(a.model, a.embed_batches)
        result["embedding"] = e
        print(f"\nembedding: {e['images_per_s']:.0f} images/s ({e['model']}, "
              f"{e['params'] / 1e6:.1f}M parameters, {e['image_size']}px, batch 256, "
              f"{e['threads']} threads, fp32)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
