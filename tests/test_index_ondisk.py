"""Indexes larger than RAM: IVF indexes whose inverted lists live on disk (merged from parts
with faiss's merge_ondisk) answer exactly as the same index built in RAM from the same vectors
and the same training; search and the service open indexes memory-mapped."""
import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from test_retrieval_index import built, corpus, model_dir  # noqa: F401 - session fixtures
from vlp.cli import main
from vlp.retrieval import Searcher, build_index, choose_index
from vlp.retrieval.embed import store_embeddings
from vlp.retrieval.index import open_index
from vlp.retrieval.serve import make_server

N, D, CHUNK = 6000, 32, 500


def _vectors(seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (what image embeddings look like to an IVF index)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(60, D))
    x = centers[rng.integers(0, 60, N)] + 0.6 * rng.normal(size=(N, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors():
    return _vectors()


@pytest.fixture(autouse=True)
def one_faiss_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _folder(path: Path, x: np.ndarray) -> Path:
    store_embeddings(path, (x[i:i + CHUNK] for i in range(0, len(x), CHUNK)))
    return path


def _lists_bytes(x: np.ndarray) -> int:
    return x.shape[0] * (x.shape[1] * 4 + 8)  # IVF-Flat codes + ids


@pytest.mark.parametrize("family", ["ivf", "ivf-pq", "OPQ8_32,IVF64,PQ8x6np"])
def test_on_disk_answers_equal_in_ram(family, vectors, tmp_path):
    """The same vectors indexed twice with the same family and seed: once in RAM (a budget
    that holds them), once with a budget a quarter of the lists, which puts them on disk,
    merged from several parts. Same training (equal cells), and for every nprobe the same
    ids and scores, exactly, read plainly, memory-mapped, and through Searcher."""
    ram_dir, disk_dir = _folder(tmp_path / "ram", vectors), _folder(tmp_path / "disk", vectors)
    ram = build_index(ram_dir, index_type=family, max_memory="1GB", progress=False)
    if family == "ivf":  # lists over the budget go to disk by themselves
        disk = build_index(disk_dir, index_type=family, max_memory=_lists_bytes(vectors) // 4,
                           progress=False)
    else:  # PQ codes sized to a small budget would differ: ask for disk, keep the codes
        budget = 200_000 if family == "ivf-pq" else 50_000  # a few parts beside the quantizer
        disk = build_index(disk_dir, index_type=family, max_memory=budget, on_disk=True,
                           progress=False)
    assert ram["storage"] == "ram" and disk["storage"] == "disk"
    assert ram["factory"] == disk["factory"] and "on disk" in disk["reason"]
    assert disk["parts"] >= 2  # merged from several in-RAM parts
    ivfdata = disk_dir / disk["ivfdata"]
    assert ivfdata.is_file() and disk["ivfdata_bytes"] == ivfdata.stat().st_size
    # the index file holds the quantizer, the lists are in .ivfdata
    assert (disk_dir / "image.index").stat().st_size < ivfdata.stat().st_size
    assert disk["resident_bytes"] < disk["max_memory_bytes"]
    # same tuning and recall: the same answers all along the nprobe ladder
    assert disk["tuning"] == ram["tuning"] and disk["recall@10"] == ram["recall@10"]

    plain = faiss.read_index(str(ram_dir / "image.index"))
    mapped_ram = open_index(ram_dir, "image", ram)
    mapped_disk = open_index(disk_dir, "image", disk)
    assert isinstance(faiss.downcast_InvertedLists(
        faiss.extract_index_ivf(mapped_disk).invlists), faiss.OnDiskInvertedLists)
    cells = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, faiss.extract_index_ivf(i).nlist)
             for i in (plain, mapped_disk)]
    np.testing.assert_array_equal(cells[0], cells[1])
    queries = np.concatenate([vectors[::20], _vectors(seed=1)[:300]])
    nlist = faiss.extract_index_ivf(plain).nlist
    for nprobe in (1, 4, nlist):
        results = []
        for index in (plain, mapped_ram, mapped_disk):
            faiss.ParameterSpace().set_index_parameters(index, f"nprobe={nprobe}")
            results.append(index.search(queries, 10))
        for scores, ids in results[1:]:
            np.testing.assert_array_equal(ids, results[0][1])
            np.testing.assert_array_equal(scores, results[0][0])
    a = Searcher(ram_dir).search_vectors(queries[:50], [10] * 50)
    b = Searcher(disk_dir).search_vectors(queries[:50], [10] * 50)
    assert a == b and len(a[0]) == 10


