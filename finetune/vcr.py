"""VCR fine-tuning (Q->A, QA->R, Q->AR): `python finetune/vcr.py [--config ...] [key=value ...]`
is `vlp finetune vcr --config configs/finetune/vcr_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import finetune_script

if __name__ == "__main__":
    sys.exit(finetune_script("vcr", sys.argv[1:]))
