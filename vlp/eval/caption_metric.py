"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr through pycocoevalcap.

This is what `COCOEvalCap.evaluate()` computes (the COCO caption server's code): captions are
lower-cased and tokenised by the Stanford PTB tokenizer (Java) with punctuation removed, then
scored by the same scorer classes. pycocoevalcap's `Cider` is CIDEr-D, the variant the COCO
server reports. SPICE is left out: it downloads Stanford CoreNLP on first use.

Scores are reported x100 (BLEU_4 39.7, CIDEr 133.3), as papers print them and like every other
`vlp eval` metric; pycocoevalcap itself returns 0..1 (CIDEr 0..10).

For the Karpathy splits (test/val are slices of COCO val2014), `karpathy_references` turns
Karpathy's dataset_coco.json into COCO-format references for one split.
"""
from __future__ import annotations

import os
import shutil

from vlp.data.karpathy import read_karpathy
from vlp.eval.inputs import EvalError, describe, field, id_list, load_json, require_object

METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = "pycocoevalcap needs Java: apt-get install default-jre-headless"


def _one_line(caption: str) -> str:
    # pycocoevalcap replaces only "\n" before feeding one caption per line to the Java
    # tokenizer; a "\r" (or "\u2028") would split a caption in two and shift every later one
    # onto the wrong image. Runs of whitespace are one separator to PTB anyway.
    return " ".join(caption.split())


def karpathy_references(dataset: str | os.PathLike | dict, split: str) -> dict:
    """COCO-format references ({"images", "annotations"}) for one split of Karpathy's
    dataset_coco.json (or dataset_flickr30k.json, or either parsed): image ids are `cocoid`
    (else `imgid`), captions the `raw` sentences (the untokenised COCO captions the server
    scores against)."""
    name = describe(dataset)
    try:
        records = read_karpathy(dataset)
    except ValueError as e:
        raise EvalError(str(e)) from None
    chosen = [r for r in records if r["split"] == split]
    if not chosen:
        splits = {r["split"] for r in records}
        raise EvalError(f"{name}: no images in split {split!r} (splits present: "
                        f"{sorted(s for s in splits if isinstance(s, str))})")
    images = [{"id": r["image_id"], "file_name": r["filename"]} for r in chosen]
    annotations = [{"id": sentid, "image_id": r["image_id"], "caption": caption}
                   for r in chosen for sentid, caption in r["captions"]]
    return {"info": {"description": f"Karpathy split {split!r} of {name}"},
            "images": images, "annotations": annotations}


def _read_references(ann: dict, name: str, image_ids) -> tuple[dict, set]:
    """({image_id: [caption, ...]} for the images to score, every image id of the file).

    The scored images keep the order pycocoevalcap uses: the file's image order, or
    `image_ids`' order."""
    order = []
    for i, img in enumerate(field(ann, "images", list, name)):
        where = f"{name}: images[{i}]"
        order.append(field(require_object(img, where), "id", (int, str), where))
    refs: dict = {image_id: [] for image_id in order}
    for i, a in enumerate(field(ann, "annotations", list, name)):
        where = f"{name}: annotations[{i}]"
        image_id = field(require_object(a, where), "image_id", (int, str), where)
        caption = field(a, "caption", str, where)
        if image_id in refs:  # captions of images not listed in "images" are never scored
            refs[image_id].append(caption)
    annotated = set(refs)
    if image_ids is not None:
        unknown = [i for i in image_ids if i not in refs]
        if unknown:
            raise EvalError(f"{name}: {id_list(unknown)} of the requested image_ids are not "
                            f"among its images")
        refs = {i: refs[i] for i in dict.fromkeys(image_ids)}
    if not refs:
        raise EvalError(f"{name}: no images to score")
    bare = [i for i, caps in refs.items() if not caps]
    if bare:
        raise EvalError(f"{name}: {id_list(bare)} images have no reference captions")
    return refs, annotated


def _read_results(results, annotated: set, scored: dict) -> dict:
    """{image_id: caption} for every scored image, from COCO caption results
    [{"image_id", "caption"}, ...]."""
    name = describe(results)
    rows = load_json(results, list)
    captions: dict = {}
    for i, r in enumerate(rows):
        where = f"{name}: [{i}]"
        image_id = field(require_object(r, where), "image_id", (int, str), where)
        caption = field(r, "caption", str, where)
        if not caption.strip():
            raise EvalError(f"{where}: empty caption for image_id {image_id!r}")
        if image_id not in annotated:
            other = {str(a): a for a in annotated}.get(str(image_id))
            hint = f" (the annotations have {other!r}: same id, other type)" if other else ""
            raise EvalError(f"{where}: image_id {image_id!r} is not an image of the "
                            f"annotations{hint}")
        # The COCO server scores one caption per image. The same caption twice (e.g. from a
        # distributed sampler's padding) is kept once; two different captions are refused
        # rather than silently picking one.
        if image_id in captions and captions[image_id] != caption:
            raise EvalError(f"{where}: image_id {image_id!r} has two different captions "
                            f"({captions[image_id]!r} and {caption!r}); give one per image")
        captions[image_id] = caption
    missing = [i for i in scored if i not in captions]
    if missing:
        raise EvalError(f"{name}: {id_list(missing)} images to score have no caption")
    return {i: captions[i] for i in scored}


def evaluate_captions(results, annotations, image_ids=None) -> dict:
    """Score COCO-format caption results against COCO-format references.

    results: [{"image_id", "caption"}, ...] or a path to that JSON; annotations: COCO captions
    JSON (path or dict, e.g. captions_val2014.json or `karpathy_references(...)`); image_ids:
    the images to score (default: every image of the annotations; each needs exactly one
    caption). Results for annotated images outside `image_ids` are ignored. Returns x100 scores
    {BLEU_1..BLEU_4, METEOR, ROUGE_L, CIDEr} and num_images.
    """
    refs, annotated = _read_references(load_json(annotations, dict), describe(annotations),
                                       image_ids)
    hyps = _read_results(results, annotated, refs)
    if shutil.which("java") is None:
        raise EvalError(JAVA_HINT)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": _one_line(c)} for c in caps]
                              for i, caps in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": _one_line(c)}] for i, c in hyps.items()})
    metrics: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, score in enumerate(bleu, 1):
        metrics[f"BLEU_{n}"] = 100 * float(score)
    meteor = Meteor()  # a Java process, killed when the object goes
    metrics["METEOR"] = 100 * float(meteor.compute_score(gts, res)[0])
    del meteor
    metrics["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    metrics["num_images"] = len(hyps)
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"{'caption metric (x100)':<22}  {'value':>7}"]
    for key in METRICS:
        lines.append(f"{key:<22}  {metrics[key]:7.2f}")
    lines.append(f"images={metrics.get('num_images')}")
    return "\n".join(lines)
