"""Embed a corpus of shards for retrieval: the first stage of vlp/retrieval.

    shard list (expand_urls) -> raw samples in shard order, numbered 0, 1, 2, ...
      -> chunk c = raw samples [c * chunk_size, (c + 1) * chunk_size)
      -> decode + caption (bad samples skipped and counted by reason, as in vlp/data)
      -> model.encode_image (and encode_text of the caption with text=True), in batches
      -> emb/img_{c:05d}.npy (+ emb/txt_{c:05d}.npy), each written to a temporary name and
         renamed into place
      -> its rows in meta.sqlite (samples, thumbs) and a `chunks` row, in one transaction:
         the committed `chunks` row is what marks chunk c as done

Chunks count raw samples (every key in the tars, usable or not), so their boundaries depend
only on the shard list and chunk_size, and a rerun after a kill picks up at the first chunk
not done and writes the same chunks a single run would have. A chunk's row records where its
raw samples end (shard index, samples read in that shard), so a resumed run opens that shard
and skips what it has already read instead of reading the whole corpus again.

Row i of the concatenated chunks is the faiss id of sample i and `samples.id` in meta.sqlite.
A sample's image is served later from its shard: for a local uncompressed tar the member's
byte offset and size are stored (a header-only scan of the tar finds them); for remote or
compressed shards a small JPEG thumbnail is stored in `thumbs` instead.

Several processes (vlp/retrieval/parallel.py) embed disjoint runs of the same chunks: a rank
writes chunk c's .npy files as above and its rows, numbered from 0, into its own
parts/chunk_{c:05d}.sqlite (same schema, renamed into place last: its presence marks the
chunk done); `merge_parts` later moves the parts into meta.sqlite in chunk order with their
global ids. The one-process run merges whatever a multi-process run left before it goes on.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

# the training pipeline's own sample parsing, so a sample is skipped here for exactly the
# reasons (and with the same names) it is skipped in training and evaluation
from vlp.data.pipeline import IMAGE_EXTS, SkipCounter, SkipSample, accumulate, format_skips, \
    parse_sample
from vlp.data.shards import count_samples, expand_urls, is_remote, iter_tar_samples

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
THUMB_SIDE = 256  # stored thumbnails (remote/compressed shards only): longest side in pixels
META_FILE = "meta.sqlite"
SETTINGS_FILE = "build.json"
PARTS_DIR = "parts"           # chunks embedded by the ranks of a multi-process run, not merged yet
COMPLETE_FILE = "complete.json"  # parts/: the rank that read the end of the data says so here

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,   -- row in the concatenated embeddings = faiss id
    key TEXT NOT NULL,
    caption TEXT NOT NULL,    -- the caption embedded with text=True (.txt, else the first)
    captions TEXT NOT NULL,   -- JSON list: every caption of the sample
    shard TEXT NOT NULL,      -- the shard URL the sample was read from
    url TEXT,                 -- json `url` (img2dataset: where the image was downloaded)
    member TEXT,              -- the image's member name in the tar
    offset INTEGER,           -- its data offset in a local uncompressed tar, else NULL
    size INTEGER,
    chunk INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_key ON samples(key);
CREATE TABLE IF NOT EXISTS thumbs (id INTEGER PRIMARY KEY, mime TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    chunk INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    raw_end INTEGER NOT NULL,     -- raw samples read up to the end of this chunk
    shard_end INTEGER NOT NULL,   -- the next raw sample is sample `offset_end` of shard
    offset_end INTEGER NOT NULL,  --   `shard_end` in the shard list
    skipped TEXT NOT NULL         -- JSON skip counts by reason
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class EmbedReport:
    """What `embed_corpus` did: rows embedded in all, chunks in all and written by this call,
    skip counts by reason (all chunks), and whether the whole shard list has been read."""

    rows: int
    chunks: int
    chunks_written: int
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    def summary(self) -> str:
        done = "complete" if self.complete else "INCOMPLETE (rerun the same command to resume)"
        return (f"{self.rows} samples embedded in {self.chunks} chunks ({self.chunks_written} "
                f"written now, {self.chunks - self.chunks_written} already done); "
                f"{format_skips(self.skipped)}; {done}")


# --------------------------------------------------------------------------- small file helpers
def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name + os.replace, so a kill never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def chunk_path(index_dir: Path, kind: str, chunk: int) -> Path:
    """emb/img_00000.npy (kind "img") or emb/txt_00000.npy (kind "txt")."""
    return Path(index_dir) / "emb" / f"{kind}_{chunk:05d}.npy"


def connect(index_dir: str | Path, readonly: bool = False) -> sqlite3.Connection:
    path = Path(index_dir) / META_FILE
    if readonly:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {index_dir} is not an index folder "
                                    "(build one with `vlp index build`)")
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA)
    return db


def read_settings(index_dir: str | Path) -> dict:
    path = Path(index_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {index_dir} is not an index folder "
                                "(build one with `vlp index build`)")
    return json.loads(path.read_text())


def check_settings(index_dir: Path, settings: dict) -> None:
    """Record the build settings; a rerun into the same folder must use the same ones, or its
    chunks would not line up with those already written."""
    path = index_dir / SETTINGS_FILE
    if not path.is_file():
        write_atomic(path, (json.dumps(settings, indent=2) + "\n").encode())
        return
    old = json.loads(path.read_text())
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        was, now = old.get(k), settings[k]
        if k == "data" and isinstance(was, list):  # shard lists can be long: the first change
            i = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b),
                     min(len(was), len(now)))
            was = f"{len(was)} shards, #{i}: {was[i] if i < len(was) else '(none)'}"
            now = f"{len(now)} shards, #{i}: {now[i] if i < len(now) else '(none)'}"
        raise ValueError(
            f"{path} records {k}={was!r} but this build has {k}={now!r} (differing: {diff}). "
            "Resuming needs the same model, shards, chunk size, dtype and --text; use a new "
            "--out folder (or delete this one) to build with new settings.")


def _model_stamp(model_dir: Path) -> dict:
    """Identifies the weights cheaply (size + mtime): a resume with other weights would mix
    two embedding spaces in one index."""
    st = (model_dir / "model.safetensors").stat()
    return {"path": str(model_dir.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- reading the shards
def _member_offsets(url: str) -> dict[tuple[str, str], tuple[str, int, int]] | None:
    """{(key, ext): (member name, data offset, size)} of a local uncompressed tar, from its
    headers alone (tarfile's random-access mode seeks over the data); None for remote or
    compressed shards, whose bytes cannot be served later by offset."""
    if is_remote(url):
        return None
    path = url[len("file:"):] if url.startswith("file:") else url
    out: dict[tuple[str, str], tuple[str, int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    key, ext = base_plus_ext(info.name)
                    if key is not None:
                        out.setdefault((key, ext.lower()), (info.name, info.offset_data,
                                                            info.size))
    except (tarfile.ReadError, OSError):
        # compressed, or cut short: members read before the damage keep their offsets
        return out or None
    return out


def _raw_samples(urls: Sequence[str], shard: int, offset: int,
                 skips: SkipCounter) -> Iterator[tuple[int, int, dict]]:
    """(shard index, index in that shard, raw sample) from sample `offset` of shard `shard`
    on. One iter_tar_samples per shard, so positions are exact even when a URL repeats."""
    for j in range(shard, len(urls)):
        for o, sample in enumerate(iter_tar_samples([urls[j]], skips.shard_error)):
            if j == shard and o < offset:
                continue
            yield j, o, sample


def count_raw(url: str) -> int:
    """The raw samples of one shard as `_raw_samples` numbers them (every key, usable or not;
    those read before a shard error), read without decoding anything."""
    return sum(1 for _ in iter_tar_samples([url], lambda _url, _exn: None))


def _thumbnail(image: Image.Image) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --------------------------------------------------------------------------- resuming
def done_chunks(db: sqlite3.Connection, index_dir: Path, text: bool) -> list[tuple]:
    """The chunk rows 0..m-1 that are committed and whose files are whole; rows after the
    first gap (a chunk cut off by a kill, or a file lost) are dropped and redone."""
    rows = db.execute("SELECT chunk, first_id, rows, raw_end, shard_end, offset_end, skipped "
                      "FROM chunks ORDER BY chunk").fetchall()
    done = []
    for row in rows:
        c, first_id, n = row[0], row[1], row[2]
        expected_first = done[-1][1] + done[-1][2] if done else 0
        if c != len(done) or first_id != expected_first:
            break
        kinds = ("img", "txt") if text else ("img",)
        try:
            ok = all(np.load(chunk_path(index_dir, k, c), mmap_mode="r").shape[0] == n
                     for k in kinds)
        except (OSError, ValueError):
            ok = False
        if not ok:
            break
        done.append(row)
    with db:
        db.execute("DELETE FROM chunks WHERE chunk >= ?", (len(done),))
        db.execute("DELETE FROM thumbs WHERE id IN (SELECT id FROM samples WHERE chunk >= ?)",
                   (len(done),))
        db.execute("DELETE FROM samples WHERE chunk >= ?", (len(done),))
        if len(done) < len(rows):
            db.execute("DELETE FROM state WHERE name = 'complete'")
    return done


def part_path(index_dir: Path, chunk: int) -> Path:
    """parts/chunk_00000.sqlite: the rows of chunk `chunk` written by one rank."""
    return Path(index_dir) / PARTS_DIR / f"chunk_{chunk:05d}.sqlite"


def part_rows(index_dir: Path, chunk: int, text: bool) -> int | None:
    """Rows of chunk `chunk` when a rank has finished it (its part file is there and its
    .npy files have that many rows), else None."""
    path = part_path(index_dir, chunk)
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT rows FROM chunks WHERE chunk = ?", (chunk,)).fetchone()
        finally:
            db.close()
        kinds = ("img", "txt") if text else ("img",)
        if row is None or any(np.load(chunk_path(index_dir, k, chunk), mmap_mode="r").shape[0]
                              != row[0] for k in kinds):
            return None
    except (OSError, ValueError, sqlite3.DatabaseError):
        return None
    return int(row[0])


def merge_parts(db: sqlite3.Connection, index_dir: Path, text: bool) -> int:
    """Move the finished parts that continue meta.sqlite's chunks into it, in chunk order and
    with their global ids, and mark the build complete when the last chunk is among them.
    A part after a gap stays for a later merge. Returns the chunks merged."""
    parts = Path(index_dir) / PARTS_DIR
    if not parts.is_dir():
        return 0
    done = done_chunks(db, index_dir, text)
    chunk, first_id = len(done), (done[-1][1] + done[-1][2] if done else 0)
    for stale in parts.glob("chunk_*.sqlite"):  # merged before a kill: already in meta.sqlite
        if int(stale.stem.split("_")[1]) < chunk:
            stale.unlink()
    merged = 0
    while (rows := part_rows(index_dir, chunk, text)) is not None:
        path = part_path(index_dir, chunk)
        db.execute("ATTACH DATABASE ? AS part", (str(path),))
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO samples SELECT id + ?, key, caption, captions, "
                           "shard, url, member, offset, size, chunk FROM part.samples",
                           (first_id,))
                db.execute("INSERT OR REPLACE INTO thumbs SELECT id + ?, mime, data "
                           "FROM part.thumbs", (first_id,))
                db.execute("INSERT OR REPLACE INTO chunks SELECT chunk, ?, rows, raw_end, "
                           "shard_end, offset_end, skipped FROM part.chunks", (first_id,))
        finally:
            db.execute("DETACH DATABASE part")
        path.unlink()
        chunk, first_id, merged = chunk + 1, first_id + rows, merged + 1
    marker = parts / COMPLETE_FILE
    if marker.is_file() and json.loads(marker.read_text())["chunks"] == chunk:
        with db:
            db.execute("INSERT OR REPLACE INTO state VALUES ('complete', ?)",
                       (json.dumps({"raw": json.loads(marker.read_text())["raw"]}),))
        shutil.rmtree(parts, ignore_errors=True)
    return merged


def is_complete(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM state WHERE name = 'complete'").fetchone() is not None


def total_skips(db: sqlite3.Connection) -> dict[str, int]:
    total: dict[str, int] = {}
    for (skipped,) in db.execute("SELECT skipped FROM chunks"):
        accumulate(total, json.loads(skipped))
    return total


# --------------------------------------------------------------------------- the embedding run
class _Chunk:
    """The samples of one chunk on their way to its files and rows."""

    def __init__(self, index: int, first_id: int):
        self.index, self.first_id = index, first_id
        self.rows: list[tuple] = []       # samples rows, without id and chunk
        self.thumbs: list[bytes | None] = []
        self.captions: list[str] = []
        self.pixels: list[torch.Tensor] = []  # waiting for a full batch
        self.image_parts: list[np.ndarray] = []


@dataclass
class Start:
    """Where a run of chunks begins: chunk `chunk` (the id of its first row: `first_id`),
    i.e. raw sample `chunk * chunk_size`, which is sample `offset` of shard `shard`."""

    chunk: int
    first_id: int
    shard: int
    offset: int


@dataclass
class _RunEnd:
    written: int
    chunk: int      # the next chunk's index
    first_id: int   # the next chunk's first id
    raw: int        # raw samples read up to here
    complete: bool  # the end of the shard list was reached and its last chunk written


# write(chunk, skipped, raw_end, shard_end, offset_end): store one finished chunk
ChunkWriter = Callable[[_Chunk, dict, int, int, int], None]


def check_args(chunk_size: int, batch_size: int, dtype: str) -> None:
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and batch_size={batch_size} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")


def settings_for(model_dir: Path, urls: list[str], chunk_size: int, text: bool, dtype: str,
                 embed_dim: int) -> dict:
    """What build.json records: a rerun into the folder must match it (`check_settings`)."""
    return {"format_version": FORMAT_VERSION, "model": _model_stamp(model_dir), "data": urls,
            "chunk_size": chunk_size, "text": bool(text), "dtype": dtype, "embed_dim": embed_dim}


def embed_chunks(urls: Sequence[str], start: Start, write: ChunkWriter, model, *,
                 chunk_size: int, batch_size: int, local_ids: bool = False,
                 max_chunks: int | None = None, progress: bool = False,
                 total: int | None = None, desc: str = "embed corpus") -> _RunEnd:
    """Read the shards from `start` on and hand each finished chunk to `write`: after
    `max_chunks` chunks, or at the end of the shard list (then the last, short chunk too).

    Batches start at every chunk's first sample, so a chunk's vectors are the same bytes
    whichever process embeds it and wherever its run began (a batch's size and neighbours
    change the last bits of the encoder's output). `local_ids`: number each chunk's rows
    from 0 (a rank's part) instead of going on from `start.first_id`."""
    raw = start.chunk * chunk_size
    chunk = _Chunk(start.chunk, start.first_id)
    # One counter for the run; each chunk takes the counts gathered since the previous
    # one, so a shard error lands in the same chunk whether or not the run was resumed.
    skips = SkipCounter()
    written = 0
    offsets_url, offsets = None, None

    def finish(shard_end: int, offset_end: int) -> _Chunk:
        nonlocal written
        write(chunk, skips.pop(), raw, shard_end, offset_end)
        written += 1
        return _Chunk(chunk.index + 1, 0 if local_ids else chunk.first_id + len(chunk.rows))

    with tqdm(total=total, initial=0 if total is None else raw, desc=desc, unit="img",
              disable=not progress) as bar:
        for j, o, sample in _raw_samples(urls, start.shard, start.offset, skips):
            url = urls[j]
            if url != offsets_url:
                offsets_url, offsets = url, _member_offsets(url)
            _add_sample(chunk, skips, sample, url, offsets, model, batch_size)
            raw += 1
            bar.update()
            if raw % chunk_size == 0:
                chunk = finish(j, o + 1)
                if max_chunks is not None and written >= max_chunks:
                    return _RunEnd(written, chunk.index, chunk.first_id, raw, False)
    if raw % chunk_size or skips.counts or chunk.index == 0:
        # the last, short chunk (also an empty one that only carries shard-error counts)
        chunk = finish(len(urls), 0)
    return _RunEnd(written, chunk.index, chunk.first_id, raw, True)


def embed_corpus(model_dir: str | Path, data: str | Sequence[str], out: str | Path, *,
                 text: bool = False, chunk_size: int = 4096, batch_size: int = 256,
                 dtype: str = "float32", progress: bool = True, model=None,
                 max_chunks: int | None = None) -> EmbedReport:
    """Embed every usable sample of the `data` shards with the model in `model_dir` into the
    index folder `out` (layout: module docstring), in this one process. Resumable: chunks
    already done (also by the ranks of a multi-process run) are kept as they are and not
    embedded again.

    `model`: the already loaded `vlp.load(model_dir)` (else it is loaded here). `max_chunks`:
    stop after writing that many chunks in this call (the report says complete=False), for
    tests and for embedding a big corpus in several sittings.
    """
    check_args(chunk_size, batch_size, dtype)
    model_dir, out = Path(model_dir), Path(out)
    urls = expand_urls(data)
    if model is None:
        import vlp

        model = vlp.load(model_dir)
    (out / "emb").mkdir(parents=True, exist_ok=True)
    embed_dim = int(model.model.cfg.embed_dim)
    check_settings(out, settings_for(model_dir, urls, chunk_size, text, dtype, embed_dim))
    db = connect(out)
    try:
        merge_parts(db, out, text)
        done = done_chunks(db, out, text)
        if done and is_complete(db):
            return EmbedReport(done[-1][1] + done[-1][2], len(done), 0, total_skips(db), True)
        start = Start(len(done), done[-1][1] + done[-1][2] if done else 0,
                      *((done[-1][4], done[-1][5]) if done else (0, 0)))

        def write(chunk, skipped, raw_end, shard_end, offset_end):
            write_vectors(out, chunk, model, text, dtype, embed_dim)
            with db:
                insert_rows(db, chunk, skipped, raw_end, shard_end, offset_end)

        end = embed_chunks(urls, start, write, model, chunk_size=chunk_size,
                           batch_size=batch_size, max_chunks=max_chunks, progress=progress,
                           total=count_samples(urls))
        if end.complete:
            with db:
                db.execute("INSERT OR REPLACE INTO state VALUES ('complete', ?)",
                           (json.dumps({"raw": end.raw}),))
            shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # a multi-process run's rest
        return EmbedReport(end.first_id, end.chunk, end.written, total_skips(db), end.complete)
    finally:
        db.close()


def _add_sample(chunk: _Chunk, skips: SkipCounter, sample: dict, url: str, offsets, model,
                batch_size: int) -> None:
    try:
        meta, txt, captions, image, _ = parse_sample(sample)
    except SkipSample as skip:
        skips.add(skip.reason)
        return
    key = sample["__key__"]
    ext = next(e for e in IMAGE_EXTS if e in sample)  # parse_sample has found one
    member, off, size = (offsets or {}).get((key, ext), (None, None, None))
    chunk.rows.append((key, txt or captions[0], json.dumps(captions), url,
                       meta.get("url") if isinstance(meta.get("url"), str) else None,
                       member, off, size))
    chunk.thumbs.append(_thumbnail(image) if off is None else None)
    chunk.captions.append(txt or captions[0])
    chunk.pixels.append(model.transform(image))
    if len(chunk.pixels) >= batch_size:
        _flush_images(chunk, model)


def _flush_images(chunk: _Chunk, model) -> None:
    if chunk.pixels:
        chunk.image_parts.append(model.encode_image(torch.stack(chunk.pixels)).numpy())
        chunk.pixels = []


def write_vectors(out: Path, chunk: _Chunk, model, text: bool, dtype: str,
                  embed_dim: int) -> None:
    """The chunk's emb/img_*.npy (+ txt_*.npy), each renamed into place. Files go first and
    rows after: a kill in between leaves files without their rows, which the next run simply
    rewrites (with the same bytes)."""
    _flush_images(chunk, model)
    img = np.concatenate(chunk.image_parts) if chunk.image_parts else \
        np.zeros((0, embed_dim), np.float32)
    _save_npy(chunk_path(out, "img", chunk.index), img.astype(dtype))
    if text:
        txt = model.encode_text(chunk.captions).numpy() if chunk.captions else \
            np.zeros((0, embed_dim), np.float32)
        _save_npy(chunk_path(out, "txt", chunk.index), txt.astype(dtype))


def insert_rows(db: sqlite3.Connection, chunk: _Chunk, skipped: dict[str, int], raw_end: int,
                shard_end: int, offset_end: int) -> None:
    """The chunk's samples, thumbs and `chunks` rows (the caller holds the transaction)."""
    ids = range(chunk.first_id, chunk.first_id + len(chunk.rows))
    db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [(i, *row, chunk.index) for i, row in zip(ids, chunk.rows)])
    db.executemany("INSERT OR REPLACE INTO thumbs VALUES (?, 'image/jpeg', ?)",
                   [(i, t) for i, t in zip(ids, chunk.thumbs) if t is not None])
    db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
               (chunk.index, chunk.first_id, len(chunk.rows), raw_end, shard_end,
                offset_end, json.dumps(skipped, sort_keys=True)))


def write_part(out: Path, chunk: _Chunk, skipped: dict[str, int], raw_end: int,
               shard_end: int, offset_end: int) -> None:
    """A rank's chunk rows (ids from 0) into parts/chunk_*.sqlite, written under a temporary
    name and renamed into place: the part's presence marks the chunk done."""
    path = part_path(out, chunk.index)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    try:
        db.executescript(_SCHEMA)
        with db:
            insert_rows(db, chunk, skipped, raw_end, shard_end, offset_end)
    finally:
        db.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_embeddings(out: str | Path, chunks: Iterable[np.ndarray],
                     text_chunks: Iterable[np.ndarray] | None = None) -> int:
    """An index folder from vectors computed elsewhere (L2-normalised float32 arrays, one per
    chunk; `text_chunks` the same rows' caption vectors): emb/ chunks, one `samples` row per
    vector (key = its id, no caption, no image) and a build.json without a model, ready for
    `build_index`. Returns the number of vectors. For benchmarks and for corpora embedded by
    other tools; search it with vectors (`Searcher.search_vectors`)."""
    out = Path(out)
    (out / "emb").mkdir(parents=True, exist_ok=True)
    texts = iter(text_chunks) if text_chunks is not None else None
    db = connect(out)
    first_id, dim, size = 0, None, 0
    try:
        for c, x in enumerate(chunks):
            x = np.ascontiguousarray(x, dtype=np.float32)
            dim, size = x.shape[1], max(size, len(x))
            _save_npy(chunk_path(out, "img", c), x)
            if texts is not None:
                _save_npy(chunk_path(out, "txt", c), np.ascontiguousarray(next(texts), np.float32))
            ids = range(first_id, first_id + len(x))
            with db:
                db.executemany("INSERT OR REPLACE INTO samples (id, key, caption, captions, "
                               "shard, chunk) VALUES (?, ?, '', '[]', '', ?)",
                               [(i, str(i), c) for i in ids])
                db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, 0, 0, '{}')",
                           (c, first_id, len(x), first_id + len(x)))
            first_id += len(x)
        with db:
            db.execute("INSERT OR REPLACE INTO state VALUES ('complete', ?)",
                       (json.dumps({"raw": first_id}),))
    finally:
        db.close()
    if dim is None:
        raise ValueError("store_embeddings: no vectors given")
    write_atomic(out / SETTINGS_FILE, (json.dumps(
        {"format_version": FORMAT_VERSION, "model": None, "data": [], "chunk_size": size,
         "text": texts is not None, "dtype": "float32", "embed_dim": int(dim)}, indent=2)
        + "\n").encode())
    return first_id


