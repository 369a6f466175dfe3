"""Build a faiss index over embedded chunks: choose, train, add, tune, measure, write.

    emb/img_*.npy (EmbeddingStore) -> choose_index(n, dim, --max-memory) -> faiss.index_factory
      (METRIC_INNER_PRODUCT: the vectors are L2-normalised, so inner product = cosine)
      -> train on a random sample -> add every chunk -> tune nprobe / efSearch on queries
      -> recall@10 against exact search + queries/s -> image.index (text.index), index_info.json

How the family is chosen (`choose_index`, after autofaiss's `get_optimal_index_keys_v2` and
faiss's wiki "Guidelines to choose an index"): under FLAT_THRESHOLD vectors exact search is
fast enough and costs no recall, so `Flat`; above, an inverted file with nlist ≈ 4·sqrt(n)
cells (a power of two), flat codes when the vectors fit in the memory budget
(`IVF{nlist},Flat`; from 1024 cells the cell lookup itself goes through an HNSW graph,
`IVF{nlist}_HNSW32,Flat`, as autofaiss does), otherwise product-quantised codes sized to the
budget (`OPQ{m}_{d'},IVF{nlist}_HNSW32,PQ{m}x8`, m bytes per vector).

Recall is measured with two query sets: indexed vectors of the same modality (all autofaiss
measures) *and* the other modality (captions against the image index, images against the
text index), and tuning must satisfy both. Contrastive models leave a "modality gap" (Liang
et al. 2022, "Mind the Gap"): text embeddings lie in another cone than image embeddings, so a
caption query sits off the distribution the IVF cells and PQ codebooks were trained on, and
an index's recall for it is not its recall for indexed vectors, in either direction. On the
shapes world (20k images, the default model) IVF512,Flat at nprobe=4 found 0.999 of the
exact top 10 for image queries but 0.986 for caption queries, while 16-byte PQ codes found
0.41 for image queries and 0.58 for caption ones (neighbouring images there score so alike
that quantisation noise reorders them). Text->image is what this index serves, so measuring
with indexed vectors alone would misstate what IVF and PQ cost it.

Indexes larger than RAM: an IVF index whose inverted lists (codes + ids) exceed the budget
keeps them on disk (faiss OnDiskInvertedLists; forced with on_disk=True). Only the quantizer
(and OPQ matrix, PQ codebooks) stays in RAM. It is built as autofaiss builds its distributed
indexes: train once, add the vectors block by block into small in-RAM IVF parts of the same
trained index, write each part, then merge the parts' lists into one `image.<token>.ivfdata`
file (faiss.contrib.ondisk.merge_ondisk) beside `image.index`; the build holds one block at a
time. Lists keep the order of the ids, so the answers are those of the same index in RAM.
`open_index` (what search and the service use) maps every index file into memory instead of
reading it (IO_FLAG_MMAP_IFC; on-disk lists mapped read-only from the .ivfdata file): the
page cache holds what queries touch, shared between processes.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
from tqdm import tqdm

from vlp.retrieval.embed import EmbeddingStore, connect, write_atomic

FLAT_THRESHOLD = 10_000   # below: exact search (autofaiss uses 1k-10k)
HNSW_QUANTIZER_MIN_NLIST = 1024  # from here the coarse quantizer is an HNSW graph
PQ_M = (256, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # code bytes tried, largest first
ID_BYTES = 8  # each vector's id in an inverted list (faiss InvertedLists: idx_t)
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivf-hnsw", "ivf-pq", "opq-pq")
K = 10
TARGET_RECALL = 0.95
INFO_FILE = "index_info.json"
INDEX_FILES = {"image": "image.index", "text": "text.index"}
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(text: str | int) -> int:
    """'4GB', '512MB', '1.5GiB', '2e9' or an int -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '4GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------- choosing
@dataclass
class IndexChoice:
    """A faiss factory string with what it was chosen from; `memory` estimates the index's
    size in bytes (vectors or codes, ids, quantizer, graph links, OPQ matrix). `on_disk`: the
    inverted lists go to disk, and only `resident` bytes (quantizer, OPQ, codebooks) to RAM."""

    name: str  # one of INDEX_TYPES but "auto", or "custom" for a factory string
    factory: str
    memory: int
    reason: str
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    on_disk: bool = False
    resident: int | None = None


