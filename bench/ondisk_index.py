"""An IVF index larger than its memory budget: inverted lists on disk against the same index
in RAM. A benchmark, not a test; bench/README.md has results.

A synthetic corpus (n L2-normalised vectors of --dim around 1000 random centres, noise of norm
1.0, as bench/index_bench.py draws them) is stored as an index folder (store_embeddings) twice
(the chunk files hard-linked), then indexed by `build_index` with the same family (`ivf`: the
factory depends on n and d only) and seed, so both get the same training:
  in RAM   --max-memory 4GB: the lists fit, the build holds them all;
  on disk  --max-memory M (default 400MB, under half the corpus): the lists go to an .ivfdata
           file, merged from parts of at most M/2 each.
Each build runs in its own process (peak resident memory = its VmHWM). Then each index is
searched from a fresh process, as `vlp search` / `vlp serve` open it (Searcher: memory-mapped),
and the in-RAM one also read whole into memory (faiss.read_index, how it was opened before):
recall@10 of --queries new points against exact search, batched queries/s with a cold page
cache (the index files' pages dropped with posix_fadvise first) and warm (a second pass), and
the search process's resident memory: anonymous (its own) and file-backed (mapped index pages,
which the kernel can drop).

    python bench/ondisk_index.py                              # 2M x 128 (1.0 GB), 400MB
    python bench/ondisk_index.py --n 200000 --max-memory 40MB  # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from vlp.retrieval.embed import chunk_path, store_embeddings
from vlp.retrieval.index import exact_knn, parse_memory, recall_at_k

HERE = Path(__file__).resolve()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2_000_000, help="corpus vectors")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--max-memory", default="400MB", help="the on-disk build's budget")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=100_000, help="vectors per chunk file")
    p.add_argument("--work", default="/tmp/vlp_ondisk_bench", help="folder for the indexes")
    p.add_argument("--rounds", type=int, default=3, help="search measurements, interleaved "
                   "across the indexes (medians reported)")
    p.add_argument("--reuse", action="store_true", help="search the indexes --work already "
                   "holds (built by an earlier run) instead of building them again")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data
def _centres(dim: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(1000, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _points(centres: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(size=(n, centres.shape[1]))
    noise *= 1.0 / np.linalg.norm(noise, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)] + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _chunks(args, centres):
    rng = np.random.default_rng(args.seed + 1)
    for start in range(0, args.n, args.chunk):
        yield _points(centres, min(args.chunk, args.n - start), rng)


def _status() -> dict:
    """This process's memory (/proc/self/status), in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


