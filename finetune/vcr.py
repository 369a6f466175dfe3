"""VCR fine-tuning (Q->A, QA->R, Q->AR): `python finetune/vcr.py [--config ...] [key=value ...]`
is `vlp finetune vcr --config configs/finetune/vcr_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "configs/finetune/vcr_shapes.yaml", *args]
    sys.exit(main(["finetune", "vcr", *args]))