def ivf_nlist(n: int) -> int:
    """Cells for n vectors: the power of two nearest 4·sqrt(n) (faiss's guideline: 4-16·sqrt(n)),
    lowered until every cell gets >= 39 training points (faiss warns below that)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def pq_bits(n: int) -> int:
    """8-bit codes (256 centroids per sub-vector) need ~39·256 training points; fewer vectors
    get smaller codebooks instead of a faiss error."""
    return max(1, min(8, int(math.log2(max(2, n // 39)))))


def _quantizer(nlist: int, d: int) -> tuple[str, int]:
    """(factory part, bytes) of the coarse quantizer: centroids (+ HNSW32 links)."""
    if nlist >= HNSW_QUANTIZER_MIN_NLIST:
        return f"IVF{nlist}_HNSW32", nlist * (4 * d + 2 * 32 * 4 + 16)
    return f"IVF{nlist}", nlist * 4 * d


def _opq_dim(d: int, m: int) -> int:
    """OPQ output size: a multiple of m, at most d, at most 8 dimensions per sub-quantizer."""
    return m * min(d // m, 8)


def _lists(name: str, n: int, d: int, m: int = 0, bits: int = 8) -> int:
    """Bytes of an IVF family's inverted lists: a code and an id per vector."""
    codes = d * 4 if name in ("ivf", "ivf-hnsw") else math.ceil(m * bits / 8)
    return n * (codes + ID_BYTES)


def _memory(name: str, n: int, d: int, nlist: int = 1, m: int = 0, bits: int = 8) -> int:
    if name == "flat":
        return n * d * 4
    if name == "hnsw":  # vectors + level-0 links (2M int32) + a little for upper levels
        return n * (d * 4 + 2 * 32 * 4 + 16)
    # "ivf" keeps a flat quantizer at any nlist (factory_for); the others a graph from 1024
    quantizer = nlist * 4 * d if name == "ivf" else _quantizer(nlist, d)[1]
    if name in ("ivf", "ivf-hnsw"):
        return n * (d * 4 + ID_BYTES) + quantizer
    codes = math.ceil(m * bits / 8)
    dim = _opq_dim(d, m) if name == "opq-pq" else d
    extra = (d * dim * 4 if name == "opq-pq" else 0) + (2 ** bits) * dim * 4
    return n * (codes + ID_BYTES) + quantizer + extra


def factory_for(name: str, n: int, d: int, m: int = 0, bits: int = 8) -> tuple[str, int]:
    """(faiss factory string, nlist or 0) of family `name` (INDEX_TYPES but "auto") for n
    vectors of dimension d; m code bytes and `bits` per code for the PQ families."""
    nlist = ivf_nlist(n)
    if name == "flat":
        return "Flat", 0
    if name == "hnsw":
        return "HNSW32,Flat", 0
    if name == "ivf":
        return f"IVF{nlist},Flat", nlist
    if name == "ivf-hnsw":
        return f"IVF{nlist}_HNSW32,Flat", nlist
    # "np": no polysemous training, which only serves Hamming-threshold search (unused here)
    # and was 95% of the training time of small IVF-PQ indexes
    if name == "ivf-pq":
        return f"{_quantizer(nlist, d)[0]},PQ{m}x{bits}np", nlist
    if name == "opq-pq":
        return f"OPQ{m}_{_opq_dim(d, m)},{_quantizer(nlist, d)[0]},PQ{m}x{bits}np", nlist
    raise ValueError(name)


def _pq_m(name: str, n: int, d: int, budget: int, bits: int) -> int | None:
    """The largest code size (bytes per vector) whose index fits `budget`; None if none does.
    Plain PQ needs m to divide d; OPQ rotates into a multiple of m."""
    for m in PQ_M:
        if m >= d or (name == "ivf-pq" and d % m):
            continue
        if _memory(name, n, d, ivf_nlist(n), m, bits) <= budget:
            return m
    return None