# --------------------------------------------------------------------------- reading the chunks
class EmbeddingStore:
    """The chunks of one kind ("img" or "txt") of an index folder, read back as float32."""

    def __init__(self, index_dir: str | Path, kind: str = "img"):
        if kind not in ("img", "txt"):
            raise ValueError(f"kind={kind!r}: expected 'img' or 'txt'")
        self.index_dir, self.kind = Path(index_dir), kind
        db = connect(self.index_dir, readonly=True)
        try:
            self.chunks = db.execute("SELECT chunk, first_id, rows FROM chunks ORDER BY chunk"
                                     ).fetchall()
        finally:
            db.close()
        self.n = sum(r[2] for r in self.chunks)
        self.dim = int(read_settings(self.index_dir)["embed_dim"])

    def exists(self) -> bool:
        return bool(self.chunks) and all(chunk_path(self.index_dir, self.kind, c).is_file()
                                         for c, _, _ in self.chunks)

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, (rows, dim) float32) per chunk, in id order."""
        for c, first_id, _ in self.chunks:
            arr = np.load(chunk_path(self.index_dir, self.kind, c))
            yield first_id, np.ascontiguousarray(arr, dtype=np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of `ids` (any order), (len(ids), dim) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        starts = np.array([r[1] for r in self.chunks], dtype=np.int64)
        which = np.searchsorted(starts, ids, side="right") - 1
        for w in np.unique(which):
            c, first_id, _ = self.chunks[w]
            arr = np.load(chunk_path(self.index_dir, self.kind, c), mmap_mode="r")
            sel = which == w
            out[sel] = arr[ids[sel] - first_id]
        return out
