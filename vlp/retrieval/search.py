"""Search a built index: a text or an image query -> the nearest samples with their metadata.

    query text  -> model.encode_text  \\                       image.index (mode "image")
                                        > (1, D) normalised -> or text.index (mode "text")
    query image -> model.encode_image /                        -> ids -> meta.sqlite rows

`Searcher` is what `vlp search` and `vlp serve` use. The model directory is the one recorded
when the index was built (build.json), unless another is given. Indexes are opened
memory-mapped (index.open_index), the metadata stays in meta.sqlite.
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch
from PIL import Image

from vlp.data.transforms import to_pil_rgb
from vlp.retrieval.embed import MIME, connect, read_settings
from vlp.retrieval.index import INDEX_FILES, apply_parameters, open_index, read_info, to_gpu

MODES = ("image", "text")


@dataclass
class Hit:
    rank: int
    id: int
    key: str
    score: float
    caption: str
    shard: str


@dataclass
class Query:
    """One query of a batch (`Searcher.search_batch`): `text`, or `pixels` (an image already
    through the model's transform, (3, H, W): `Searcher.prepare_image`)."""

    k: int = 10
    mode: str = "image"
    text: str | None = None
    pixels: torch.Tensor | None = None


class Searcher:
    """An index folder opened for queries. Thread-safe (the model and faiss calls are
    serialised; metadata reads open their own connection per thread). `search_batch` answers
    many queries with one encoder call: what the service does with concurrent requests."""

    def __init__(self, index_dir: str | Path, model=None, device: str | None = None):
        """`model`: a model directory or a loaded `vlp.load(...)`; default: the recorded one.
        The model is loaded on the first query that needs it, onto `device` (None: the GPU
        when there is one, else the CPU)."""
        self.index_dir = Path(index_dir)
        self.info = read_info(self.index_dir)
        self.settings = read_settings(self.index_dir)
        self._model = model if model is not None and not isinstance(model, (str, Path)) else None
        recorded = (self.settings.get("model") or {}).get("path")  # None: store_embeddings
        self._model_dir = Path(model) if isinstance(model, (str, Path)) else \
            (Path(recorded) if recorded else None)
        self._device = device
        self._indexes: dict[str, faiss.Index] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._local = threading.local()
        self.modes = tuple(m for m in MODES if (self.index_dir / INDEX_FILES[m]).is_file())
        if "image" not in self.modes:
            raise FileNotFoundError(f"{self.index_dir / INDEX_FILES['image']} does not exist: "
                                    "build it with `vlp index build`")

    # ---------------------------------------------------------------- lazily opened parts
    @property
    def model(self):
        if self._model is None:
            with self._load_lock:  # two first queries at once load it once
                if self._model is None:
                    import vlp

                    if self._model_dir is None:
                        raise ValueError(f"{self.index_dir} holds vectors stored without a "
                                         "model: give one (--model DIR) to search it with "
                                         "text or images")
                    self._model = vlp.load(self._model_dir, device=self._device)
        return self._model

    def index(self, mode: str) -> faiss.Index:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if mode not in self.modes:
            raise ValueError(f"mode={mode!r} needs {INDEX_FILES[mode]}, which this index has "
                             "not got: build it with `vlp index build --text`")
        with self._load_lock:
            if mode not in self._indexes:
                # memory-mapped: pages come in as queries touch them (indexes larger than
                # RAM; several services share one copy in the page cache)
                index = to_gpu(open_index(self.index_dir, mode, self.info.get(mode)))
                apply_parameters(index, self.info.get(mode, {}).get("search_params", ""))
                self._indexes[mode] = index
        return self._indexes[mode]

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.index_dir, readonly=True)
        return db

    @property
    def count(self) -> int:
        return int(self.info["image"]["count"])

    # ---------------------------------------------------------------- queries
    def embed_text(self, text: str) -> np.ndarray:
        with self._lock:
            return self.model.encode_text([text]).numpy().astype(np.float32)

    def embed_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        with self._lock:
            return self.model.encode_image([to_pil_rgb(image)]).numpy().astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) normalised, in one encoder call."""
        with self._lock:
            return self.model.encode_text(list(texts)).numpy().astype(np.float32)

    def prepare_image(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An image through the model's eval transform: (3, H, W), what `embed_pixels` takes."""
        return self.model.transform(to_pil_rgb(image))

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) prepared images -> (B, D) normalised, in one encoder call."""
        with self._lock:
            return self.model.encode_image(pixels).numpy().astype(np.float32)

    def search_vector(self, vector: np.ndarray, k: int = 10, mode: str = "image") -> list[Hit]:
        """Nearest samples of a (1, D) normalised query vector in the `mode` index."""
        return self.search_vectors(vector, [k], mode)[0]

    def search_vectors(self, vectors: np.ndarray, ks: Sequence[int],
                       mode: str = "image") -> list[list[Hit]]:
        """Nearest samples of each row of (B, D) normalised `vectors` in the `mode` index, the
        top ks[b] for row b: one faiss search and one metadata query for the batch."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if len(ks) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ks)} values of k")
        if any(k < 1 for k in ks):
            raise ValueError(f"k={min(ks)}: must be >= 1")
        if not len(vectors):
            return []
        index = self.index(mode)
        with self._lock:
            scores, ids = index.search(vectors, max(ks))
        rows = self.rows(sorted({int(i) for i in ids.ravel() if i >= 0}))
        out = []
        for k, row_scores, row_ids in zip(ks, scores, ids):
            found = [(float(s), int(i)) for s, i in zip(row_scores[:k], row_ids[:k]) if i >= 0]
            out.append([Hit(rank, i, rows[i]["key"], s, rows[i]["caption"], rows[i]["shard"])
                        for rank, (s, i) in enumerate(found, start=1)])
        return out

    def search_batch(self, queries: Sequence[Query]) -> list[list[Hit]]:
        """Many queries at once: the texts through one encoder call, the images through
        another, then one index search per mode. Each query's hits are those it would get
        alone (the same vectors up to float rounding; the service batches concurrent requests
        through this)."""
        vectors: list[np.ndarray | None] = [None] * len(queries)
        texts = [i for i, q in enumerate(queries) if q.text is not None]
        images = [i for i, q in enumerate(queries) if q.text is None]
        if any(queries[i].pixels is None for i in images):
            raise ValueError("a Query needs `text` or `pixels`")
        if texts:
            for i, v in zip(texts, self.embed_texts([queries[i].text for i in texts])):
                vectors[i] = v
        if images:
            pixels = torch.stack([queries[i].pixels for i in images])
            for i, v in zip(images, self.embed_pixels(pixels)):
                vectors[i] = v
        out: list[list[Hit]] = [[] for _ in queries]
        for mode in {q.mode for q in queries}:
            rows = [i for i, q in enumerate(queries) if q.mode == mode]
            found = self.search_vectors(np.stack([vectors[i] for i in rows]),
                                        [queries[i].k for i in rows], mode)
            for i, hits in zip(rows, found):
                out[i] = hits
        return out

    def search_text(self, text: str, k: int = 10, mode: str = "image") -> list[Hit]:
        """text -> images (mode "image") or -> captions (mode "text")."""
        return self.search_vector(self.embed_text(text), k, mode)

    def search_image(self, image: Image.Image | np.ndarray, k: int = 10,
                     mode: str = "image") -> list[Hit]:
        """image -> images (mode "image") or -> captions (mode "text")."""
        return self.search_vector(self.embed_image(image), k, mode)

    # ---------------------------------------------------------------- metadata and images
    def rows(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cur = self._db().execute(f"SELECT id, key, caption, captions, shard, url, member, offset,"
                                 f" size FROM samples WHERE id IN ({marks})", ids)
        names = [c[0] for c in cur.description]
        return {r[0]: dict(zip(names, r)) for r in cur.fetchall()}

    def row_by_key(self, key: str) -> dict | None:
        cur = self._db().execute("SELECT id, key, caption, captions, shard, url, member, offset,"
                                 " size FROM samples WHERE key = ? ORDER BY id LIMIT 1", (key,))
        r = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], r)) if r else None

    def image_bytes(self, key: str) -> tuple[bytes, str]:
        """(bytes, MIME type) of the image of sample `key`: read from its shard at the recorded
        offset (local tars), else the stored thumbnail. KeyError for an unknown key,
        FileNotFoundError when the shard has moved since the index was built."""
        row = self.row_by_key(key)
        if row is None:
            raise KeyError(key)
        if row["offset"] is not None:
            path = Path(row["shard"][5:] if row["shard"].startswith("file:") else row["shard"])
            try:
                with open(path, "rb") as f:
                    f.seek(row["offset"])
                    data = f.read(row["size"])
            except OSError as e:
                raise FileNotFoundError(f"shard {path} of {key!r} cannot be read ({e})") from None
            if len(data) != row["size"]:
                raise FileNotFoundError(f"shard {path} of {key!r} is shorter than at build time")
            ext = row["member"].rsplit(".", 1)[-1].lower()
            return data, MIME.get(ext, "application/octet-stream")
        thumb = self._db().execute("SELECT data, mime FROM thumbs WHERE id = ?",
                                   (row["id"],)).fetchone()
        if thumb is None:
            raise FileNotFoundError(f"no stored image for {key!r}")
        return bytes(thumb[0]), thumb[1]


def load_image(path: str | Path) -> Image.Image:
    """An image file for an image query; a clear error when it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_pil_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"query image {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"query image {path} cannot be decoded: {e}") from None


def format_hits(hits: list[Hit]) -> str:
    """The table `vlp search` prints: rank, key, score, caption."""
    if not hits:
        return "no results"
    width = max(3, max(len(h.key) for h in hits))
    lines = [f"{'rank':>4}  {'key':<{width}}  {'score':>7}  caption"]
    lines += [f"{h.rank:>4}  {h.key:<{width}}  {h.score:7.4f}  {h.caption}" for h in hits]
    return "\n".join(lines)


def hits_json(hits: list[Hit], **extra) -> str:
    return json.dumps({**extra, "results": [asdict(h) for h in hits]}, indent=2)
