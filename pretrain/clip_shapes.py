"""Pretrain the default tiny dual tower on the shapes world (same as `vlp pretrain`).

    python pretrain/clip_shapes.py [--out DIR] [key=value ...]
"""
import sys
from pathlib import Path

from vlp.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "clip_shapes.yaml"

if __name__ == "__main__":
    sys.exit(main(["pretrain", "--config", str(CONFIG), *sys.argv[1:]]))