def check_index_type(index_type: str) -> None:
    """ValueError unless `index_type` is one of INDEX_TYPES or looks like a faiss factory
    string (which faiss itself checks when the index is made)."""
    if index_type not in INDEX_TYPES and not re.search(r"[A-Z]", index_type):
        raise ValueError(f"--index-type {index_type!r}: expected one of {INDEX_TYPES} or a "
                         "faiss factory string (e.g. 'IVF1024,PQ32x8', 'HNSW32,Flat')")


IVF_FAMILIES = ("ivf", "ivf-hnsw", "ivf-pq", "opq-pq")


def choose_index(n: int, d: int, max_memory: int | str = "4GB",
                 index_type: str = "auto", on_disk: bool | None = None) -> IndexChoice:
    """The index for n vectors of dimension d in `max_memory` bytes (module docstring).

    `index_type`: "auto", a family (INDEX_TYPES: its parameters still come from n, d and the
    budget) or a faiss factory string such as "IVF256,PQ16x8" (used as it is).
    `on_disk`: None: an IVF family's inverted lists go to disk when the index exceeds the
    budget ("auto" picks codes that fit the budget instead, so it stays in RAM); True: on
    disk (an IVF index; "auto" then takes IVF with flat codes); False: in RAM."""
    budget = parse_memory(max_memory)
    if n < 1:
        raise ValueError("no vectors to index (did every sample get skipped? see the skip "
                         "counts of the embedding run)")
    check_index_type(index_type)
    if index_type not in INDEX_TYPES:
        if on_disk and "IVF" not in index_type:
            raise ValueError(f"--on-disk needs an IVF index; {index_type!r} has no inverted "
                             "lists")
        return IndexChoice("custom", index_type, 0, "faiss factory string given"
                           + ("; inverted lists on disk" if on_disk else ""),
                           on_disk=bool(on_disk))
    if on_disk and index_type in ("flat", "hnsw"):
        raise ValueError(f"--on-disk needs an IVF index (--index-type {', '.join(IVF_FAMILIES)}"
                         f" or an IVF factory string); {index_type} keeps its vectors in RAM")
    bits = pq_bits(n)
    if index_type == "auto" and on_disk:
        nlist = ivf_nlist(n)
        name = "ivf-hnsw" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "ivf"
        return _on_disk(IndexChoice(name, factory_for(name, n, d)[0], _memory(name, n, d, nlist),
                                    "--on-disk: flat codes", nlist), n, d, budget)
    if index_type == "auto":
        flat = _memory("flat", n, d)
        if n < FLAT_THRESHOLD and flat <= budget:
            return IndexChoice("flat", "Flat", flat, f"{n} < {FLAT_THRESHOLD} vectors: exact "
                               "search")
        nlist = ivf_nlist(n)
        name = "ivf-hnsw" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "ivf"
        mem = _memory(name, n, d, nlist)
        if mem <= budget:
            factory, _ = factory_for(name, n, d)
            return IndexChoice(name, factory, mem, f"{n} vectors, flat codes fit "
                               f"{format_bytes(budget)} ({format_bytes(mem)})", nlist)
        m = _pq_m("opq-pq", n, d, budget, bits)
        if m is None:
            least = _memory("opq-pq", n, d, nlist, PQ_M[-1], bits)
            raise ValueError(f"--max-memory {format_bytes(budget)} cannot hold {n} vectors: the "
                             f"smallest index here (OPQ{PQ_M[-1]} codes + ids) needs "
                             f"{format_bytes(least)}; raise --max-memory, or keep the inverted "
                             "lists on disk (--on-disk)")
        factory, _ = factory_for("opq-pq", n, d, m, bits)
        mem = _memory("opq-pq", n, d, nlist, m, bits)
        return IndexChoice("opq-pq", factory, mem, f"{n} vectors: flat codes "
                           f"({format_bytes(_memory(name, n, d, nlist))}) exceed "
                           f"{format_bytes(budget)}; {m}-byte PQ codes fit", nlist, m, bits)
    m = None
    if index_type in ("ivf-pq", "opq-pq"):
        valid = [m for m in PQ_M if m < d and (index_type == "opq-pq" or d % m == 0)]
        # codes on disk do not count against the budget: the largest; in RAM, the largest
        # that fits, else the smallest (over the budget, then on disk unless on_disk=False)
        m = valid[0] if on_disk else (_pq_m(index_type, n, d, budget, bits) or valid[-1])
    factory, nlist = factory_for(index_type, n, d, m or 0, bits)
    mem = _memory(index_type, n, d, nlist or 1, m or 0, bits)
    choice = IndexChoice(index_type, factory, mem, f"--index-type {index_type}", nlist or None,
                         m, bits if m else None)
    if index_type in IVF_FAMILIES and (on_disk or (on_disk is None and mem > budget)):
        return _on_disk(choice, n, d, budget)
    if mem > budget:
        choice.reason += f" (over the {format_bytes(budget)} budget)"
    return choice


