"""vlp.retrieval: zero-shot retrieval over a corpus with faiss.

    shards --embed.py--> INDEX_DIR/emb/img_*.npy (+ txt_*.npy), meta.sqlite, build.json
           --index.py--> image.index (+ text.index), index_info.json (recall@10, queries/s)
           --search.py-> Searcher: text / image query -> nearest samples (`vlp search`)
           --serve.py--> HTTP JSON API + web page (`vlp serve`)

`build(...)` runs the first two stages, as `vlp index build` does; under a launcher
(torchrun, deepspeed, mpirun, srun) every process embeds its share of the chunks and rank 0
builds the index (parallel.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlp.data.pipeline import skipped_samples
from vlp.engine import dist
from vlp.retrieval.embed import EmbedReport, EmbeddingStore, embed_corpus
from vlp.retrieval.index import (INDEX_TYPES, IndexChoice, build_index, check_index_type,
                                 choose_index, parse_memory, read_info, update_info)
from vlp.retrieval.parallel import embed_distributed, join_world, leave_world, rank_device
from vlp.retrieval.search import Hit, Searcher


def build(model_dir: str | Path, data: str | Sequence[str], out: str | Path, *,
          text: bool = False, batch_size: int = 256, chunk_size: int = 4096,
          dtype: str = "float32", index_type: str = "auto", max_memory: str | int = "4GB",
          on_disk: bool | None = None, progress: bool = True, model=None,
          device: str | None = None, max_chunks: int | None = None) -> dict:
    """Embed the shards (resuming a killed run) and build image.index (and text.index with
    `text`). Returns index_info.json's content.

    Launched as several processes, each embeds its share and rank 0 builds the index; the
    other ranks return {"rank", "world", "embed"} (their share). `on_disk`: IVF inverted
    lists on disk (True), in RAM (False), or on disk when they exceed `max_memory` (None;
    choose_index). `max_chunks`: stop embedding after that many chunks (per process) and
    build no index; a rerun goes on."""
    check_index_type(index_type)  # fail on a typo before the (long) embedding, not after
    parse_memory(max_memory)
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"--max-chunks {max_chunks}: must be >= 1")
    world = join_world()
    if world.size > 1:
        dist.set_threads(world, 0)  # the machine's cores shared between its processes
    if model is None:
        import vlp

        model = vlp.load(model_dir, device=rank_device(device, world))
    if world.size > 1:
        report = embed_distributed(model_dir, data, out, world, model=model, text=text,
                                   batch_size=batch_size, chunk_size=chunk_size, dtype=dtype,
                                   progress=progress, max_chunks=max_chunks)
        leave_world()  # the last collective is behind us: rank 0 builds alone
        if not world.is_main:
            return {"rank": world.rank, "world": world.size,
                    "embed": f"rank {world.rank} of {world.size}: {report.rows} samples "
                             f"embedded in {report.chunks_written} chunks; rank 0 merges "
                             "them and builds the index"}
    else:
        report = embed_corpus(model_dir, data, out, text=text, batch_size=batch_size,
                              chunk_size=chunk_size, dtype=dtype, progress=progress,
                              model=model, max_chunks=max_chunks)
    info = update_info(out, {"model": str(Path(model_dir).resolve()), "count": report.rows,
                             "skipped": report.skipped,
                             "skipped_samples": skipped_samples(report.skipped),
                             "embed": report.summary(), "complete": report.complete,
                             "processes": world.size})
    if not report.complete:
        return info
    for modality in ("image", "text") if text else ("image",):
        build_index(out, modality=modality, index_type=index_type, max_memory=max_memory,
                    on_disk=on_disk, model=model, progress=progress)
    return read_info(out)


__all__ = ["EmbedReport", "EmbeddingStore", "embed_corpus", "INDEX_TYPES", "IndexChoice",
           "build_index", "choose_index", "parse_memory", "read_info", "Hit", "Searcher",
           "build"]
