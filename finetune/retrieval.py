"""Image-text retrieval fine-tuning (COCO / Flickr30k Karpathy splits):
`python finetune/retrieval.py [--config ...] [key=value ...]` is
`vlp finetune retrieval --config configs/finetune/retrieval_shapes.yaml ...` (all logic is in
vlp/)."""
import sys

from vlp.cli import finetune_script

if __name__ == "__main__":
    sys.exit(finetune_script("retrieval", sys.argv[1:]))
