"""Zero-shot image classification with a dual tower: CLIP's protocol (OpenCLIP's
`zero_shot_classifier`, CLIP_benchmark's `zeroshot_classification`) on the dataset layouts
people already have.

Each class is embedded by a prompt ensemble: every template filled with the class name, the
L2-normalised text embeddings averaged and renormalised. An image is assigned the classes whose
embeddings are most similar to its own. Metrics: top-1 and top-5 accuracy (top-k with k capped
at the number of classes) and the mean per-class recall (each class's accuracy averaged over the
classes that have images; CLIP_benchmark's `mean_per_class_recall`, sklearn's balanced
accuracy).

Layouts (`open_zeroshot_set`):

- CLIP_benchmark's webdataset layout (clip_benchmark/webdataset_builder.py):
  `DIR/classnames.txt` (one name a line, indexed by `.cls`),
  `DIR/zeroshot_classification_templates.txt` (one template a line, `{c}` = the class name),
  `DIR/<split>/nshards.txt` and `DIR/<split>/0.tar ...` with `{key}.cls` (the class index as
  text) and `{key}.webp|png|jpg|jpeg`. Split: `test` unless given.
- An ImageNet-style folder: `DIR/<split>/<class dir>/*.JPEG` (split `val` unless given; or
  DIR itself holds the class dirs). Labels index the class dirs in sorted order. Names come from
  a class-names file (`--classnames`, else `DIR/classnames.txt`, else the dir names with `_` as
  spaces); see `read_classnames` for the formats accepted.

Templates: `--templates FILE` (one a line, `{c}` or `{}` for the class name; or a JSON list),
else the set's `zeroshot_classification_templates.txt`, else `DEFAULT_TEMPLATES`.
Images that cannot be read are skipped and counted by reason (`skipped_<reason>`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from vlp.data.pipeline import SkipCounter, SkipSample, decode_image, skipped_samples
from vlp.data.shards import iter_tar_samples
from vlp.eval.inputs import EvalError

KS = (1, 5)
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # CLIP's single prompt, when a set brings none
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # compared lowercased


# --------------------------------------------------------------------------- the classifier
def fill(template: str, classname: str) -> str:
    """A prompt: `template` with its `{c}` (CLIP_benchmark) or `{}` replaced by the name."""
    return template.replace("{c}", classname).replace("{}", classname)


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str]
                         ) -> torch.Tensor:
    """(C, D) class embeddings: per class, the mean of its prompts' L2-normalised text
    embeddings (`model.encode_text` returns them normalised), renormalised."""
    rows = []
    for name in classnames:
        emb = model.encode_text([fill(t, name) for t in templates]).mean(dim=0)  # (D,)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           ks: Sequence[int] = KS) -> dict[str, float]:
    """logits (N, C), targets (N,) -> percentages {"top1", "top5", "mean_per_class_recall"}.
    Top-k takes k = min(k, C); ties go to the lower class index (argmax's order)."""
    n, c = logits.shape
    out: dict[str, float] = {}
    order = logits.argsort(dim=1, descending=True, stable=True)  # (N, C)
    hit = order == targets[:, None]  # (N, C): the target's position
    for k in ks:
        out[f"top{k}"] = 100.0 * float(hit[:, :min(k, c)].any(dim=1).double().mean())
    correct = hit[:, 0].double()
    recalls = [correct[targets == j].mean() for j in range(c) if bool((targets == j).any())]
    out["mean_per_class_recall"] = 100.0 * float(torch.stack(recalls).mean())
    return out


# --------------------------------------------------------------------------- reading files
def read_templates(path: str | Path) -> list[str]:
    """One template a line (blank lines skipped), or a JSON list of strings; each must hold the
    class-name slot `{c}` (or `{}`)."""
    path = Path(path)
    text = _read_text(path, "templates")
    if path.suffix == ".json":
        items = _json(path, text)
        if not (isinstance(items, list) and all(isinstance(t, str) for t in items)):
            raise EvalError(f"{path}: expected a JSON list of template strings")
        lines = [(i + 1, t.strip()) for i, t in enumerate(items)]
    else:
        lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
    templates = []
    for number, template in lines:
        if not template:
            continue
        if "{c}" not in template and "{}" not in template:
            raise EvalError(f"{path}:{number}: template {template!r} has no {{c}} for the class "
                            "name (every class would get the same prompt)")
        templates.append(template)
    if not templates:
        raise EvalError(f"{path}: no templates in the file")
    return templates


def read_classnames(path: str | Path, class_dirs: Sequence[str] | None = None) -> list[str]:
    """Class names from `path`, in label order: for an image folder, one per entry of
    `class_dirs` (its sorted class folders); for webdataset shards (class_dirs None), indexed
    by `.cls`. Accepted:

    - one name a line (blank lines skipped): line i names label i (sorted class-dir order);
    - `dir<TAB>name` lines (TSV): a map from class dir (e.g. WordNet id) to name;
    - `n01440764 tench, Tinca tinca` lines (ImageNet's LOC_synset_mapping.txt), recognised when
      every line starts with a class dir: the first synonym ("tench") is the name;
    - JSON: a list of names (label order), an object {dir: name}, or Keras's
      imagenet_class_index.json {"0": ["n01440764", "tench"], ...}.
    """
    path = Path(path)
    text = _read_text(path, "class names")
    if path.suffix == ".json":
        mapping = _json_classnames(path, _json(path, text), class_dirs)
    else:
        lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
        lines = [(n, line) for n, line in lines if line]
        dirs = set(class_dirs or ())
        if any("\t" in line for _, line in lines):
            mapping = {}
            for number, line in lines:
                key, sep, name = line.partition("\t")
                if not sep or not name.strip():
                    raise EvalError(f"{path}:{number}: expected 'class dir<TAB>name', got "
                                    f"{line!r}")
                mapping[key.strip()] = name.strip()
        elif dirs and lines and all(line.split()[0] in dirs and len(line.split()) > 1
                                    for _, line in lines):
            mapping = {line.split(None, 1)[0]: line.split(None, 1)[1].split(",")[0].strip()
                       for _, line in lines}
        else:
            mapping = [line for _, line in lines]
    return _names_in_label_order(path, mapping, class_dirs)


def _json_classnames(path: Path, data, class_dirs) -> list[str] | dict[str, str]:
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return data
    if isinstance(data, dict):
        values = list(data.values())
        if values and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                          for v in values):  # Keras: {"0": [wnid, name]}
            if class_dirs is None:
                return {k: v[1] for k, v in data.items()}
            return {v[0]: v[1] for v in values}
        if all(isinstance(v, str) for v in values):
            return {str(k): v for k, v in data.items()}
    raise EvalError(f"{path}: expected a JSON list of names, an object {{class dir: name}} or "
                    "Keras's {\"0\": [\"n01440764\", \"tench\"]}")


