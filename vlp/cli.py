"""The `vlp` command. Parses argv and calls into the library; holds no logic of its own.

    vlp pretrain [--config FILE] [--out DIR] [--resume DIR|latest] [key=value ...]
        (one process, or every process of `deepspeed --num_gpus N --module vlp pretrain ...`
        or `torchrun --nproc_per_node N -m vlp pretrain ...`)
    vlp finetune vqa|caption|vcr|retrieval|refcoco [--config FILE] [--out DIR]
        [--resume DIR|latest] [key=value ...]   (also under deepspeed / torchrun, like pretrain)
    vlp data synth --out DIR [--images N] [--val-images N] [--seed S] [--image-size PX]
    vlp data regions --model DIR --data SHARDS --out DIR
    vlp tokenizer train --data SHARDS --out FILE [--vocab-size N]
    vlp eval retrieval --model DIR --data SHARDS [--out FILE] [--batch-size N]
    vlp eval retrieval --model DIR --karpathy dataset_coco.json --images DIR [--split test]
        [--rerank-k K] [--out FILE]
    vlp eval zeroshot --model DIR --data DIR [--split S] [--classnames FILE] [--templates FILE]
        [--out FILE]   (CLIP_benchmark webdataset layout, or an ImageNet-style image folder)
    vlp eval vqa --predictions FILE --questions FILE --annotations FILE [--out FILE]
    vlp eval caption --predictions FILE (--annotations FILE | --karpathy FILE [--split S])
        [--out FILE]
    vlp eval vcr --predictions FILE.csv|FILE.jsonl --annotations FILE.jsonl [--out FILE]
    vlp eval refcoco --predictions FILE --refs 'refs(unc).p' --instances instances.json
        [--split S] [--out FILE]
    vlp eval vqa|caption|vcr|refcoco --model FINETUNED_DIR [--data BENCHMARK_DIR] [file options]
        [--out FILE] [key=value ...]   (runs the fine-tuned model with its run's task settings
        or these, e.g. vqa.head=rank caption.beam_size=5; its results file goes beside --out)
    vlp convert hf-clip SRC_DIR OUT_DIR          (a local Hugging Face CLIPModel folder -> vlp)
    vlp convert to-hf-clip MODEL_DIR OUT_DIR     (a vlp dual tower -> CLIPModel folder)
    vlp convert open-clip STATE.safetensors OUT_DIR --config MODEL.json --tokenizer TOK
    vlp convert hf-swin SRC_DIR OUT_DIR          (a local HF Swin folder -> vision-tower dir)
    vlp convert hf-vit SRC OUT_DIR [--heads N]   (a local HF ViT folder, or a timm ViT
        .safetensors / hub folder -> vision-tower dir; --heads for timm only)
    vlp index build --model DIR --data SHARDS --out INDEX_DIR [--text] [--batch-size N]
        [--chunk-size N] [--max-memory 4GB] [--index-type auto|flat|hnsw|ivf|ivf-hnsw|ivf-pq|
        opq-pq|FAISS_FACTORY] [--on-disk] [--max-chunks N]   (a rerun resumes a killed build;
        written chunks are kept; also under torchrun / deepspeed: every process embeds a share)
    vlp search "QUERY" --index DIR [-k 10] [--image PATH] [--mode image|text] [--json]
    vlp serve --index DIR [--model DIR] [--host 127.0.0.1] [--port 8000]   (search page + API)
    vlp serve --model FINETUNED_DIR [--host 127.0.0.1] [--port 8000]
        (demo page + API of a fine-tuned VQA or captioning model: upload an image, ask)
    vlp plot RUN [RUN ...] --out curves.png [--metrics NAME ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

from vlp.config import ConfigError
from vlp.eval.inputs import EvalError


def _train(run, cfg, args: argparse.Namespace, name: str) -> int:
    """Run `run(cfg, out, ...)` (pretrain / finetune) with the exit codes both share: 130 after
    a saved stop (Ctrl-C / SIGTERM), 1 when non-finite losses stopped it."""
    from vlp.engine.loop import NonFiniteLossError

    out = args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run(cfg, out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except NonFiniteLossError as e:
        print(f"vlp {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    return 0


def _run_config(args: argparse.Namespace, overrides: list[str], cls, given: set | None = None):
    """The run's config, checked before any work: defaults <- --config <- overrides; with
    --resume, the resumed run's saved config.yaml comes first (what it was started with).
    `given` (a set) receives the keys set explicitly."""
    from vlp.config import load_config, read_yaml
    from vlp.engine.loop import saved_config_path

    saved = None
    if args.resume and (args.out or args.resume != "latest"):
        saved = saved_config_path(args.out or ".", args.resume)
    return load_config(args.config, overrides, cls=cls,
                       base=read_yaml(saved) if saved else None, given=given)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vlp.config import PretrainConfig
    from vlp.recipes import pretrain

    given: set[str] = set()
    cfg = _run_config(args, args.overrides, PretrainConfig, given)
    return _train(partial(pretrain, given=given), cfg, args, "pretrain")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from vlp.config import FinetuneConfig
    from vlp.tasks import finetune

    cfg = _run_config(args, [f"task={args.task}", *args.overrides], FinetuneConfig)
    if cfg.task != args.task:
        raise ConfigError(f"{args.config} is a config for task {cfg.task!r}, not {args.task!r}")
    return _train(finetune, cfg, args, f"finetune-{args.task}")


def finetune_script(task: str, argv: list[str]) -> int:
    """finetune/<task>.py: `vlp finetune TASK` with configs/finetune/<task>_shapes.yaml unless
    --config is given."""
    if "--config" not in argv:
        argv = ["--config", f"configs/finetune/{task}_shapes.yaml", *argv]
    return main(["finetune", task, *argv])


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from vlp.data.synth import generate

    manifest = generate(args.out, images=args.images, val_images=args.val_images, seed=args.seed,
                        image_size=args.image_size, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in manifest.items() if not isinstance(v, (dict, list))},
                     indent=2))
    return 0


def _cmd_data_regions(args: argparse.Namespace) -> int:
    from vlp.extract_regions import extract_regions
    from vlp.data.shards import expand_urls
    from vlp.recipes.single_stream import manifest_regions

    labels = manifest_regions(expand_urls(args.data)).get("object_labels", [])
    counts = extract_regions(args.model, args.data, args.out, label_names=labels,
                             batch_size=args.batch_size, progress=not args.no_progress,
                             device=args.device)
    print(json.dumps(counts, indent=2))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from vlp.data.shards import expand_urls
    from vlp.data.pipeline import iter_captions
    from vlp.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_captions(expand_urls(args.data)), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out} (vocab {tok.vocab_size})")
    return 0


def _retrieval_model(path: str, rerank_k: int, device: str | None = None):
    """(the towers to rank with, the fusion layers + ITM head that re-rank, or None): a
    combined directory brings its own; a retrieval fine-tuned one when its ITM head was
    trained (retrieval.rerank_k > 0)."""
    import vlp
    from vlp import modeldir
    from vlp.eval.retrieval import load_with_fusion

    if modeldir.read(path).architecture in ("dual_tower", "combined"):
        return load_with_fusion(path, device) if rerank_k else (vlp.load(path, device), None)
    model = vlp.load(path, device)
    if not hasattr(model, "encode_image"):
        raise EvalError(f"{path}: a fine-tuned {type(model).__name__} has no towers to rank "
                        "with; give a dual_tower, combined or retrieval model directory")
    fusion = model.backbone.core if rerank_k and getattr(model, "itm_trained", False) else None
    return model, fusion


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    import vlp
    from vlp.eval.retrieval import evaluate_karpathy, evaluate_retrieval, format_karpathy_table, \
        format_table

    if bool(args.data) == bool(args.karpathy):
        raise EvalError("vlp eval retrieval needs one of --data SHARDS (webdataset shards) or "
                        "--karpathy dataset_coco.json --images DIR (a Karpathy split)")
    if args.karpathy:
        if not args.images:
            raise EvalError("--karpathy needs --images DIR: the folder the file's "
                            "<filepath>/<filename> are relative to")
        model, fusion = _retrieval_model(args.model, args.rerank_k, args.device)
        metrics = evaluate_karpathy(model, args.karpathy, args.images, args.split or "test",
                                    batch_size=args.batch_size, rerank_k=args.rerank_k,
                                    fusion=fusion, progress=not args.no_progress)
        _report(metrics, format_karpathy_table(metrics), args.out)
        return 0
    if args.images or args.split or args.rerank_k:
        raise EvalError("--images, --split and --rerank-k go with --karpathy; --data shards are "
                        "scored whole, by the towers")
    model = vlp.load(args.model, device=args.device)
    metrics = evaluate_retrieval(model, args.data, batch_size=args.batch_size,
                                 progress=not args.no_progress)
    print(format_table(metrics))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 0


def _cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    import vlp
    from vlp.eval.zeroshot import evaluate_zeroshot, format_table, open_zeroshot_set

    data = open_zeroshot_set(args.data, args.split, args.classnames, args.templates)
    model = vlp.load(args.model, device=args.device)
    if not hasattr(model, "encode_text"):
        raise EvalError(f"{args.model}: a fine-tuned {type(model).__name__} has no towers; "
                        "zero-shot classification needs a dual_tower, combined or retrieval "
                        "model directory")
    metrics = evaluate_zeroshot(model, data, batch_size=args.batch_size,
                                progress=not args.no_progress)
    _report(metrics, format_table(metrics, data.source), args.out)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from vlp.eval.plot import save_plot

    print(f"wrote {save_plot(args.runs, args.out, args.metrics)}")
    return 0


def _convert(what: str, fn, *args) -> int:
    try:
        out = fn(*args)
    except ValueError as e:  # a config or checkpoint vlp cannot convert: one clear line
        print(f"vlp convert {what}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _cmd_convert_hf_clip(args: argparse.Namespace) -> int:
    from vlp.convert.hf_clip import from_hf_clip

    return _convert("hf-clip", from_hf_clip, args.src, args.out)


def _cmd_convert_to_hf_clip(args: argparse.Namespace) -> int:
    from vlp.convert.hf_clip import to_hf_clip

    return _convert("to-hf-clip", to_hf_clip, args.model, args.out)


def _cmd_convert_open_clip(args: argparse.Namespace) -> int:
    from vlp.convert.open_clip import from_open_clip

    return _convert("open-clip", from_open_clip, args.state, args.out, args.config,
                    args.tokenizer)


def _cmd_convert_hf_swin(args: argparse.Namespace) -> int:
    from vlp.convert.hf_swin import from_hf_swin

    return _convert("hf-swin", from_hf_swin, args.src, args.out)


def _cmd_convert_hf_vit(args: argparse.Namespace) -> int:
    from vlp.convert.hf_vit import from_hf_vit

    return _convert("hf-vit", from_hf_vit, args.src, args.out, args.heads)


def _report(metrics: dict, table: str, out: str | None) -> None:
    """Print the table; with --out, write the metrics as flat JSON."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out}")