def _on_disk(choice: IndexChoice, n: int, d: int, budget: int) -> IndexChoice:
    """`choice` with its inverted lists on disk: what stays in RAM is the rest."""
    lists = _lists(choice.name, n, d, choice.pq_m or 0, choice.pq_bits or 8)
    choice.on_disk, choice.resident = True, choice.memory - lists
    choice.reason += (f"; inverted lists on disk ({format_bytes(lists)}"
                      + (f" > {format_bytes(budget)}" if choice.memory > budget else "")
                      + f"), {format_bytes(choice.resident)} in RAM")
    if choice.resident > budget:
        choice.reason += f" (over the {format_bytes(budget)} budget)"
    return choice


# --------------------------------------------------------------------------- GPU
def use_gpu() -> bool:
    """faiss-gpu with a visible GPU (faiss-cpu has no get_num_gpus or returns 0)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)() > 0


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    return faiss.StandardGpuResources()


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of an exact (Flat) index with faiss-gpu, else `index` itself. IVF and HNSW
    search stays on the CPU: their tuned nprobe / quantizer_efSearch are set through
    ParameterSpace, which does not reach GPU copies (HNSW has none), and one query costs well
    under a millisecond there."""
    if not use_gpu() or not isinstance(index, faiss.IndexFlat):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def gpu_clustering_index(d: int) -> faiss.Index:
    """A flat L2 index on every GPU, for the k-means of IVF training (what autofaiss does: the
    bulk of training). L2 assignment equals inner-product assignment here: the vectors are
    L2-normalised and faiss trains inner-product cells with spherical k-means."""
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(d))


@contextlib.contextmanager
def _clustering_index(index: faiss.Index, make: Callable[[int], faiss.Index] | None):
    """Use make(d) for the k-means of `index`'s IVF cells while the block runs.

    faiss stores `clustering_index` as a raw pointer and keeps no Python reference to it, so
    an index assigned and then dropped is freed (with its GPU resources) before `train` uses
    it: faiss-gpu crashed (issue 18). The reference lives here until training returns, and
    the field is cleared after, so the IVF index never points at a freed object."""
    if make is None:
        yield None
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (Flat, HNSW): nothing to cluster
        yield None
        return
    clustering = make(ivf.d)
    ivf.clustering_index = clustering
    try:
        yield clustering
    finally:
        ivf.clustering_index = None