def _names_in_label_order(path: Path, mapping, class_dirs) -> list[str]:
    if isinstance(mapping, list):
        if class_dirs is not None and len(mapping) != len(class_dirs):
            raise EvalError(f"{path}: {len(mapping)} names for {len(class_dirs)} class folders "
                            f"(one name a line, in sorted folder order: {_first(class_dirs)})")
        if not mapping:
            raise EvalError(f"{path}: no class names in the file")
        return list(mapping)
    if class_dirs is None:  # shards: keys are the label indexes
        try:
            indexed = {int(k): v for k, v in mapping.items()}
        except ValueError:
            raise EvalError(f"{path}: a map for webdataset shards needs label indexes as keys "
                            f"(\"0\", \"1\", ...), got {_first(mapping)}") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise EvalError(f"{path}: label indexes must be 0..{len(indexed) - 1} without gaps")
        return [indexed[i] for i in range(len(indexed))]
    missing = [d for d in class_dirs if d not in mapping]
    if missing:
        raise EvalError(f"{path}: no name for {len(missing)} class folder(s), e.g. "
                        f"{_first(missing)} (the file maps {_first(mapping)})")
    return [mapping[d] for d in class_dirs]


def _first(items, n: int = 3) -> str:
    items = list(items)
    return ", ".join(repr(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise EvalError(f"{path}: no such {what} file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e})") from None


def _json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- datasets
@dataclass
class ZeroShotSet:
    """A classification set: names in label order, templates, and its (image, label) reader
    (unreadable images are counted in the SkipCounter and not yielded)."""
    source: str  # for messages and the table
    layout: str  # "clip_benchmark" or "image_folder"
    classnames: list[str]
    templates: list[str]
    read: Callable[[SkipCounter], Iterator[tuple[Image.Image, int]]]


def open_zeroshot_set(data: str | Path, split: str | None = None,
                      classnames: str | Path | None = None,
                      templates: str | Path | None = None) -> ZeroShotSet:
    """The set at `data` (see the module docstring for the layouts and defaults)."""
    root = Path(data)
    if not root.is_dir():
        raise EvalError(f"{root}: not a folder (expected CLIP_benchmark's layout, "
                        f"{root}/test/*.tar + {CLASSNAMES_FILE}, or an image folder, "
                        f"{root}/val/<class>/*.JPEG)")
    wds_split = split or "test"
    if _tars(root / wds_split):
        return _clip_benchmark_set(root, wds_split, classnames, templates)
    folder = root / (split or "val")
    if split is None and not _class_dirs(folder):
        folder = root  # DIR itself holds the class folders
    if _class_dirs(folder):
        return _image_folder_set(root, folder, classnames, templates)
    raise EvalError(f"{root}: no zero-shot set found: expected CLIP_benchmark's layout "
                    f"({root}/{wds_split}/0.tar ... with {{key}}.cls, {CLASSNAMES_FILE}) or an "
                    f"ImageNet-style folder ({root}/{split or 'val'}/<class dir>/*.JPEG)")


def _tars(folder: Path) -> list[Path]:
    """CLIP_benchmark's shards: nshards.txt says how many ({0..n-1}.tar), else every *.tar."""
    if not folder.is_dir():
        return []
    count = folder / "nshards.txt"
    if count.is_file():
        text = count.read_text().strip()
        if not text.isdigit():
            raise EvalError(f"{count}: expected the number of shards, got {text!r}")
        return [folder / f"{i}.tar" for i in range(int(text))]
    return sorted(folder.glob("*.tar"))


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _templates(root: Path, templates) -> list[str]:
    if templates:
        return read_templates(templates)
    if (root / TEMPLATES_FILE).is_file():
        return read_templates(root / TEMPLATES_FILE)
    return list(DEFAULT_TEMPLATES)


def _clip_benchmark_set(root: Path, split: str, classnames, templates) -> ZeroShotSet:
    names_file = Path(classnames) if classnames else root / CLASSNAMES_FILE
    if not classnames and not names_file.is_file():
        raise EvalError(f"{root}: CLIP_benchmark's layout needs {CLASSNAMES_FILE} at its root "
                        "(or pass --classnames FILE)")
    names = read_classnames(names_file)
    urls = [str(p) for p in _tars(root / split)]

    def read(skips: SkipCounter) -> Iterator[tuple[Image.Image, int]]:
        for sample in iter_tar_samples(urls, skips.shard_error):
            try:
                raw = sample.get("cls", b"").decode("ascii", errors="replace").strip()
                if not raw.lstrip("-").isdigit():
                    raise SkipSample("missing_label")
                image = decode_image(sample)
            except SkipSample as skip:
                skips.add(skip.reason)
                continue
            label = int(raw)
            if not 0 <= label < len(names):
                raise EvalError(f"{sample['__url__']}: sample {sample['__key__']!r} has class "
                                f"{label}, but {names_file} names {len(names)} classes "
                                f"(0..{len(names) - 1})")
            yield image, label

    return ZeroShotSet(str(root), "clip_benchmark", names, _templates(root, templates), read)


def _image_folder_set(root: Path, folder: Path, classnames, templates) -> ZeroShotSet:
    dirs = _class_dirs(folder)
    names_file = Path(classnames) if classnames else root / CLASSNAMES_FILE
    if classnames or names_file.is_file():
        names = read_classnames(names_file, dirs)
    else:
        names = [d.replace("_", " ") for d in dirs]

    def read(skips: SkipCounter) -> Iterator[tuple[Image.Image, int]]:
        for label, name in enumerate(dirs):
            for path in sorted((folder / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    continue
                try:
                    image = decode_image({"jpg": path.read_bytes()})
                except (SkipSample, OSError):
                    skips.add("corrupt_image")
                    continue
                yield image, label

    return ZeroShotSet(str(folder), "image_folder", names, _templates(root, templates), read)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_zeroshot(model, data: ZeroShotSet | str | Path, *, batch_size: int = 256,
                      progress: bool = True) -> dict:
    """Zero-shot accuracy of `model` (anything with encode_image / encode_text / transform, e.g.
    `vlp.load(...)`) on a set -> flat metrics: zeroshot_top1, zeroshot_top5,
    zeroshot_mean_per_class_recall (percentages), num_images, num_classes, num_templates,
    skipped and skipped_<reason>."""
    zs = data if isinstance(data, ZeroShotSet) else open_zeroshot_set(data)
    if len(zs.classnames) < 2:
        raise EvalError(f"{zs.source}: {len(zs.classnames)} class(es); zero-shot classification "
                        "needs at least 2")
    skips = SkipCounter()
    features, labels, pixels = [], [], []
    for image, label in tqdm(zs.read(skips), desc="embed images", unit="img",
                             disable=not progress):
        pixels.append(model.transform(image))
        labels.append(label)
        if len(pixels) == batch_size:
            features.append(model.encode_image(torch.stack(pixels)))
            pixels = []
    if pixels:
        features.append(model.encode_image(torch.stack(pixels)))
    if not features:
        raise EvalError(f"{zs.source}: no readable images ({dict(skips.counts) or 'none found'})")
    image_features = torch.cat(features)  # (N, D)
    classifier = zero_shot_classifier(model, zs.classnames, zs.templates)  # (C, D)
    scores = classification_metrics(image_features @ classifier.T, torch.tensor(labels))
    metrics: dict = {f"zeroshot_{k}": v for k, v in scores.items()}
    metrics.update(num_images=len(labels), num_classes=len(zs.classnames),
                   num_templates=len(zs.templates), skipped=skipped_samples(skips.counts))
    for reason, n in sorted(skips.counts.items()):
        metrics[f"skipped_{reason}"] = int(n)
    return metrics


def format_table(metrics: dict, source: str = "") -> str:
    """The metrics beside chance (uniform guessing over the classes)."""
    c = metrics["num_classes"]
    chance = {"zeroshot_top1": 100.0 / c, "zeroshot_top5": 100.0 * min(5, c) / c,
              "zeroshot_mean_per_class_recall": 100.0 / c}
    width = max(len(k) for k in chance)
    lines = [f"{'metric':<{width}}  {'value':>8}  {'chance':>8}"]
    lines += [f"{k:<{width}}  {metrics[k]:8.2f}  {v:8.2f}" for k, v in chance.items()]
    lines.append(f"{source + ': ' if source else ''}images={metrics['num_images']} "
                 f"classes={c} templates={metrics['num_templates']} "
                 f"skipped={metrics['skipped']}")
    return "\n".join(lines)