def test_choose_index_on_disk():
    n, d = 1_000_000, 128  # IVF-Flat lists: 1e6 * (512 + 8) bytes = 520 MB
    ram = choose_index(n, d, "1GB", "ivf")
    assert not ram.on_disk and ram.resident is None
    disk = choose_index(n, d, "200MB", "ivf")
    assert disk.on_disk and disk.factory == ram.factory == "IVF4096,Flat"
    assert disk.resident == 4096 * d * 4  # the centroids stay in RAM
    assert "inverted lists on disk (520.0 MB > 200.0 MB)" in disk.reason
    assert not choose_index(n, d, "200MB", "ivf", on_disk=False).on_disk
    assert choose_index(n, d, "1GB", "ivf", on_disk=True).on_disk
    # auto still picks codes that fit the budget, in RAM; --on-disk makes it IVF-Flat on disk
    auto = choose_index(n, d, "200MB")
    assert auto.name == "opq-pq" and not auto.on_disk
    forced = choose_index(n, d, "200MB", on_disk=True)
    assert forced.on_disk and forced.factory == "IVF4096_HNSW32,Flat"
    assert choose_index(n, d, "200MB", "IVF64,PQ16", on_disk=True).on_disk
    for bad in ("flat", "hnsw", "HNSW32,Flat"):
        with pytest.raises(ValueError, match="needs an IVF index"):
            choose_index(n, d, "200MB", bad, on_disk=True)
    with pytest.raises(ValueError, match="--on-disk"):  # nothing fits: the message says so
        choose_index(10 ** 9, 512, "1GB")


def test_on_disk_index_moves_survives_rebuild_and_opens_read_only(vectors, tmp_path):
    """The .ivfdata is found beside the index file wherever the folder goes, is mapped
    read-only (a read-only file opens), and a Searcher keeps answering from the file it
    mapped while a rebuild replaces it (new name; the old one is deleted)."""
    first = _folder(tmp_path / "a", vectors)
    record = build_index(first, index_type="ivf", max_memory="300KB", progress=False)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(first, moved)
    ivfdata = moved / record["ivfdata"]
    ivfdata.chmod(stat.S_IRUSR)  # read-only
    searcher = Searcher(moved)
    before = searcher.search_vectors(vectors[:20], [10] * 20)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(str(ivfdata))]
    assert maps and all(m[1].startswith("r-") for m in maps)  # mapped without write access
    assert [h.id for h in before[0]][0] == 0 and before[0][0].score == pytest.approx(1, abs=1e-5)

    rebuilt = build_index(moved, index_type="ivf", max_memory="1GB", progress=False)
    assert rebuilt["storage"] == "ram" and not list(moved.glob("image.*.ivfdata"))
    assert searcher.search_vectors(vectors[:20], [10] * 20) == before  # the mapped old file
    assert Searcher(moved).search_vectors(vectors[:20], [10] * 20) == before

    with pytest.raises(FileNotFoundError, match="keep the two together"):
        record = build_index(moved, index_type="ivf", max_memory="300KB", progress=False)
        (moved / record["ivfdata"]).unlink()
        Searcher(moved).index("image")


def test_vectors_without_a_model_need_one_for_text(vectors, tmp_path):
    folder = _folder(tmp_path / "v", vectors[:600])
    build_index(folder, progress=False)
    with pytest.raises(ValueError, match="without a model"):
        Searcher(folder).search_text("a red circle")


def test_cli_on_disk_build_search_and_serve(corpus, model_dir, built, tmp_path):  # noqa: F811
    """`vlp index build --on-disk` on shards, then `vlp search --json` in a fresh process
    (stdout is pure JSON: faiss's printf stays out) and the service: the answers of the same
    index kept in RAM."""
    args = ["--model", str(model_dir), "--data", corpus[0], "--chunk-size", "16",
            "--batch-size", "16", "--no-progress", "--index-type", "IVF4,Flat"]
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    assert main(["index", "build", "--out", str(ram), *args]) == 0
    assert main(["index", "build", "--out", str(disk), "--on-disk", *args]) == 0
    info = json.loads((disk / "index_info.json").read_text())["image"]
    assert info["storage"] == "disk" and info["count"] == 64
    out = {}
    for name, folder in (("ram", ram), ("disk", disk)):
        proc = subprocess.run([sys.executable, "-m", "vlp", "search", "a red circle", "--index",
                               str(folder), "-k", "8", "--json"], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).parent.parent,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads(proc.stdout)["results"]
    assert out["disk"] == out["ram"] and len(out["disk"]) == 8

    searcher = Searcher(disk)
    server = make_server(searcher, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request("POST", "/api/search", json.dumps({"text": "a red circle", "k": 8}),
                     {"Content-Type": "application/json"})
        got = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [r["key"] for r in got["results"]] == [r["key"] for r in out["ram"]]
