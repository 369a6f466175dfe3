"""Image-text retrieval fine-tuning (COCO / Flickr30k Karpathy splits):
`python finetune/retrieval.py [--config ...] [key=value ...]` is
`vlp finetune retrieval --config configs/finetune/retrieval_shapes.yaml ...` (all logic is in
vlp/)."""
import sys

from vlp.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "configs/finetune/retrieval_shapes.yaml", *args]
    sys.exit(main(["finetune", "retrieval", *args]))
