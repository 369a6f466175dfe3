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
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

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


def _check_settings(index_dir: Path, settings: dict) -> None:
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


def _thumbnail(image: Image.Image) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --------------------------------------------------------------------------- resuming
def _done_chunks(db: sqlite3.Connection, index_dir: Path, text: bool) -> list[tuple]:
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


def embed_corpus(model_dir: str | Path, data: str | Sequence[str], out: str | Path, *,
                 text: bool = False, chunk_size: int = 4096, batch_size: int = 256,
                 dtype: str = "float32", progress: bool = True, model=None,
                 max_chunks: int | None = None) -> EmbedReport:
    """Embed every usable sample of the `data` shards with the model in `model_dir` into the
    index folder `out` (layout: module docstring). Resumable: chunks already done are kept
    as they are and not embedded again.

    `model`: the already loaded `vlp.load(model_dir)` (else it is loaded here). `max_chunks`:
    stop after writing that many chunks in this call (the report says complete=False), for
    tests and for embedding a big corpus in several sittings.
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size={chunk_size} and batch_size={batch_size} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    model_dir, out = Path(model_dir), Path(out)
    urls = expand_urls(data)
    if model is None:
        import vlp

        model = vlp.load(model_dir)
    (out / "emb").mkdir(parents=True, exist_ok=True)
    embed_dim = int(model.model.cfg.embed_dim)
    _check_settings(out, {"format_version": FORMAT_VERSION, "model": _model_stamp(model_dir),
                          "data": urls, "chunk_size": chunk_size, "text": bool(text),
                          "dtype": dtype, "embed_dim": embed_dim})
    db = connect(out)
    try:
        done = _done_chunks(db, out, text)
        if done and is_complete(db):
            return EmbedReport(done[-1][1] + done[-1][2], len(done), 0, total_skips(db), True)
        shard, offset = (done[-1][4], done[-1][5]) if done else (0, 0)
        raw = len(done) * chunk_size
        chunk = _Chunk(len(done), done[-1][1] + done[-1][2] if done else 0)
        # One counter for the run; each chunk takes the counts gathered since the previous
        # one, so a shard error lands in the same chunk whether or not the run was resumed.
        skips = SkipCounter()
        written = 0
        total = count_samples(urls)
        offsets_url, offsets = None, None
        bar = tqdm(total=total, initial=raw, desc="embed corpus", unit="img", disable=not progress)
        for j, o, sample in _raw_samples(urls, shard, offset, skips):
            url = urls[j]
            if url != offsets_url:
                offsets_url, offsets = url, _member_offsets(url)
            _add_sample(chunk, skips, sample, url, offsets, model, batch_size)
            raw += 1
            bar.update()
            if raw % chunk_size == 0:
                _write_chunk(db, out, chunk, skips.pop(), model, text, dtype, embed_dim, raw,
                             j, o + 1)
                written += 1
                chunk = _Chunk(chunk.index + 1, chunk.first_id + len(chunk.rows))
                if max_chunks is not None and written >= max_chunks:
                    bar.close()
                    return EmbedReport(chunk.first_id, chunk.index, written, total_skips(db))
        bar.close()
        if raw % chunk_size or skips.counts or chunk.index == 0:
            # the last, short chunk (also an empty one that only carries shard-error counts)
            _write_chunk(db, out, chunk, skips.pop(), model, text, dtype, embed_dim, raw,
                         len(urls), 0)
            written += 1
            chunk = _Chunk(chunk.index + 1, chunk.first_id + len(chunk.rows))
        with db:
            db.execute("INSERT OR REPLACE INTO state VALUES ('complete', ?)",
                       (json.dumps({"raw": raw}),))
        return EmbedReport(chunk.first_id, chunk.index, written, total_skips(db), True)
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


def _write_chunk(db: sqlite3.Connection, out: Path, chunk: _Chunk, skipped: dict[str, int],
                 model, text: bool, dtype: str, embed_dim: int, raw_end: int, shard_end: int,
                 offset_end: int) -> None:
    """Files first, then the rows in one transaction: a kill in between leaves files without
    a `chunks` row, which the next run simply rewrites (with the same bytes)."""
    _flush_images(chunk, model)
    img = np.concatenate(chunk.image_parts) if chunk.image_parts else \
        np.zeros((0, embed_dim), np.float32)
    _save_npy(chunk_path(out, "img", chunk.index), img.astype(dtype))
    if text:
        txt = model.encode_text(chunk.captions).numpy() if chunk.captions else \
            np.zeros((0, embed_dim), np.float32)
        _save_npy(chunk_path(out, "txt", chunk.index), txt.astype(dtype))
    ids = range(chunk.first_id, chunk.first_id + len(chunk.rows))
    with db:
        db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(i, *row, chunk.index) for i, row in zip(ids, chunk.rows)])
        db.executemany("INSERT OR REPLACE INTO thumbs VALUES (?, 'image/jpeg', ?)",
                       [(i, t) for i, t in zip(ids, chunk.thumbs) if t is not None])
        db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (chunk.index, chunk.first_id, len(chunk.rows), raw_end, shard_end,
                    offset_end, json.dumps(skipped, sort_keys=True)))


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
