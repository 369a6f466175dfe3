"""VQA v2 fine-tuning: `python finetune/vqa.py [--config ...] [key=value ...]` is
`vlp finetune vqa --config configs/finetune/vqa_shapes.yaml ...` (all logic is in vlp/)."""
import sys

from vlp.cli import finetune_script

if __name__ == "__main__":
    sys.exit(finetune_script("vqa", sys.argv[1:]))
