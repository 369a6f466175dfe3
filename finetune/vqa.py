"""VQA v2 fine-tuning: `python finetune/vqa.py [--config ...] [key=value ...]` is
`vlp finetune vqa --config configs/finetune/vqa_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "configs/finetune/vqa_shapes.yaml", *args]
    sys.exit(main(["finetune", "vqa", *args]))
