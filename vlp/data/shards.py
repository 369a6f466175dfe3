"""Shard lists and raw tar reading: the first stage of vlp/data.

    spec ("data/{00000..00009}.tar::more/", "pipe:aws s3 cp s3://b/{000..009}.tar -")
      -> expand_urls -> [url, ...] -> (split by rank and worker, in pipeline.py)
      -> iter_tar_samples -> {"__key__", "__url__", "jpg": bytes, "txt": bytes, "json": bytes, ...}

Shards follow img2dataset's webdataset layout: `{key}.{ext}` members grouped by key, and a
`{shard}_stats.json` beside each local tar (img2dataset writes no sizes.json).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from typing import Callable, Iterable, Iterator, Sequence

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from vlp.config import ConfigError

log = logging.getLogger(__name__)

# "s3://...", "http://...", "gs://..." (opened by webdataset's gopen); "file:" is local.
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# webdataset skips members like "__meta__" and "__meta__/x"; we do the same.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def is_remote(url: str) -> bool:
    """True for `pipe:` and scheme URLs that are not local files."""
    return url.startswith("pipe:") or (bool(_URL_SCHEME.match(url)) and not url.startswith("file:"))


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif url.startswith("file:"):
        url = url[len("file:"):]
    return os.path.expanduser(url)


def _expand_local(part: str) -> list[str]:
    out: list[str] = []
    missing: list[str] = []
    paths = list(braceexpand.braceexpand(part))
    for path in paths:
        path = _local_path(path)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in directory {path!r} (from {part!r})")
            out.extend(found)
        elif any(c in path for c in "*?["):
            found = sorted(glob.glob(path))
            if not found:
                raise FileNotFoundError(f"no shards match {path!r} (from {part!r})")
            out.extend(found)
        elif os.path.isfile(path):
            out.append(path)
        else:
            missing.append(path)
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards named by {part!r} do not "
                                f"exist: {missing[0]!r}" + (", ..." if len(missing) > 1 else ""))
    return out


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """All shard URLs named by `spec`, in order.

    A spec is a string or a list of strings; each string may hold several specs joined by `::`
    (OpenCLIP's convention). Each spec is brace-expanded (`{00000..00009}`); a local directory
    gives its *.tar files (sorted), a local glob its matches (sorted); `pipe:` and scheme URLs
    (s3://, http://) are kept as they are, braces expanded. A local path that does not exist
    raises FileNotFoundError naming it and the spec it came from.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for part in s.split("::"):
            part = part.strip()
            if not part:
                continue
            if is_remote(part):
                urls.extend(braceexpand.braceexpand(part))
            else:
                urls.extend(_expand_local(part))
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls


def stats_path(url: str) -> str:
    """img2dataset's `{shard}_stats.json` beside `{shard}.tar`."""
    return re.sub(r"\.(tar|tar\.gz|tgz)$", "", _local_path(url)) + "_stats.json"


def count_samples(urls: str | Sequence[str]) -> int | None:
    """Samples in the shards according to img2dataset's `{shard}_stats.json` files (`successes`,
    else `count`); None when any shard has no stats (always for pipe:/remote URLs). Tars are not
    opened: counting LAION-scale data by reading it would take hours."""
    if isinstance(urls, str):
        urls = expand_urls(urls)
    total = 0
    for url in urls:
        if is_remote(url):
            return None
        try:
            with open(stats_path(url)) as f:
                stats = json.load(f)
        except (OSError, ValueError):
            return None
        n = stats.get("successes", stats.get("count")) if isinstance(stats, dict) else None
        if not isinstance(n, int):
            return None
        total += n
    return total


def check_shards_vs_workers(num_shards: int, world_size: int, num_workers: int) -> None:
    """Fail early when non-resampled loading would leave a rank's loader worker without a shard.

    Each of the world_size * max(1, num_workers) readers takes a disjoint slice of the shard
    list; a reader with an empty slice ends at once, so ranks see different numbers of batches
    and collective ops wait forever. Not needed with resampled shards (every reader samples from
    all shards).
    """
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ConfigError(
            f"{num_shards} shards cannot feed {world_size} ranks x {max(1, num_workers)} loader "
            "workers: some workers would get no shard and the loader would hang or stall (a "
            f"common cause of hung loaders). Use at least {readers} shards (re-shard the data "
            "with smaller shards), lower data.num_workers, or set data.resampled=true.")


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that makes a missing end-of-archive marker an error.

    Past offset 0, Python's tarfile (and so webdataset 1.0.2) treats a header block that is
    missing, short or garbage as the end of the archive: a tar cut at a member boundary reads as
    complete and its lost samples go unnoticed. Only a zero block is a real end.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a zero block: the proper end-of-archive marker
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError,
                tarfile.InvalidHeaderError) as exn:
            # SubsequentHeaderError always surfaces as ReadError from TarFile.next().
            raise tarfile.SubsequentHeaderError(
                f"truncated or corrupt tar at offset {tarfile_.offset}: {exn}") from None


def iter_tar_samples(urls: Iterable[str], on_error: Callable[[str, Exception], None],
                     max_failures_in_a_row: int | None = None) -> Iterator[dict]:
    """Samples from tar shards: consecutive members sharing a key (webdataset's
    `base_plus_ext`: "a/000.regions.npz" -> key "a/000", ext "regions.npz", lowercased) become
    one dict `{"__key__", "__url__", ext: bytes, ...}`.

    A shard that cannot be opened or read (missing, truncated, corrupt, failing pipe command,
    duplicate member) calls `on_error(url, exception)` once and reading goes on with the next
    shard. The sample being assembled when the error struck is dropped, as it may be
    incomplete (a tar cut exactly after a sample's last member loses that sample too).
    `max_failures_in_a_row`: raise RuntimeError after that many consecutive shards failed
    without a sample, so an endless (resampled) URL stream over unreadable data fails loudly
    instead of spinning forever.
    """
    failures = 0
    for url in urls:
        pending: dict | None = None
        try:
            stream = wds.gopen(url)
            try:
                with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                    for info in tar:
                        if not info.isreg() or _META_MEMBER.match(info.name):
                            continue
                        key, ext = base_plus_ext(info.name)
                        if key is None:
                            continue
                        ext = ext.lower()
                        if pending is not None and pending["__key__"] != key:
                            yield pending  # complete: the next key's header has arrived
                            pending, failures = None, 0
                        data = tar.extractfile(info).read()
                        tar.members = []  # stream mode keeps every TarInfo otherwise
                        if pending is None:
                            pending = {"__key__": key, "__url__": url}
                        if ext in pending:
                            raise ValueError(f"duplicate member {info.name!r} in {url}")
                        pending[ext] = data
            except BaseException:
                # Also on GeneratorExit (consumer stopped early): close, but let the original
                # exception through rather than a pipe's exit-status error.
                _close_quietly(stream)
                raise
            # A pipe: stream's close() waits for its command and raises on a non-zero exit.
            stream.close()
        except Exception as exn:  # noqa: BLE001 - any shard failure is counted, not fatal
            on_error(url, exn)
            failures += 1
            if max_failures_in_a_row is not None and failures >= max_failures_in_a_row:
                raise RuntimeError(f"{failures} shards in a row failed to read (the last: {url}: "
                                   f"{type(exn).__name__}: {exn}); is the data reachable?") from exn
            continue
        failures = 0
        if pending is not None:
            yield pending


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001
        pass
