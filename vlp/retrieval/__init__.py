"""vlp.retrieval: zero-shot retrieval over a corpus with faiss.

    shards --embed.py--> INDEX_DIR/emb/img_*.npy (+ txt_*.npy), meta.sqlite, build.json
           --index.py--> image.index (+ text.index), index_info.json (recall@10, queries/s)
           --search.py-> Searcher: text / image query -> nearest samples (`vlp search`)
           --serve.py--> HTTP JSON API + web page (`vlp serve`)

`build(...)` runs the first two stages, as `vlp index build` does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlp.data.pipeline import skipped_samples
from vlp.retrieval.embed import EmbedReport, EmbeddingStore, embed_corpus
from vlp.retrieval.index import (INDEX_TYPES, IndexChoice, build_index, check_index_type,
                                 choose_index, parse_memory, read_info, update_info)
from vlp.retrieval.search import Hit, Searcher


def build(model_dir: str | Path, data: str | Sequence[str], out: str | Path, *,
          text: bool = False, batch_size: int = 256, chunk_size: int = 4096,
          dtype: str = "float32", index_type: str = "auto", max_memory: str | int = "4GB",
          progress: bool = True, model=None, device: str | None = None) -> dict:
    """Embed the shards (resuming a killed run) and build image.index (and text.index with
    `text`). Returns index_info.json's content."""
    check_index_type(index_type)  # fail on a typo before the (long) embedding, not after
    parse_memory(max_memory)
    if model is None:
        import vlp

        model = vlp.load(model_dir, device=device)
    report = embed_corpus(model_dir, data, out, text=text, batch_size=batch_size,
                          chunk_size=chunk_size, dtype=dtype, progress=progress, model=model)
    update_info(out, {"model": str(Path(model_dir).resolve()), "count": report.rows,
                      "skipped": report.skipped, "skipped_samples": skipped_samples(report.skipped),
                      "embed": report.summary()})
    build_index(out, modality="image", index_type=index_type, max_memory=max_memory,
                model=model, progress=progress)
    if text:
        build_index(out, modality="text", index_type=index_type, max_memory=max_memory,
                    model=model, progress=progress)
    return read_info(out)


__all__ = ["EmbedReport", "EmbeddingStore", "embed_corpus", "INDEX_TYPES", "IndexChoice",
           "build_index", "choose_index", "parse_memory", "read_info", "Hit", "Searcher",
           "build"]
