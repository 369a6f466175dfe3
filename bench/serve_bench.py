"""`vlp serve` under a burst of concurrent clients: answered, latency, queries/s, memory.
A benchmark, not a test; bench/README.md has results.

Starts `python -m vlp serve` (a process of its own, so its peak memory is its own) over an
index, waits until it answers, then sends --clients requests at once from one asyncio client
(a connection each, on loopback) and waits up to --timeout s for each answer. A request counts
as answered when it got a 200 with results within the timeout. Reported per burst: answered,
p50 / p99 / max latency (of all requests: a refused or timed-out one counts its time), queries/s
(answered / the burst's wall time), and the server's peak resident memory (VmHWM) after
all bursts with its resident memory before the first.

--baseline-src DIR also starts the service of another source tree (a folder holding `vlp/`,
e.g. `git archive OLD vlp | tar -x -C DIR`), and the two servers take turns burst by burst, so
a busy moment on the machine hits both.

Without --index the bench builds the default-size index first: 1,000 images, as many as the
README's retrieval acceptance indexes (a shapes-world corpus generated once into --work),
embedded with `--text` by the default dual tower (1.8M parameters; `--model vit-b-32`: CLIP
ViT-B/32's tower shapes), randomly initialised: weights do not change the speed.

    python bench/serve_bench.py                                  # text and image bursts
    python bench/serve_bench.py --model vit-b-32                 # a CLIP ViT-B/32-sized model
    python bench/serve_bench.py --kinds text --rounds 5 --baseline-src /tmp/serve_old
    python bench/serve_bench.py --index runs/a/index --clients 500
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

MODELS = ("default", "vit-b-32")
TEXTS = ["a red circle", "a small blue square on the left", "two green triangles",
         "a yellow star above a purple hexagon", "a large white diamond in the top right",
         "a red cross to the left of a blue circle", "three shapes", "a small pink circle"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", help="an index folder (default: build the default-size one)")
    p.add_argument("--work", default="/tmp/vlp_serve_bench", help="where the default index "
                   "and its corpus are built (reused when present)")
    p.add_argument("--model", default="default", choices=sorted(MODELS),
                   help="without --index: the model shape that embeds the corpus and serves")
    p.add_argument("--clients", type=int, default=200, help="concurrent requests per burst")
    p.add_argument("--kinds", default="text,image", help="bursts: text (POST /api/search) "
                   "and/or image (POST /api/search/image with a 64x64 JPEG)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="bursts of each kind per server")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits")
    p.add_argument("--baseline-src", help="a source tree whose `vlp serve` runs alongside")
    p.add_argument("--out", help="also write the rows as JSON here")
    return p.parse_args()


# --------------------------------------------------------------------------- the index
def _model_config(name: str):
    from vlp.config import ModelConfig, TextConfig, VisionConfig

    if name == "vit-b-32":  # CLIP ViT-B/32's towers (with a 1k vocabulary, not 49k)
        return ModelConfig(embed_dim=512, vision=VisionConfig(
            width=768, layers=12, heads=12, image_size=224, patch_size=32, pre_norm=True,
            act="quick_gelu"), text=TextConfig(width=512, layers=12, heads=8, context_length=77,
                                               act="quick_gelu"))
    return ModelConfig()  # the default `vlp pretrain` run's shape


def default_index(work: Path, model: str) -> Path:
    """1,000 shapes-world images embedded by a randomly initialised dual tower of shape
    `model` (MODELS), image + text index."""
    index = work / model / "index"
    if (index / "index_info.json").is_file():
        return index
    import torch

    from vlp.api import Pretrained
    from vlp.data.pipeline import iter_captions
    from vlp.data.synth import generate
    from vlp.data.transforms import ImageTransform
    from vlp.models import DualTower
    from vlp.retrieval import build
    from vlp.tokenizer import train_tokenizer

    data = work / "data"
    if not (data / "MANIFEST.json").is_file():
        generate(data, images=1000, val_images=0, benchmark_images=0, progress=False)
    torch.manual_seed(0)
    tok = train_tokenizer(iter_captions(f"{data}/train"), vocab_size=1000)
    cfg = _model_config(model)
    model_dir = work / model / "model"
    Pretrained(DualTower(cfg, vocab_size=tok.vocab_size), tok,
               ImageTransform(cfg.vision.image_size)).save(model_dir)
    build(model_dir, f"{data}/train", index, text=True, progress=False)
    return index


def query_image(index: Path) -> bytes:
    """A JPEG of the corpus (the first of the first shard the index recorded)."""
    import sqlite3

    with sqlite3.connect(index / "meta.sqlite") as db:
        shard = db.execute("SELECT shard FROM samples ORDER BY id LIMIT 1").fetchone()[0]
    with tarfile.open(shard[5:] if shard.startswith("file:") else shard) as tar:
        member = next(m for m in tar if m.name.endswith((".jpg", ".png", ".webp")))
        return tar.extractfile(member).read()


# --------------------------------------------------------------------------- the servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, index: Path, src: Path):
        self.name, self.port = name, free_port()
        # `src`'s vlp first on the path; run from `src` too, because `python -m` puts the
        # working directory before PYTHONPATH (run from a checkout, it would import that one)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen([sys.executable, "-m", "vlp", "serve", "--index",
                                      str(index.resolve()), "--port", str(self.port)],
                                     env=env, cwd=src, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.env, self.cwd = env, src
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/info", timeout=5)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"{name} server did not start (exit {self.proc.poll()})")
                time.sleep(0.2)
        self.rss_start = self.memory("VmRSS")

    def code(self) -> str:
        """The serve.py a Python started like the server (same path, same directory) imports."""
        out = subprocess.run([sys.executable, "-c", "import vlp.retrieval.serve as s; "
                              "print(s.__file__)"], env=self.env, cwd=self.cwd,
                             capture_output=True, text=True)
        return out.stdout.strip() or out.stderr.strip()[-200:]

    def memory(self, field: str = "VmHWM") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def wait_idle(self, limit: float = 300) -> None:
        """Until the process stops using CPU: a server still working through requests whose
        clients gave up would steal the other server's burst."""
        deadline = time.time() + limit
        while time.time() < deadline:
            before = self.cpu_seconds()
            time.sleep(0.5)
            if self.cpu_seconds() - before < 0.05:
                return

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- the clients
async def one_request(port: int, path: str, body: bytes, content_type: str,
                      timeout: float) -> tuple[bool, float]:
    t = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         f"{content_type}\r\nContent-Length: {len(body)}\r\nConnection: close"
                         "\r\n\r\n".encode() + body)
            await writer.drain()
            data = await reader.read()
            writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        ok = head.split(b" ", 2)[1] == b"200" and "results" in json.loads(payload)
    except (OSError, TimeoutError, ValueError, IndexError):
        ok = False
    return ok, time.perf_counter() - t


