"""`vlp index build` under torchrun / deepspeed (2 CPU processes, gloo): each rank embeds a
share of the chunks, rank 0 merges and builds the index, and the folder equals a one-process
build's byte for byte (embeddings), row for row (metadata, skips per chunk) and answer for
answer (index); a partial multi-process build resumes with any number of processes and keeps
what was written."""
import json
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from launch import ROOT, command, env, run

from test_retrieval_index import _add, corpus, model_dir  # noqa: F401 - session fixtures
from vlp.cli import main
from vlp.data.shards import expand_urls
from vlp.data.synth import generate
from vlp.retrieval.embed import count_raw
from vlp.retrieval.parallel import Run, chunk_start, deal

CHUNK = 12  # chunk boundaries fall inside shards (8 samples each)
ARGS = ["--chunk-size", str(CHUNK), "--batch-size", "5", "--text", "--no-progress",
        "--index-type", "IVF4,Flat"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shard list with a truncated shard in the middle (a shard error after its first
    samples) and, last, a shard of corrupt samples: 9 + 1 shards, chunks cut across them."""
    root = tmp_path_factory.mktemp("dist_corpus")
    generate(root, images=72, val_images=0, benchmark_images=0, shard_size=8, progress=False)
    train = sorted((root / "train").glob("*.tar"))
    cut = root / "cut.tar"
    data = train[-1].read_bytes()
    cut.write_bytes(data[:int(len(data) * 0.55)])
    with tarfile.open(root / "bad.tar", "w") as tar:
        for key in ("bad0", "bad1"):
            _add(tar, f"{key}.jpg", b"not a jpeg at all")
            _add(tar, f"{key}.txt", b"a red circle")
    return "::".join(str(p) for p in [*train[:3], cut, *train[3:-1], root / "bad.tar"])


def one_process(args: list[str]) -> int:
    """`vlp ARGS` in this process on one thread, as each of the 2 processes on this 2-core
    machine: CPU matmul kernels split their sums by thread count, so the last bits of an
    embedding depend on it (as on the batch; not on the number of processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(shards, model_dir, tmp_path_factory):  # noqa: F811
    """The one-process build."""
    out = tmp_path_factory.mktemp("dist_ref") / "index"
    assert one_process(["index", "build", "--model", str(model_dir), "--data", shards,
                        "--out", str(out), *ARGS]) == 0
    return out


def _rows(index_dir: Path) -> dict[str, list]:
    with sqlite3.connect(index_dir / "meta.sqlite") as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("samples", "thumbs", "chunks", "state")}


def _assert_same_build(a: Path, b: Path) -> None:
    files = sorted(p.name for p in (a / "emb").glob("*.npy"))
    assert files == sorted(p.name for p in (b / "emb").glob("*.npy")) and len(files) > 8
    for name in files:
        x, y = np.load(a / "emb" / name), np.load(b / "emb" / name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert _rows(a) == _rows(b)
    ia, ib = (json.loads((p / "index_info.json").read_text()) for p in (a, b))
    assert ia["count"] == ib["count"] and ia["skipped"] == ib["skipped"]
    texts = np.concatenate([np.load(p) for p in sorted((a / "emb").glob("txt_*.npy"))])
    for modality, file in (("image", "image.index"), ("text", "text.index")):
        assert ia[modality]["factory"] == ib[modality]["factory"] == "IVF4,Flat"
        assert ia[modality]["tuning"] == ib[modality]["tuning"]
        answers = []
        for folder, info in ((a, ia), (b, ib)):
            index = faiss.read_index(str(folder / file))
            faiss.ParameterSpace().set_index_parameters(index, info[modality]["search_params"])
            answers.append(index.search(texts, 10))
        np.testing.assert_array_equal(answers[0][1], answers[1][1])
        np.testing.assert_array_equal(answers[0][0], answers[1][0])
    assert not (b / "parts").exists()


def test_reference_has_what_the_test_needs(reference):
    info = json.loads((reference / "index_info.json").read_text())
    # the cut shard failed after some samples; the bad shard's samples were skipped
    assert info["skipped"]["shard_error"] == 1 and info["skipped"]["corrupt_image"] == 2
    chunks = _rows(reference)["chunks"]
    assert len(chunks) >= 6 and any(c[3] % 8 for c in chunks)  # boundaries inside shards


def test_two_processes_build_what_one_builds(shards, model_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "index"
    proc = run("torchrun", 2, ["index", "build", "--model", str(model_dir), "--data", shards,
                               "--out", str(out), *ARGS])
    _assert_same_build(reference, out)
    info = json.loads((out / "index_info.json").read_text())
    assert info["processes"] == 2 and info["complete"]
    # rank 1 did embed its share (it says so; rank 0 prints the index summary)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("rank 1 of 2:"))
    assert int(line.split(" samples")[0].split()[-1]) > 0
    assert "image.index:" in proc.stdout


def test_partial_builds_resume_with_any_number_of_processes(  # noqa: F811
        shards, model_dir, reference, tmp_path):
    """2 processes stop after one chunk each, 1 process adds one more, 2 processes (through
    deepspeed's launcher) finish: the chunks written on the way are kept (not rewritten) and
    the result is the one-process build."""
    out = tmp_path / "index"
    build = ["index", "build", "--model", str(model_dir), "--data", shards, "--out", str(out),
             *ARGS]
    run("torchrun", 2, [*build, "--max-chunks", "1"])
    assert [c[0] for c in _rows(out)["chunks"]] == [0]  # rank 0's chunk, merged
    parts = sorted((out / "parts").glob("chunk_*.sqlite"))
    assert len(parts) == 1  # rank 1's first chunk: after a gap, waiting for its turn
    theirs = int(parts[0].stem.split("_")[1])
    assert theirs > 1 and not (out / "image.index").exists()
    assert json.loads((out / "index_info.json").read_text())["complete"] is False

    assert one_process([*build, "--max-chunks", "1"]) == 0  # one process: the next chunk in order
    assert [c[0] for c in _rows(out)["chunks"]] == [0, 1]
    kept = {p: p.stat().st_mtime_ns for c in (0, 1, theirs)
            for p in (out / "emb" / f"img_{c:05d}.npy", out / "emb" / f"txt_{c:05d}.npy")}

    run("deepspeed", 2, build)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    _assert_same_build(reference, out)


def test_chunk_starts_are_where_one_process_resumes(shards, reference):
    """Where the plan starts chunk c (from the shards' sample counts alone) is where the
    one-process run recorded that chunk c-1 ended."""
    urls = expand_urls(shards)
    counts = [count_raw(u) for u in urls]
    assert counts[3] < 8 and sum(counts) == 72 - 8 + counts[3] + 2
    for c, _, _, raw_end, shard_end, offset_end, _ in _rows(reference)["chunks"][:-1]:
        start = chunk_start(c + 1, CHUNK, counts)
        assert (start.chunk, start.shard, start.offset) == (c + 1, shard_end, offset_end)
        assert raw_end == (c + 1) * CHUNK
    assert chunk_start(0, CHUNK, counts).shard == 0


def test_deal():
    assert deal(list(range(6)), 2, 5) == [[Run(0, 3)], [Run(3, None)]]
    assert deal([2, 4, 5], 2, 5) == [[Run(2, 3), Run(4, 5)], [Run(5, None)]]
    assert deal([1, 2], 2, None) == [[Run(1, 2)], [Run(2, 3)]]
    assert deal([3], 3, 3) == [[Run(3, None)], [], []]  # more ranks than chunks


def test_other_settings_stop_every_rank(shards, model_dir, reference, tmp_path):  # noqa: F811
    """A rerun into a folder with another chunk size: rank 0 finds it, every rank stops with
    its message (none waits for the others)."""
    out = tmp_path / "index"
    out.mkdir()
    for name in ("build.json", "meta.sqlite"):
        (out / name).write_bytes((reference / name).read_bytes())
    proc = subprocess.run(command("torchrun", 2, ["index", "build", "--model", str(model_dir),
                                                  "--data", shards, "--out", str(out),
                                                  "--chunk-size", "8", "--no-progress"]),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("records chunk_size=12 but this build has chunk_size=8") == 2
