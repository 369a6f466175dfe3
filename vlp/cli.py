"""The `vlp` command. Parses argv and calls into the library; holds no logic of its own.

    vlp pretrain [--config FILE] [--out DIR] [--resume DIR|latest] [key=value ...]
        (one process, or every process of `deepspeed --num_gpus N --module vlp pretrain ...`
        or `torchrun --nproc_per_node N -m vlp pretrain ...`)
    vlp data synth --out DIR [--images N] [--val-images N] [--seed S] [--image-size PX]
    vlp data regions --model DIR --data SHARDS --out DIR
    vlp tokenizer train --data SHARDS --out FILE [--vocab-size N]
    vlp eval retrieval --model DIR --data SHARDS [--out FILE] [--batch-size N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlp.config import ConfigError


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vlp.config import load_config
    from vlp.engine.train import NonFiniteLossError, pretrain

    cfg = load_config(args.config, args.overrides)  # fails here, before any work, on bad keys
    out = args.out or f"runs/pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        pretrain(cfg, out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except NonFiniteLossError as e:
        print(f"vlp pretrain: stopped: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from vlp.data.synth import generate

    manifest = generate(args.out, images=args.images, val_images=args.val_images, seed=args.seed,
                        image_size=args.image_size, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in manifest.items() if not isinstance(v, (dict, list))},
                     indent=2))
    return 0


def _cmd_data_regions(args: argparse.Namespace) -> int:
    from vlp.data.extract_regions import extract_regions
    from vlp.data.shards import expand_urls
    from vlp.recipes.single_stream import manifest_regions

    labels = manifest_regions(expand_urls(args.data)).get("object_labels", [])
    counts = extract_regions(args.model, args.data, args.out, label_names=labels,
                             batch_size=args.batch_size, progress=not args.no_progress)
    print(json.dumps(counts, indent=2))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from vlp.data.shards import expand_urls
    from vlp.tokenizer import iter_captions, train_tokenizer

    tok = train_tokenizer(iter_captions(expand_urls(args.data)), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out} (vocab {tok.vocab_size})")
    return 0


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    import vlp
    from vlp.eval.retrieval import evaluate_retrieval, format_table

    model = vlp.load(args.model)
    metrics = evaluate_retrieval(model, args.data, batch_size=args.batch_size,
                                 progress=not args.no_progress)
    print(format_table(metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="vision-language pretraining")
    # `deepspeed --module vlp pretrain ...` runs `python -m vlp --local_rank=N pretrain ...`;
    # the rank is read from the environment the launcher exports.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model (no arguments: the shapes world)")
    p.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    p.add_argument("--out", help="run folder (default: runs/pretrain-<time>)")
    p.add_argument("--resume", help="checkpoint folder, or 'latest' (OUT/checkpoints/latest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.steps=100")
    p.set_defaults(func=_cmd_pretrain)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="write the shapes world (shards + benchmark files)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=20000, help="training images")
    p.add_argument("--val-images", type=int, default=1000, help="held-out retrieval images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_data_synth)
    p = data.add_parser("regions", help="write {key}.regions.npz region features for shards "
                        "from a trained vision encoder and the json boxes")
    p.add_argument("--model", required=True, help="model directory with a vision tower "
                   "(OUT/model of a dual-tower run)")
    p.add_argument("--data", required=True, help="shard spec (local shards)")
    p.add_argument("--out", required=True, help="folder for the shards with regions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_data_regions)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tok_cmd",
                                                                        required=True)
    p = tok.add_parser("train", help="train a WordPiece tokenizer on the captions of shards")
    p.add_argument("--data", required=True, help="shard spec (brace pattern, folder, pipe:)")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.set_defaults(func=_cmd_tokenizer_train)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_cmd",
                                                                       required=True)
    p = ev.add_parser("retrieval", help="image<->text Recall@K and zero-shot accuracy")
    p.add_argument("--model", required=True, help="model directory (OUT/model of a run)")
    p.add_argument("--data", required=True, help="shard spec of the test split")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval_retrieval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        # user errors: one clear line, no stack trace
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
