"""Zero-shot image<->text retrieval and classification of a model directory.

    python eval/retrieval.py --model runs/x/model --data ~/.cache/vlp/shapes-.../val --out m.json
"""
import sys

from vlp.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "retrieval", *sys.argv[1:]]))