def _predictions(args: argparse.Namespace) -> str:
    """The file to score. (Scoring a fine-tuned model directly, --model, is the other way in.)"""
    if not args.predictions:
        raise EvalError(f"vlp eval {args.eval_cmd} needs --predictions FILE or --model DIR")
    return args.predictions


def _eval_model(args: argparse.Namespace, files: dict[str, str | None]) -> dict | None:
    """With --model: run the fine-tuned model on the benchmark (the shapes world's unless
    --data / the files say otherwise); its results file goes beside --out (else into the
    model's run folder). `files`: config key -> path given on the command line."""
    if not args.model:
        if args.overrides:
            raise EvalError(f"{args.overrides[0]}: key=value settings apply to --model DIR (a "
                            "model run on the benchmark), not to scoring --predictions")
        return None
    if args.predictions:
        raise EvalError("give --predictions FILE (score a results file) or --model DIR (run a "
                        "model), not both")
    from vlp.tasks import evaluate_finetuned

    overrides = [f"{key}={value}" for key, value in files.items() if value]
    overrides += _eval_overrides(args.eval_cmd, args.overrides)
    out_dir = Path(args.out).parent if args.out else Path(args.model).parent
    return evaluate_finetuned(args.model, out_dir, data_root=args.data or "", device=args.device,
                              split=getattr(args, "split", None) or "", overrides=overrides,
                              progress=not args.no_progress)


