"""COCO captioning fine-tuning: `python finetune/caption.py [--config ...] [key=value ...]` is
`vlp finetune caption --config configs/finetune/caption_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import finetune_script

if __name__ == "__main__":
    sys.exit(finetune_script("caption", sys.argv[1:]))
