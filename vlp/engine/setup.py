"""What a run needs before its first step: where the data is, and a tokenizer."""
from __future__ import annotations

import itertools
import os
import shutil
import socket
from pathlib import Path

from vlp.config import ConfigError, DataConfig, FinetuneDataConfig, TokenizerConfig
from vlp.data.pipeline import SkipCounter, format_skips, iter_captions
from vlp.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

SHAPES_FORMAT = "v5"  # bump when the generator's output changes, so caches regenerate


def cache_root() -> Path:
    """$VLP_CACHE, else $XDG_CACHE_HOME/vlp, else ~/.cache/vlp."""
    if os.environ.get("VLP_CACHE"):
        return Path(os.environ["VLP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlp"


def ensure_shapes_world(folder: Path, *, images: int, seed: int, progress: bool = True,
                        **generate_args) -> Path:
    """Generate the shapes world into `folder` once. It is written to a temporary sibling of
    this host and process and renamed into place when complete, so a run killed mid-generation
    never leaves a half corpus behind, and several nodes sharing one cache folder (each node's
    local rank 0 generates) do not write into one another's files: the first rename wins, the
    others find the folder there and drop their copy (same seed, same bytes). `generate_args`:
    vlp.data.synth.generate's other settings (tests make small worlds)."""
    if (folder / "MANIFEST.json").is_file():
        return folder
    from vlp.data.synth import generate

    tmp = folder.with_name(f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"generating the shapes world ({images} train images, seed {seed}) into {folder}")
    generate(tmp, images=images, seed=seed, progress=progress, **generate_args)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another node's copy got there first (a non-empty folder)
        if not (folder / "MANIFEST.json").is_file():
            raise
        shutil.rmtree(tmp)
    return folder


def shapes_world(synth_dir: str, seed: int, images: int, progress: bool = True) -> Path:
    """The shapes world's folder (`synth_dir`, else the cache's), generated if missing."""
    folder = Path(synth_dir) if synth_dir else \
        cache_root() / f"shapes-{SHAPES_FORMAT}-seed{seed}-n{images}"
    return ensure_shapes_world(folder, images=images, seed=seed, progress=progress)


def resolve_data(cfg: DataConfig, progress: bool = True) -> tuple[str, str]:
    """(train spec, val spec). With data.train empty, the shapes world (generated if missing)."""
    if cfg.train:
        return cfg.train, cfg.val
    folder = shapes_world(cfg.synth_dir, cfg.synth_seed, cfg.synth_images, progress)
    return str(folder / "train"), cfg.val or str(folder / "val")


def build_tokenizer(cfg: TokenizerConfig, train_urls: list[str], save_to: Path,
                    cache: Path | None = None) -> Tokenizer:
    """Load tokenizer.path, or train a WordPiece tokenizer on the training captions.

    HF's WordPiece trainer breaks frequency ties differently in every process, so two trainings
    on the same captions give different ids; with `cache` (the generated shapes world) the
    first one is kept there and reused, which makes default runs repeatable."""
    if cfg.path:
        tok = load_tokenizer(cfg.path)
    elif cache is not None and cache.is_file():
        tok = load_tokenizer(cache)
    else:
        skips = SkipCounter()
        # a bounded sample, read in shard order: the other ranks wait for it at a barrier,
        # and a vocabulary settles long before a web corpus ends
        captions = list(itertools.islice(iter_captions(train_urls, skips), cfg.max_captions))
        if not captions:
            raise ConfigError(
                f"no caption could be read from the {len(train_urls)} training shard(s) "
                f"({', '.join(train_urls[:3])}{', ...' if len(train_urls) > 3 else ''}) to train "
                f"a tokenizer: {format_skips(skips.counts)}. Are they webdataset tars with "
                "{key}.txt or {key}.json captions? (or set tokenizer.path)")
        tok = train_tokenizer(captions, vocab_size=cfg.vocab_size)
        if cache is not None:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tok.save(tmp)
            os.replace(tmp, cache)
    tok.save(save_to)
    return tok


def tokenizer_cache(data: DataConfig, vocab_size: int) -> Path | None:
    """Where the generated shapes world keeps its tokenizer; None for user data."""
    if data.train:
        return None
    return Path(resolve_data(data, progress=False)[0]).parent / f"tokenizer-{vocab_size}.json"


def benchmark_root(cfg: FinetuneDataConfig, progress: bool = True) -> Path:
    """data.root, else the shapes world's benchmarks folder (generated once if missing)."""
    if cfg.root:
        root = Path(cfg.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={cfg.root!r} is not a folder")
        return root
    return shapes_world(cfg.synth_dir, cfg.synth_seed, cfg.synth_images, progress) / "benchmarks"