class _PeakAnon:
    """The peak of RssAnon, sampled every 20 ms: the memory the process itself needs (VmHWM
    also counts mapped file pages, which the kernel can drop)."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status()["RssAnon"])


def _drop_cache(folder: Path) -> None:
    """Drop the page cache of the index files (clean pages only: synced first)."""
    for path in [*folder.glob("*.index"), *folder.glob("*.ivfdata")]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- worker processes
def _worker_build(folder: str, max_memory: str) -> dict:
    from vlp.retrieval.index import build_index

    peak = _PeakAnon()
    t = time.perf_counter()
    record = build_index(folder, index_type="ivf", max_memory=max_memory, progress=False)
    return {"build_s": round(time.perf_counter() - t, 1), "record": record,
            "peak_anon": peak.stop(), **_status()}


def _worker_search(folder: str, how: str, queries: str) -> dict:
    import faiss

    from vlp.retrieval.index import apply_parameters
    from vlp.retrieval.search import Searcher

    q = np.load(queries)
    opened = _status()
    t = time.perf_counter()
    if how == "loaded":  # the whole file read into memory
        index = faiss.read_index(str(Path(folder) / "image.index"))
        apply_parameters(index, json.loads((Path(folder) / "index_info.json").read_text())
                         ["image"]["search_params"])
    else:
        index = Searcher(folder).index("image")
    opened = {k: round(v - opened[k], 1) for k, v in _status().items()}
    opened["s"] = round(time.perf_counter() - t, 2)
    times, found = [], None
    for _ in range(2):  # cold, then warm
        t = time.perf_counter()
        found = index.search(q, 10)[1]
        times.append(time.perf_counter() - t)
    return {"qps_cold": round(len(q) / times[0], 1), "qps_warm": round(len(q) / times[1], 1),
            "found": found.tolist(), "opened_MB": opened, **_status()}


def _spawn(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), "--worker", *argv], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    if args.worker:
        kind, *rest = args.worker
        print(json.dumps(_worker_build(*rest) if kind == "build" else _worker_search(*rest)))
        return
    work = Path(args.work)
    ram, disk = work / "ram", work / "disk"
    centres = _centres(args.dim, args.seed)
    corpus = args.n * args.dim * 4
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        store_embeddings(ram, _chunks(args, centres))
        shutil.copytree(ram, disk, copy_function=os.link)  # the same chunk files
        print(f"corpus written in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"corpus: {args.n} x {args.dim} float32 = {corpus / 1e6:.0f} MB "
          f"({corpus / parse_memory(args.max_memory):.1f}x --max-memory {args.max_memory})",
          flush=True)

    queries = _points(centres, args.queries, np.random.default_rng(args.seed + 2))
    np.save(work / "queries.npy", queries)
    n_chunks = -(-args.n // args.chunk)

    def chunks():
        first = 0
        for c in range(n_chunks):
            x = np.load(chunk_path(ram, "img", c))
            yield first, x
            first += len(x)

    exact = exact_knn(queries, chunks())[1]
    variants = (("in RAM", ram, "4GB"), ("on disk", disk, args.max_memory))
    builds_file = work / "builds.json"
    builds = json.loads(builds_file.read_text()) if args.reuse else {}
    for name, folder, budget in variants:
        if name not in builds:
            builds[name] = _spawn("build", str(folder), budget)
            builds_file.write_text(json.dumps(builds))
        b, r = builds[name], builds[name]["record"]
        print(f"{name}: {r['factory']} {r['storage']}, built in {b['build_s']} s "
              f"(train {r['train_s']} s, add {r['add_s']} s), peak {b['peak_anon']} MB "
              f"anonymous, {b['VmHWM']} MB with mapped files", flush=True)

    searches = [(name, folder, how) for name, folder, _ in variants
                for how in (("loaded", "mapped") if name == "in RAM" else ("mapped",))]
    measured: dict[tuple, list[dict]] = {(n, h): [] for n, _, h in searches}
    for _ in range(args.rounds):  # interleaved: the machine's load hits every variant alike
        for name, folder, how in searches:
            _drop_cache(folder)
            s = _spawn("search", str(folder), how, str(work / "queries.npy"))
            s["recall"] = recall_at_k(np.array(s.pop("found")), exact)
            measured[(name, how)].append(s)
    rows = []
    for name, folder, how in searches:
        b, r, runs = builds[name], builds[name]["record"], measured[(name, how)]
        med = lambda key, sub=None: float(np.median(  # noqa: E731
            [x[key] if sub is None else x[key][sub] for x in runs]))
        rows.append({"index": name, "opened": how, "factory": r["factory"],
                     "storage": r["storage"], "max_memory": r["max_memory_bytes"],
                     "build_s": b["build_s"], "train_s": r["train_s"], "add_s": r["add_s"],
                     "parts": r.get("parts"), "build_peak_anon_MB": b["peak_anon"],
                     "build_peak_MB": b["VmHWM"],
                     "files_MB": round(sum(p.stat().st_size for p in
                                           [*folder.glob("*.index"),
                                            *folder.glob("*.ivfdata")]) / 1e6, 1),
                     "search_params": r["search_params"],
                     "recall@10": round(runs[0]["recall"], 4),
                     "qps_cold": med("qps_cold"), "qps_warm": med("qps_warm"),
                     "search_RssAnon_MB": med("RssAnon"), "search_RssFile_MB": med("RssFile"),
                     "open_s": med("opened_MB", "s"),
                     "open_RssAnon_MB": med("opened_MB", "RssAnon"), "rounds": len(runs)})
        print(json.dumps(rows[-1]), flush=True)
    head = ("| index | opened | build s (train + add) | build peak MB anon (all) | files MB | "
            "recall@10 | open s | queries/s cold / warm | search RSS MB anon / file |")
    print("\n" + head + "\n|" + "---|" * 9)
    for r in rows:
        budget = f"{r['max_memory'] / 1e6:.0f}MB"
        print(f"| {r['index']} ({r['factory']}, --max-memory {budget}) | {r['opened']} "
              f"| {r['build_s']} ({r['train_s']} + {r['add_s']}) | {r['build_peak_anon_MB']:.0f} "
              f"({r['build_peak_MB']:.0f}) | {r['files_MB']:.0f} | {r['recall@10']:.3f} | "
              f"{r['open_s']} | {r['qps_cold']:.0f} / {r['qps_warm']:.0f} | "
              f"{r['search_RssAnon_MB']:.0f} / {r['search_RssFile_MB']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
