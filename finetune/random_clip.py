"""A stand-in for a published CLIP folder, for trying the README's "From a published CLIP to
VQA" commands without one: a Hugging Face `CLIPModel` with random weights, shaped as ViT-B/32
scaled down (vision width 96 / 4 layers / patch 16 at 64 px, a 4x4 grid as B/32's 7x7 at 224;
text width 64 / 4 layers; vision wider than text, as in every released CLIP), and a byte-level
BPE in CLIP's layout trained on a shapes world's captions, saved with `save_pretrained`:

    python finetune/random_clip.py OUT_DIR [--world SHAPES_WORLD_DIR]

Needs transformers (`pip install -e ".[dev]"`). OUT_DIR then stands where a local
openai/clip-vit-base-patch32 folder would.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from vlp.data.karpathy import read_karpathy
from vlp.config import FinetuneDataConfig
from vlp.engine.setup import benchmark_root

SHAPE = dict(
    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
              max_position_embeddings=32),
    vision=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=3, image_size=64, patch_size=16),
    projection_dim=64)


def clip_layout_bpe(texts: list[str], vocab_size: int = 400) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE laid out as CLIP's: every byte, every byte + </w>,
    the merges, then <|startoftext|> and <|endoftext|>."""
    hf = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), "removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab: dict = {}
    for token in tokens + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--world", help="shapes world folder (default: the built-in one, "
                        "generated if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast
    except ImportError:
        print("random_clip.py needs transformers: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    benchmarks = Path(args.world) / "benchmarks" if args.world else \
        benchmark_root(FinetuneDataConfig())  # what `vlp finetune` reads by default
    karpathy = benchmarks / "coco" / "dataset_coco.json"
    captions = [text for image in read_karpathy(karpathy) for _, text in image["captions"]]
    vocab, merges = clip_layout_bpe(captions)
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config=dict(SHAPE["text"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=SHAPE["vision"], projection_dim=SHAPE["projection_dim"])
    torch.manual_seed(args.seed)
    CLIPModel(config).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"wrote a random CLIPModel (vision 96 wide, text 64) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
