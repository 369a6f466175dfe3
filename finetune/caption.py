"""COCO captioning fine-tuning: `python finetune/caption.py [--config ...] [key=value ...]` is
`vlp finetune caption --config configs/finetune/caption_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "configs/finetune/caption_shapes.yaml", *args]
    sys.exit(main(["finetune", "caption", *args]))
