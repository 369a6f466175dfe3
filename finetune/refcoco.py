"""Referring expressions (RefCOCO-style, accuracy at IoU >= 0.5): `python finetune/refcoco.py
[--config ...] [key=value ...]` is `vlp finetune refcoco --config
configs/finetune/refcoco_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import finetune_script

if __name__ == "__main__":
    sys.exit(finetune_script("refcoco", sys.argv[1:]))