# --------------------------------------------------------------------------- exact search
def exact_knn(queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]],
              k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of `queries` over chunked vectors (first id, array), merged
    chunk by chunk so the whole corpus never sits in memory: (scores, ids), (nq, k)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for first_id, x in chunks:
        if len(x) == 0:
            continue
        if use_gpu():
            d, i = faiss.knn_gpu(_gpu_resources(), queries, x, min(k, len(x)),
                                 metric=faiss.METRIC_INNER_PRODUCT)
        else:
            d, i = faiss.knn(queries, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(np.ascontiguousarray(d, dtype=np.float32),
                        np.ascontiguousarray(i + first_id, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k (faiss's knn_intersection_measure)."""
    hits = sum(len(np.intersect1d(f[:k][f[:k] >= 0], e[:k][e[:k] >= 0]))
               for f, e in zip(found, exact))
    return hits / (len(exact) * min(k, exact.shape[1])) if len(exact) else float("nan")


# --------------------------------------------------------------------------- tuning
def search_parameters(index: faiss.Index, factory: str) -> tuple[str, list[str]]:
    """(parameter name, candidate settings from fastest to most exact) for faiss's
    ParameterSpace; ("", [""]) when the index has nothing to tune (Flat)."""
    m = re.search(r"IVF(\d+)", factory)
    if m:
        nlist = int(m.group(1))
        probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= nlist]
        if nlist not in probes and nlist <= 1024:
            probes.append(nlist)
        if "_HNSW" in factory:  # the cell graph must return at least nprobe cells
            return "nprobe", [f"nprobe={p},quantizer_efSearch={max(2 * p, 32)}" for p in probes]
        return "nprobe", [f"nprobe={p}" for p in probes]
    if factory.startswith("HNSW") or ",HNSW" in factory:
        return "efSearch", [f"efSearch={e}" for e in (16, 32, 64, 128, 256, 512)]
    return "", [""]


def apply_parameters(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def tune(index: faiss.Index, factory: str, query_sets: dict[str, tuple[np.ndarray, np.ndarray]],
         target: float = TARGET_RECALL, k: int = K) -> tuple[str, list[dict]]:
    """The fastest setting whose recall@k reaches `target` on every query set; when none does
    (PQ codes cap recall), the fastest within 0.005 of the best reached. The ladder stops at
    the target, or once two more settings gained nothing (a plateau: searching more cells
    cannot undo quantisation). Returns (setting, the curve [{params, recall per set}])."""
    _, candidates = search_parameters(index, factory)
    curve, worst = [], []
    for params in candidates:
        apply_parameters(index, params)
        recalls = {name: recall_at_k(index.search(q, k)[1], gt, k)
                   for name, (q, gt) in query_sets.items()}
        curve.append({"params": params, "recall": recalls})
        worst.append(min(recalls.values()) if recalls else 1.0)
        if worst[-1] >= target:
            break
        if len(worst) >= 3 and max(worst[-2:]) <= max(worst[:-2]) + 0.002:
            break
    good = [i for i, w in enumerate(worst) if w >= target] or \
        [i for i, w in enumerate(worst) if w >= max(worst) - 0.005]
    return curve[good[0]]["params"], curve


def measure(index: faiss.Index, query_sets: dict[str, tuple[np.ndarray, np.ndarray]],
            k: int = K) -> dict:
    """recall@k per query set, batched queries/s over all sets, and the median latency of
    single queries (what one search box request costs)."""
    key = f"recall@{k}"
    out: dict = {key: {}, "queries": {}}
    for name, (q, gt) in query_sets.items():
        out[key][name] = round(recall_at_k(index.search(q, k)[1], gt, k), 4)
        out["queries"][name] = len(q)
    allq = np.concatenate([q for q, _ in query_sets.values()]) if query_sets else None
    if allq is not None and len(allq):
        t = time.perf_counter()
        index.search(allq, k)
        out["qps"] = round(len(allq) / max(time.perf_counter() - t, 1e-9), 1)
        times = []
        for row in allq[:100]:
            t = time.perf_counter()
            index.search(row[None], k)
            times.append(time.perf_counter() - t)
        out["latency_ms"] = round(1000 * float(np.median(times)), 3)
    return out


# --------------------------------------------------------------------------- building
@contextlib.contextmanager
def _opq_codebook(index: faiss.Index, factory: str):
    """OPQ learns its rotation with a PQ of its own, 8-bit by default (faiss OPQMatrix), which
    wants >= 9984 training points; give it the index's own code size instead, so small
    corpora neither warn nor train 256-centroid codebooks on too few points."""
    m = re.search(r"PQ\d+x(\d+)", factory)
    if not (factory.startswith("OPQ") and m and isinstance(index, faiss.IndexPreTransform)):
        yield
        return
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    pq = faiss.ProductQuantizer(opq.d_out, opq.M, int(m.group(1)))
    opq.pq = pq
    try:
        yield
    finally:
        opq.pq = None  # `pq` is owned by Python and goes away with this frame


Chunks = Callable[[], Iterator[tuple[int, np.ndarray]]]  # () -> (first id, vectors) in id order


def train_and_add(factory: str, d: int, n: int, chunks: Chunks,
                  sample: Callable[[np.ndarray], np.ndarray], *, seed: int = 0,
                  progress: bool = False, desc: str = "add",
                  clustering_index: Callable[[int], faiss.Index] | None = None
                  ) -> tuple[faiss.Index, dict]:
    """index_factory(d, factory, inner product), trained on a random sample of the n vectors
    (`sample(ids)` returns them) and filled from `chunks()` in id order. Returns the CPU index
    and timings {train_s, add_s, train_size}.

    `clustering_index(d)` makes the index that assigns points to cells during IVF k-means;
    default: `gpu_clustering_index` with faiss-gpu and a GPU, else faiss's own."""
    index, stats = train_index(factory, d, n, sample, seed=seed,
                               clustering_index=clustering_index)
    t = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="vec", disable=not progress) as bar:
        for _, x in chunks():
            if len(x):
                index.add(x)
            bar.update(len(x))
    stats["add_s"] = round(time.perf_counter() - t, 3)
    return index, stats


def train_index(factory: str, d: int, n: int, sample: Callable[[np.ndarray], np.ndarray], *,
                seed: int = 0, clustering_index: Callable[[int], faiss.Index] | None = None
                ) -> tuple[faiss.Index, dict]:
    """The empty index of `factory`, trained on a random sample of the n vectors (the part of
    `train_and_add` before adding); {train_size, train_s}."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index {factory!r} for dimension {d}: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    stats = {"train_size": 0, "train_s": 0.0}
    if not index.is_trained:
        m = re.search(r"IVF(\d+)", factory)
        # ~64 points per cell for k-means, and >= 39*256 for 8-bit PQ codebooks (autofaiss
        # takes up to 100 per cell); the whole corpus when it is smaller
        want = max(64 * int(m.group(1)) if m else 0, 10_000)
        ids = np.sort(np.random.default_rng(seed).choice(n, size=min(n, want), replace=False))
        x = sample(ids)
        make = clustering_index or (gpu_clustering_index if use_gpu() else None)
        t = time.perf_counter()
        with _opq_codebook(index, factory), _clustering_index(index, make):
            index.train(x)
        stats.update(train_size=len(ids), train_s=round(time.perf_counter() - t, 3))
    return index, stats


# --------------------------------------------------------------------------- on disk
@contextlib.contextmanager
def _c_stdout_quiet():
    """faiss's OnDiskInvertedLists announces "resizing FILE to N bytes" with C printf; keep
    that off our stdout (the library's callers print results there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what printf buffered goes to /dev/null, not later
        os.dup2(saved, 1)
        os.close(saved)


def add_on_disk(index: faiss.Index, chunks: Chunks, n: int, ivfdata: Path, work: Path,
                budget: int, *, progress: bool = False, desc: str = "add") -> dict:
    """Fill the trained, empty IVF `index` with every vector of `chunks()` into on-disk
    inverted lists in the file `ivfdata`: blocks of vectors go into in-RAM copies of the empty
    index (written to `work`, then dropped), whose lists are merged into the one file
    (faiss.contrib.ondisk.merge_ondisk, reading the parts memory-mapped). A block's lists
    (codes + ids) take at most half of what `budget` leaves beside the empty index; the other
    half is for the chunk being read and faiss's buffers. Vectors keep their ids (chunk first
    id + row), so the lists hold them in id order, as in an index filled in RAM.
    Returns {add_s, parts, block_rows, resident_bytes (the empty index: what stays in RAM)}."""
    from faiss.contrib.ondisk import merge_ondisk

    t = time.perf_counter()
    empty = faiss.serialize_index(index)
    try:
        per_vector = faiss.extract_index_ivf(index).code_size + ID_BYTES
    except RuntimeError:
        raise ValueError("on-disk inverted lists need an IVF index; this one has no inverted "
                         "lists") from None
    block_rows = max(1, (budget - len(empty)) // 2 // per_vector)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names: list[str] = []
    part = None

    def flush():
        nonlocal part
        if part is not None and part.ntotal:
            names.append(str(work / f"part_{len(names):05d}.index"))
            faiss.write_index(part, names[-1])
        part = None

    with tqdm(total=n, desc=desc, unit="vec", disable=not progress) as bar:
        for first_id, x in chunks():
            done = 0
            while done < len(x):  # a chunk may be larger than a block
                part = part or faiss.deserialize_index(empty)
                take = min(len(x) - done, block_rows - part.ntotal)
                part.add_with_ids(x[done:done + take], np.arange(
                    first_id + done, first_id + done + take, dtype=np.int64))
                done += take
                if part.ntotal >= block_rows:
                    flush()
            bar.update(len(x))
    flush()
    with _c_stdout_quiet():
        merge_ondisk(index, names, str(ivfdata))
    with open(ivfdata, "rb") as f:  # the lists are on disk before an index points at them
        os.fsync(f.fileno())
    shutil.rmtree(work, ignore_errors=True)
    return {"add_s": round(time.perf_counter() - t, 3), "parts": len(names),
            "block_rows": int(block_rows), "resident_bytes": len(empty)}


def open_index(index_dir: str | Path, modality: str, record: dict | None = None
               ) -> faiss.Index:
    """`image.index` / `text.index` mapped into memory rather than read: what `vlp search`
    and `vlp serve` use. An index with on-disk lists (`record["storage"] == "disk"`) maps its
    .ivfdata file read-only, found beside the index file whatever folder it was built in
    (the role of IO_FLAG_ONDISK_SAME_DIR, without its printf on stdout)."""
    path = Path(index_dir) / INDEX_FILES[modality]
    if (record or {}).get("storage") == "disk":
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            lists.filename = str(path.parent / Path(lists.filename).name)
            if not Path(lists.filename).is_file():
                raise FileNotFoundError(f"{lists.filename} does not exist: it holds the "
                                        f"inverted lists of {path} (keep the two together)")
            lists.read_only = True
            lists.do_mmap()
            return index
    if "IVF" in (record or {}).get("factory", ""):
        # the lists become OnDiskInvertedLists over the index file, read-only
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    # flat codes (Flat, HNSW storage) mapped: faiss >= 1.11; older ones read them
    return faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))


def _held_out_captions(index_dir: Path, ids: np.ndarray) -> list[str]:
    """A caption per sample that is not its embedded one when it has several (the shapes
    world has 5, COCO 5): text the index has never seen, like a user's query."""
    db = connect(index_dir, readonly=True)
    try:
        out = []
        for i in ids.tolist():
            caption, captions = db.execute("SELECT caption, captions FROM samples WHERE id = ?",
                                           (i,)).fetchone()
            others = [c for c in json.loads(captions) if c != caption]
            out.append(others[i % len(others)] if others else caption)
        return out
    finally:
        db.close()


def _zero_shot(index: faiss.Index, gt: dict, ids: np.ndarray, modality: str, n: int) -> dict:
    """Zero-shot retrieval through the index: how often a sample's caption finds that sample's
    image in the top K (t2i_R@10, in %, as `vlp eval retrieval` reports it but with the whole
    corpus as the gallery), with this index and with exact search, and what chance gives;
    i2t_R@10 for the text index (one caption per image there)."""
    cross = "text" if modality == "image" else "image"
    if cross not in gt:
        return {}
    queries, exact = gt[cross]
    found = index.search(queries, K)[1]
    name = "t2i" if modality == "image" else "i2t"
    hit = lambda top: 100.0 * float((top[:, :K] == ids[:, None]).any(axis=1).mean())  # noqa: E731
    return {f"{name}_R@{K}": round(hit(found), 2), f"{name}_R@{K}_exact": round(hit(exact), 2),
            f"{name}_R@{K}_chance": round(100.0 * min(1.0, K / n), 2)}


def build_index(index_dir: str | Path, *, modality: str = "image", index_type: str = "auto",
                max_memory: int | str = "4GB", on_disk: bool | None = None, model=None,
                queries: int = 1000, target_recall: float = TARGET_RECALL, seed: int = 0,
                progress: bool = True) -> dict:
    """Build `image.index` (modality "image", from emb/img_*) or `text.index` (modality "text",
    from emb/txt_*) in an embedded index folder, and record what was built, its recall@10
    against exact search and its speed under that modality in index_info.json. Returns that
    record.

    Query sets (module docstring for why two): "image" and "text" vectors. Same-modality
    queries are `queries` random indexed vectors; cross-modal ones are the other modality's
    embeddings of the same samples when the folder has them (built with --text), else held-out
    captions encoded with `model` (image index only; skipped without a model).

    `on_disk`: see choose_index; on disk, the lists go to `<modality>.<token>.ivfdata` (a new
    name per build, so a running service keeps reading the file it mapped).
    """
    if modality not in INDEX_FILES:
        raise ValueError(f"modality={modality!r}: expected one of {sorted(INDEX_FILES)}")
    index_dir = Path(index_dir)
    kind, other = ("img", "txt") if modality == "image" else ("txt", "img")
    store = EmbeddingStore(index_dir, kind)
    if not store.exists():
        raise FileNotFoundError(f"{index_dir}/emb has no complete set of {kind}_*.npy chunks"
                                + (" (embed the captions with --text)" if kind == "txt" else ""))
    budget = parse_memory(max_memory)
    choice = choose_index(store.n, store.dim, budget, index_type, on_disk)
    stem = Path(INDEX_FILES[modality]).stem
    ivfdata = None
    if choice.on_disk:
        index, stats = train_index(choice.factory, store.dim, store.n, store.rows, seed=seed)
        ivfdata = index_dir / f"{stem}.{secrets.token_hex(4)}.ivfdata"
        stats.update(add_on_disk(index, store.iter_chunks, store.n, ivfdata,
                                 index_dir / f".{stem}.parts", budget, progress=progress,
                                 desc=f"{modality} index"))
    else:
        index, stats = train_and_add(choice.factory, store.dim, store.n, store.iter_chunks,
                                     store.rows, seed=seed, progress=progress,
                                     desc=f"{modality} index")

    # query sets with their exact answers
    rng = np.random.default_rng(seed + 1)
    ids = np.sort(rng.choice(store.n, size=min(store.n, queries), replace=False))
    query_sets: dict[str, np.ndarray] = {modality: store.rows(ids)}
    other_store = EmbeddingStore(index_dir, other)
    other_name = "text" if modality == "image" else "image"
    if other_store.exists():
        query_sets[other_name] = other_store.rows(ids)
    elif modality == "image" and model is not None:
        query_sets["text"] = np.ascontiguousarray(
            model.encode_text(_held_out_captions(index_dir, ids)).numpy(), dtype=np.float32)
    gt = {name: (q, exact_knn(q, store.iter_chunks())[1]) for name, q in query_sets.items()}

    search_index = to_gpu(index)
    params, curve = tune(search_index, choice.factory, gt, target_recall)
    apply_parameters(search_index, params)
    measured = measure(search_index, gt)
    apply_parameters(index, params)
    zero_shot = _zero_shot(search_index, gt, ids, modality, store.n)

    path = index_dir / INDEX_FILES[modality]
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
    for old in index_dir.glob(f"{stem}.*.ivfdata"):  # earlier builds' lists
        if ivfdata is None or old.name != ivfdata.name:
            old.unlink()
    record = {"file": path.name, "count": int(index.ntotal), "dim": store.dim,
              "factory": choice.factory, "family": choice.name, "reason": choice.reason,
              "memory_estimate_bytes": choice.memory, "size_bytes": path.stat().st_size,
              "max_memory_bytes": budget, "metric": "inner_product",
              "storage": "disk" if ivfdata else "ram",
              "search_params": params, "tuning": curve, "target_recall": target_recall,
              "gpu": use_gpu(), **stats, **measured, **zero_shot}
    if ivfdata:
        record.update(ivfdata=ivfdata.name, ivfdata_bytes=ivfdata.stat().st_size)
    update_info(index_dir, {modality: record})
    return record


def read_info(index_dir: str | Path) -> dict:
    path = Path(index_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the index first "
                                f"(`vlp index build --out {index_dir} ...`)")
    return json.loads(path.read_text())


def update_info(index_dir: str | Path, fields: dict) -> dict:
    """Merge `fields` into index_info.json (written atomically)."""
    path = Path(index_dir) / INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.update(fields)
    write_atomic(path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info