def _eval_overrides(task: str, given: list[str]) -> list[str]:
    """`vlp eval <task> --model DIR key=value ...`: the task's own settings (vqa.head=rank,
    caption.beam_size=5), eval.* and data.*; training keys would change nothing, so they are
    refused rather than silently ignored."""
    allowed = (f"{task}.", "eval.", "data.")
    for item in given:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.startswith(allowed):
            raise EvalError(f"{item!r}: with --model, settings are key=value with a key under "
                            f"{', '.join(a + '*' for a in allowed)} (e.g. {task}.beam_size=5)")
    return list(given)


def _cmd_eval_vqa(args: argparse.Namespace) -> int:
    from vlp.eval.vqa_metric import evaluate_vqa, format_table

    metrics = _eval_model(args, {"vqa.val_questions": args.questions,
                                 "vqa.val_annotations": args.annotations})
    if metrics is None:
        if not (args.questions and args.annotations):
            raise EvalError("scoring --predictions needs --questions and --annotations")
        metrics = evaluate_vqa(_predictions(args), args.questions, args.annotations)
    _report(metrics, format_table(metrics), args.out)
    return 0


def _cmd_eval_caption(args: argparse.Namespace) -> int:
    from vlp.eval.caption_metric import evaluate_captions, format_table, karpathy_references

    metrics = _eval_model(args, {"caption.karpathy": args.karpathy,
                                 "caption.annotations": args.annotations})
    if metrics is not None:
        _report(metrics, format_table(metrics), args.out)
        return 0
    predictions = _predictions(args)
    if bool(args.annotations) == bool(args.karpathy):
        raise EvalError("vlp eval caption needs its references from one of --annotations FILE "
                        "(COCO captions JSON) or --karpathy dataset_coco.json [--split test]")
    if args.split and not args.karpathy:
        raise EvalError("--split picks a split of --karpathy dataset_coco.json; with "
                        "--annotations every image of the file is scored")
    refs = (karpathy_references(args.karpathy, args.split or "test") if args.karpathy
            else args.annotations)
    metrics = evaluate_captions(predictions, refs)
    _report(metrics, format_table(metrics), args.out)
    return 0