async def burst(port: int, requests: list[tuple[str, bytes, str]], timeout: float):
    t = time.perf_counter()
    results = await asyncio.gather(*(one_request(port, *r, timeout) for r in requests))
    return results, time.perf_counter() - t


def requests_for(kind: str, clients: int, k: int, image: bytes) -> list[tuple[str, bytes, str]]:
    if kind == "image":
        return [(f"/api/search/image?k={k}", image, "image/jpeg")] * clients
    return [("/api/search", json.dumps({"text": TEXTS[i % len(TEXTS)], "k": k}).encode(),
             "application/json") for i in range(clients)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    args = parse_args()
    if sys.version_info < (3, 11):
        sys.exit("serve_bench.py needs Python 3.11+ (asyncio.timeout)")
    index = Path(args.index) if args.index else default_index(Path(args.work), args.model)
    count = json.loads((index / "index_info.json").read_text())["image"]["count"]
    image = query_image(index)
    servers = [Server("this tree", index, Path(__file__).resolve().parents[1])]
    if args.baseline_src:
        servers.append(Server(f"baseline ({args.baseline_src})", index,
                              Path(args.baseline_src).resolve()))
    for server in servers:  # which code each one runs
        print(f"{server.name}: {server.code()}", flush=True)
    kinds = [k for k in args.kinds.split(",") if k]
    runs: dict[tuple[str, str], list] = {}
    try:
        for server in servers:  # warm-up: the first queries load the index and the encoder
            for kind in kinds:
                asyncio.run(burst(server.port, requests_for(kind, 4, args.k, image), 60))
        for r in range(args.rounds):
            for kind in kinds:
                for server in servers if r % 2 == 0 else servers[::-1]:
                    for s in servers:
                        s.wait_idle()
                    results, wall = asyncio.run(burst(
                        server.port, requests_for(kind, args.clients, args.k, image),
                        args.timeout))
                    runs.setdefault((server.name, kind), []).append((results, wall))
                    answered = sum(ok for ok, _ in results)
                    print(f"round {r + 1} {server.name} {kind}: {answered}/{args.clients} "
                          f"answered in {wall:.2f} s", flush=True)
        peaks = {s.name: (s.rss_start, s.memory("VmHWM")) for s in servers}
    finally:
        for server in servers:
            server.stop()

    rows = []
    print(f"\nindex: {count} images ({index}); {args.clients} concurrent clients, k={args.k}, "
          f"{args.rounds} bursts each, timeout {args.timeout:g} s")
    print("| server | queries | answered | p50 s | p99 s | max s | queries/s | server memory "
          "(start -> peak) |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, kind), bursts in runs.items():
        latencies = [t for results, _ in bursts for _, t in results]
        answered = [sum(ok for ok, _ in results) for results, _ in bursts]
        qps = statistics.median(a / wall for a, (_, wall) in zip(answered, bursts))
        start, peak = peaks[name]
        row = {"server": name, "kind": kind, "clients": args.clients,
               "answered_min": min(answered), "answered": answered,
               "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
               "max_s": max(latencies), "qps_median": qps,
               "rss_start_mb": start / 2 ** 20, "peak_mb": peak / 2 ** 20}
        rows.append(row)
        print(f"| {name} | {kind} | {min(answered)}/{args.clients} (worst burst) | "
              f"{row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['max_s']:.2f} | {qps:.0f} | "
              f"{row['rss_start_mb']:.0f} -> {row['peak_mb']:.0f} MB |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
