"""Shards whose batches are grouped by colour: a test of why the default run learns colour but
not shape (README, "Why the default run learns colour but not shape").

Rewrites the shapes world's train shards so that every `--group` consecutive samples share
their colour multiset (the sorted colours of their objects); trained with
`data.shuffle_buffer=128` (vlp's block shuffle permutes within 128 consecutive samples, one
batch), each batch then holds 128 / group such groups, and colour no longer separates a group's
captions. Samples of a multiset that do not fill a group are grouped at random.

    python bench/group_batches.py --out /tmp/grouped
    vlp pretrain data.train=/tmp/grouped/train data.val=~/.cache/vlp/shapes-v5-seed0-n20000/val \\
        data.shuffle_buffer=128 model.vision.stem=conv eval.every=100 \\
        tokenizer.path=<a shapes-world run's tokenizer.json>
"""
from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from collections import defaultdict
from pathlib import Path

from vlp.engine.setup import SHAPES_FORMAT, cache_root


def read_samples(train: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every sample of the shards in `train`, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def grouped_order(samples: dict[str, dict[str, bytes]], group: int, seed: int) -> list[str]:
    """The keys in blocks of `group` sharing their colour multiset, blocks in random order."""
    by_colours = defaultdict(list)
    for key, members in samples.items():
        objects = json.loads(members["json"])["objects"]
        by_colours[tuple(sorted(o["color"] for o in objects))].append(key)
    rng = random.Random(seed)
    blocks, rest = [], []
    for keys in by_colours.values():
        rng.shuffle(keys)
        full = len(keys) - len(keys) % group
        blocks += [keys[i:i + group] for i in range(0, full, group)]
        rest += keys[full:]
    rng.shuffle(rest)
    blocks += [rest[i:i + group] for i in range(0, len(rest), group)]
    rng.shuffle(blocks)
    return [key for block in blocks for key in block]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=str(cache_root() / f"shapes-{SHAPES_FORMAT}-seed0-n20000"))
    ap.add_argument("--out", required=True, help="folder for train/*.tar")
    ap.add_argument("--group", type=int, default=4, help="samples per colour group")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    samples = read_samples(Path(args.world) / "train")
    order = grouped_order(samples, args.group, args.seed)
    out = Path(args.out) / "train"
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(order), args.shard_size):
        with tarfile.open(out / f"{start // args.shard_size:05d}.tar", "w") as tar:
            for key in order[start:start + args.shard_size]:
                for ext, data in samples[key].items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    print(f"{len(order)} samples in groups of {args.group} by colour multiset -> {out}")


if __name__ == "__main__":
    main()