def _cmd_eval_vcr(args: argparse.Namespace) -> int:
    from vlp.eval.vcr_metric import evaluate_vcr, format_table

    metrics = _eval_model(args, {"vcr.val": args.annotations, "vcr.images": args.images})
    if metrics is None:
        if not args.annotations:
            raise EvalError("scoring --predictions needs --annotations (VCR val.jsonl)")
        metrics = evaluate_vcr(_predictions(args), args.annotations)
    _report(metrics, format_table(metrics), args.out)
    return 0


def _cmd_eval_refcoco(args: argparse.Namespace) -> int:
    from vlp.eval.refcoco_metric import evaluate_refcoco, format_table

    metrics = _eval_model(args, {"refcoco.refs": args.refs, "refcoco.instances": args.instances,
                                 "refcoco.dets": args.dets})
    if metrics is None:
        if not (args.refs and args.instances):
            raise EvalError("scoring --predictions needs --refs and --instances")
        metrics = evaluate_refcoco(_predictions(args), args.refs, args.instances,
                                   [args.split] if args.split else None)
    _report(metrics, format_table(metrics), args.out)
    return 0


def _cmd_index_build(args: argparse.Namespace) -> int:
    from vlp.retrieval import build

    try:
        info = build(args.model, args.data, args.out, text=args.text, device=args.device,
                     batch_size=args.batch_size, chunk_size=args.chunk_size, dtype=args.dtype,
                     index_type=args.index_type, max_memory=args.max_memory,
                     on_disk=True if args.on_disk else None, max_chunks=args.max_chunks,
                     progress=not args.no_progress)
    except ValueError as e:  # bad settings, or a resume with other settings: no traceback
        print(f"vlp index build: error: {e}", file=sys.stderr)
        return 2
    print(info["embed"])
    if "rank" in info or not info.get("complete", True):
        return 0  # another rank of a multi-process build (rank 0 reports), or --max-chunks
    for modality in ("image", "text"):
        if modality in info:
            r = info[modality]
            recall = ", ".join(f"{q} queries {v:.3f}" for q, v in r["recall@10"].items())
            print(f"{r['file']}: {r['count']} vectors, {r['factory']} ({r['reason']}); "
                  f"{r['search_params'] or 'no search parameters'}; recall@10 vs exact: "
                  f"{recall}; {r.get('qps', 0):.0f} queries/s")
            name, what = ("t2i", "captions find their image") if modality == "image" else \
                ("i2t", "images find their caption")
            if f"{name}_R@10" in r:
                print(f"  zero-shot {name}_R@10 ({what} in the top 10): {r[f'{name}_R@10']:.1f}%"
                      f" (exact search {r[f'{name}_R@10_exact']:.1f}%, chance "
                      f"{r[f'{name}_R@10_chance']:.1f}%)")
    print(f"wrote {args.out}/index_info.json")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from vlp.retrieval.search import Searcher, format_hits, hits_json, load_image

    if (args.query is None) == (args.image is None):
        print("vlp search: error: give either a text QUERY or --image PATH", file=sys.stderr)
        return 2
    try:
        searcher = Searcher(args.index, model=args.model, device=args.device)
        if args.image:
            hits = searcher.search_image(load_image(args.image), args.k, args.mode)
        else:
            hits = searcher.search_text(args.query, args.k, args.mode)
    except ValueError as e:
        print(f"vlp search: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(hits_json(hits, query=args.query, image=args.image, mode=args.mode, k=args.k))
    else:
        print(format_hits(hits))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.index is None:
        if args.model is None:
            print("vlp serve: error: give --index DIR (the search page over an index) or "
                  "--model DIR (the demo of a fine-tuned VQA or captioning model)",
                  file=sys.stderr)
            return 2
        return _serve_model(args)
    from vlp.retrieval.search import Searcher
    from vlp.retrieval.serve import make_server

    searcher = Searcher(args.index, model=args.model, device=args.device)
    try:
        server = make_server(searcher, args.host, args.port)  # a port in use fails first
    except OSError as e:
        print(f"vlp serve: error: {e}", file=sys.stderr)
        return 2
    searcher.model  # load it now: the first query should not wait for it
    print(f"serving {args.index} ({searcher.count} images) on {server.url}  (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _serve_model(args: argparse.Namespace) -> int:
    from vlp.retrieval.model_service import make_model_server

    try:  # the port is bound first: a port in use fails before the model loads
        server = make_model_server(args.model, args.host, args.port, device=args.device)
    except (OSError, ValueError) as e:  # BindError, no model directory, ModelDirError
        print(f"vlp serve: error: {e}", file=sys.stderr)
        return 2
    task = server.service.task
    print(f"serving the {task} model {args.model} on {server.url}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where the model runs: cuda, cuda:1, cpu (default: the GPU "
                   "when there is one, else the CPU)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """`vlp eval vqa|caption|vcr|refcoco --model DIR`: run a fine-tuned model instead of
    scoring a file."""
    p.add_argument("--model", help="a fine-tuned model directory (OUT/model of vlp finetune): "
                   "run it on the benchmark instead of scoring --predictions")
    p.add_argument("--data", help="with --model: the benchmark folder (default: the shapes "
                   "world's)")
    p.add_argument("--no-progress", action="store_true")
    _add_device_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --model: the task's settings for this evaluation instead of the "
                   "run's, e.g. vqa.head=rank, caption.beam_size=5, eval.batch_size=64")


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

    ft = sub.add_parser("finetune", help="fine-tune a pretrained model on a benchmark") \
        .add_subparsers(dest="task", required=True)
    for task, what in (("vqa", "VQA v2"), ("caption", "COCO captioning (Karpathy split)"),
                       ("vcr", "VCR Q->A, QA->R"), ("retrieval", "image-text retrieval"),
                       ("refcoco", "RefCOCO referring expressions")):
        p = ft.add_parser(task, help=f"fine-tune on {what}")
        p.add_argument("--config", help=f"YAML file (configs/finetune/{task}_*.yaml)")
        p.add_argument("--out", help=f"run folder (default: runs/finetune-{task}-<time>)")
        p.add_argument("--resume", help="checkpoint folder, or 'latest' (OUT/checkpoints/latest)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. init_from=runs/vlbert/model train.steps=200")
        p.set_defaults(func=_cmd_finetune)

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
    _add_device_arg(p)
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
    p = ev.add_parser("retrieval", help="image<->text Recall@K (and, on shards, the shapes "
                      "world's zero-shot accuracy)")
    p.add_argument("--model", required=True, help="model directory (OUT/model of a run)")
    p.add_argument("--data", help="shard spec of the test split")
    p.add_argument("--karpathy", help="a Karpathy split file (dataset_coco.json, "
                   "dataset_flickr30k.json), instead of --data")
    p.add_argument("--images", help="with --karpathy: the folder its <filepath>/<filename> are "
                   "relative to")
    p.add_argument("--split", help="with --karpathy: the split to score (default: test)")
    p.add_argument("--rerank-k", type=int, default=0, help="with --karpathy: re-rank each "
                   "query's top K by the ITM head (combined models; fine-tuned retrieval "
                   "models trained with retrieval.rerank_k > 0)")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_eval_retrieval)
    p = ev.add_parser("zeroshot", help="zero-shot classification: top-1/top-5 accuracy and "
                      "mean per-class recall, with prompt ensembles")
    p.add_argument("--model", required=True, help="model directory with a dual tower (trained, "
                   "converted or combined)")
    p.add_argument("--data", required=True, help="CLIP_benchmark webdataset folder (DIR/test/"
                   "*.tar, classnames.txt, zeroshot_classification_templates.txt) or an "
                   "ImageNet-style folder (DIR/val/<class dir>/*.JPEG)")
    p.add_argument("--split", help="the split folder (default: test for webdataset, val for "
                   "image folders)")
    p.add_argument("--classnames", help="class names file (default: DIR/classnames.txt; one a "
                   "line, dir<TAB>name, LOC_synset_mapping.txt, or JSON)")
    p.add_argument("--templates", help="prompt templates, one a line with {c} for the class "
                   "(default: DIR/zeroshot_classification_templates.txt, else 'a photo of a "
                   "{c}.')")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_eval_zeroshot)
    p = ev.add_parser("vqa", help="VQA accuracy (the official VQA v2 scorer's), overall and "
                      "per answer/question type")
    p.add_argument("--predictions", help='results JSON: [{"question_id": N, "answer": "..."}]')
    p.add_argument("--questions", help="v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", help="v2_mscoco_*_annotations.json")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval_vqa)
    p = ev.add_parser("caption", help="COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, "
                      "CIDEr-D (pycocoevalcap; needs Java)")
    p.add_argument("--predictions", help='results JSON: [{"image_id": N, "caption": "..."}]')
    p.add_argument("--annotations", help="COCO captions JSON (captions_val2014.json)")
    p.add_argument("--karpathy", help="Karpathy's dataset_coco.json, instead of --annotations")
    p.add_argument("--split", help="the --karpathy split to score (default: test)")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval_caption)
    p = ev.add_parser("vcr", help="VCR Q->A, QA->R and Q->AR accuracy")
    p.add_argument("--predictions", help="the leaderboard CSV (.csv) or JSON lines (.jsonl) "
                   '{"annot_id", "answer_probs", "rationale_probs"}')
    p.add_argument("--annotations", help="VCR val.jsonl")
    p.add_argument("--images", help="with --model: the folder img_fn/metadata_fn are relative to")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval_vcr)
    p = ev.add_parser("refcoco", help="referring expressions: accuracy at IoU >= 0.5 per split")
    p.add_argument("--predictions", help='results JSON: [{"sent_id": N, "box": [x, y, w, h]}]')
    p.add_argument("--refs", help="the refer toolkit's refs(unc).p (or a .json copy)")
    p.add_argument("--instances", help="its instances.json")
    p.add_argument("--dets", help="with --model: the folder of per-image detected boxes")
    p.add_argument("--split", help="val, testA, testB, ... (default: --predictions: the "
                   "splits it covers; --model: test = val and every test split)")
    p.add_argument("--out", help="write the metrics as flat JSON here")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval_refcoco)

    conv = sub.add_parser("convert", help="load other projects' checkpoints (local files)"
                          ).add_subparsers(dest="convert_cmd", required=True)
    p = conv.add_parser("hf-clip", help="Hugging Face CLIPModel folder -> vlp model directory")
    p.add_argument("src", help="folder with config.json, model.safetensors (or "
                   "pytorch_model.bin) and tokenizer.json (or vocab.json + merges.txt)")
    p.add_argument("out", help="vlp model directory to write (what vlp.load reads)")
    p.set_defaults(func=_cmd_convert_hf_clip)
    p = conv.add_parser("to-hf-clip", help="vlp dual tower -> Hugging Face CLIPModel folder")
    p.add_argument("model", help="vlp model directory (OUT/model of a run)")
    p.add_argument("out", help="folder to write (CLIPModel.from_pretrained reads it)")
    p.set_defaults(func=_cmd_convert_to_hf_clip)
    p = conv.add_parser("open-clip", help="OpenCLIP state dict -> vlp model directory")
    p.add_argument("state", help="the state dict: .safetensors (a .pt only if "
                   "torch.load(weights_only=True) reads it)")
    p.add_argument("out", help="vlp model directory to write")
    p.add_argument("--config", required=True, help="OpenCLIP model config JSON "
                   "(model_configs/ViT-B-32.json or open_clip_config.json)")
    p.add_argument("--tokenizer", required=True, help="bpe_simple_vocab_16e6.txt.gz, a "
                   "tokenizer.json, or a folder with tokenizer.json / vocab.json + merges.txt")
    p.set_defaults(func=_cmd_convert_open_clip)
    p = conv.add_parser("hf-swin", help="Hugging Face SwinModel / SwinForImageClassification "
                        "folder -> vlp vision-tower directory")
    p.add_argument("src", help="folder with config.json (model_type swin) and model.safetensors "
                   "(or pytorch_model.bin); preprocessor_config.json optional")
    p.add_argument("out", help="vision-tower directory to write (config.json + "
                   "model.safetensors; vlp.models.towers.init_vision_tower reads it)")
    p.set_defaults(func=_cmd_convert_hf_swin)
    p = conv.add_parser("hf-vit", help="Hugging Face ViTModel / ViTForImageClassification "
                        "folder, or a timm ViT state dict -> vlp vision-tower directory")
    p.add_argument("src", help="folder with config.json (model_type vit) and model.safetensors "
                   "(or pytorch_model.bin, read with weights_only=True); or a timm ViT "
                   ".safetensors file, or a timm hub folder (config.json + model.safetensors)")
    p.add_argument("out", help="vision-tower directory to write (config.json + "
                   "model.safetensors; model.vision.init_from=OUT starts a tower from it)")
    p.add_argument("--heads", type=int, default=None, help="timm only: the attention heads "
                   "(not in the weights; default: the hub config's, or the size in its "
                   "architecture name)")
    p.set_defaults(func=_cmd_convert_hf_vit)

    idx = sub.add_parser("index", help="retrieval indexes (faiss)").add_subparsers(
        dest="index_cmd", required=True)
    p = idx.add_parser("build", help="embed shards and build a faiss index (resumable)")
    p.add_argument("--model", required=True, help="model directory (OUT/model of a run)")
    p.add_argument("--data", required=True, help="shard spec (brace pattern, folder, pipe:)")
    p.add_argument("--out", required=True, help="index folder (created; rerun to resume)")
    p.add_argument("--text", action="store_true",
                   help="also embed the captions and build text.index (for --mode text)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="samples per embedding file (the unit of resuming)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how the embeddings are stored on disk")
    p.add_argument("--max-memory", default="4GB", help="memory budget of the index, e.g. 4GB")
    p.add_argument("--index-type", default="auto", help="auto, flat, hnsw, ivf, ivf-hnsw, "
                   "ivf-pq, opq-pq, or a faiss factory string (e.g. 'IVF1024,PQ32x8')")
    p.add_argument("--on-disk", action="store_true", help="keep the IVF inverted lists on disk "
                   "(default: when they exceed --max-memory)")
    p.add_argument("--max-chunks", type=int, help="stop after embedding N chunks (per "
                   "process) and build no index yet; rerun to go on")
    p.add_argument("--no-progress", action="store_true")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_index_build)

    p = sub.add_parser("search", help="search an index with a text or an image")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--index", required=True, help="index folder (vlp index build --out)")
    p.add_argument("--image", help="image file to search with, instead of a text query")
    p.add_argument("-k", type=int, default=10, help="results to return")
    p.add_argument("--mode", choices=("image", "text"), default="image",
                   help="search the images (default) or the captions (needs --text at build)")
    p.add_argument("--model", help="model directory (default: the one the index was built "
                   "with)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("serve", help="HTTP API and web page: search over an index (--index), "
                       "or the demo of a fine-tuned VQA / captioning model (--model alone)")
    p.add_argument("--index", help="index folder (vlp index build --out): serve the search")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="with --index: the model for the queries (default: the one "
                   "the index was built with); alone: a fine-tuned VQA or captioning model "
                   "directory (vlp finetune vqa|caption's OUT/model) to try in the browser")
    _add_device_arg(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("plot", help="training curves (loss, lr, evaluation metrics) of runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (their train_log.jsonl)")
    p.add_argument("--out", required=True, help="image to write (curves.png)")
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="only these evaluation metrics "
                   "(names or patterns such as 'i2t_R@*'); default: all")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a positional list only the values before the first option: key=value
    # overrides after `--out DIR` arrive here, and belong to it
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, EvalError) as e:
        # user errors: one clear line, no stack trace
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
