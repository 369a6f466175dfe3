"""The shapes world: a deterministic synthetic vision-language corpus.

Small images of coloured shapes (1-3 per scene, never overlapping), five captions each from a
small grammar, and object boxes with labels. `generate` writes them as webdataset shards in
the img2dataset layout (the same files `vlp/data` reads for LAION/CC3M) plus, from separate
scenes, benchmark files in their official formats: VQA v2, COCO captions with a Karpathy-style
split, VCR-style jsonl, RefCOCO-style referring expressions (the refer toolkit's
instances.json + refs(unc).p, a JSON copy of the refs, and simulated detections per image),
and a retrieval test file over the held-out val shards. The val
shards' single-object images are also written as zero-shot classification sets of their shape
and their colour in CLIP_benchmark's webdataset layout (`zeroshot/shape`, `zeroshot/color`).

Every train and val sample also carries precomputed region features, `{key}.regions.npz` (the
format vlp/data/regions.py reads), for `model.visual_tokens=regions`. They come from a fixed
extractor with no learned weights, "thumb8_meanstd" (`extract_region_features`): per object
box, the box cropped from the decoded JPEG and resized to 8x8 (PIL bilinear), as RGB values in
[0, 1] flattened row-major (y, x, channel) -> 192 numbers, then the per-channel mean and
standard deviation (population, ddof=0) of the box's pixels in [0, 1] -> 6 numbers; D = 198.
Boxes are the object boxes in pixels, labels the index of the object's shape in `SHAPES`
(`region_label_names()`), and image_w/image_h the image size. MANIFEST.json records them under
"regions", with "object_labels" (`object_label_names()`): the json objects' `label` values
("red circle"), which `visual="roi_align"` looks up instead.

Same seed, same bytes: every scene draws from its own generator seeded by (seed, split, index),
so the first N scenes do not depend on how many are generated, and every file is written with
fixed metadata (tar mtime/uid 0, sorted JSON keys, fixed JPEG settings) and no timestamps.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlp.data.refer import dumps_refs

VERSION = 5  # 2: regions.npz per train/val sample; 3: benchmark region files, 2000 images;
#             4: the zero-shot sets in CLIP_benchmark's layout; 5: RefCOCO refs + detections

# Saturated colours, far apart in RGB, all bright enough to stand out from the dark background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (245, 140, 0),
    "pink": (245, 120, 190),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid over the image, named from the object's centre.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

SIZE_RANGE = {"small": (0.18, 0.24), "large": (0.32, 0.42)}  # box side / image side
JPEG_QUALITY = 95
SPLIT_CODES = {"train": 0, "val": 1, "benchmark": 2}
REGION_EXTRACTOR = "thumb8_meanstd"
REGION_THUMB = 8  # thumbnail side
REGION_DIM = 3 * REGION_THUMB * REGION_THUMB + 6  # 198: thumbnail, then RGB mean and std
# Benchmark scenes by index range; as in Karpathy's split, restval, val and test come from
# COCO's "val2014" (captions_val.json, the VQA and VCR val files) and train from "train2014".
BENCHMARK_SPLITS = (("train", 0.55), ("restval", 0.05), ("val", 0.20), ("test", 0.20))

_PLACE = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_NUMBER = ("zero", "one", "two", "three")
_PLURAL = {s: s + "es" if s.endswith("ss") else s + "s" for s in SHAPES}
_BACKGROUND = (40, 40, 44)
_MARGIN = 2  # pixels kept free between objects, so boxes never touch

# Plausible wrong or synonymous answers a VQA annotator might give. The official scorer
# normalises predictions only ("two" -> "2"), never human answers beyond punctuation, so a human
# "two" or "a star" is never matched: they only lower the agreement on the written answer.
_COLOR_ALTS = {
    "red": ["orange", "dark red"], "green": ["dark green", "blue"], "blue": ["purple", "dark blue"],
    "yellow": ["orange", "gold"], "purple": ["blue", "violet"], "orange": ["red", "yellow"],
    "pink": ["purple", "red"], "white": ["gray", "silver"],
}
_SHAPE_ALTS = {
    "circle": ["ball", "a circle"], "square": ["rectangle", "box"],
    "triangle": ["pyramid", "a triangle"], "diamond": ["rhombus", "square"],
    "star": ["a star", "starfish"], "cross": ["plus", "plus sign"],
}
_COLOR_WHY = {
    "red": "the color of a ripe tomato", "green": "the color of fresh grass",
    "blue": "the color of a clear sky", "yellow": "the color of a lemon",
    "purple": "the color of a grape", "orange": "the color of an orange",
    "pink": "the color of a flamingo", "white": "the color of snow",
}
_SHAPE_WHY = {
    "circle": "is round and has no corners", "square": "has four equal sides and four corners",
    "triangle": "has three sides and three corners", "diamond": "is a square standing on a corner",
    "star": "has five sharp points", "cross": "is made of two bars crossing in the middle",
}
# VCR relation answers and rationales, in the same order as _relation's results.
_RELATIONS = ("to the left of", "to the right of", "above", "below")
_RELATION_WHY = ("further left than", "further right than", "higher than", "lower than")


# Prompt ensembles of the zero-shot sets (CLIP's recipe: the normalised text embeddings of
# several templates averaged per class). `{c}` stands for the class name, as in CLIP_benchmark's
# zeroshot_classification_templates.txt.
ZEROSHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("a {c}", "a {c} shape", "a photo of a {c}", "there is a {c}", "one {c}"),
    "color": ("a {c} shape", "something {c}", "a {c} object", "there is a {c} shape"),
}
ZEROSHOT_SPLIT = "test"  # CLIP_benchmark's split folder


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; `box` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive."""

    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]
    position: str

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_json(self) -> dict:
        return {"box": list(self.box), "label": self.label, "color": self.color,
                "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A rendered scene: its objects, five captions and the JPEG bytes."""

    objects: tuple[ShapeObject, ...]
    captions: tuple[str, ...]
    jpeg: bytes
    image_size: int


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one scene; `stream` separates draws made after the scene (questions)."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


def make_scene(seed: int, split: str, index: int, image_size: int = 64) -> Scene:
    """Sample, caption and render scene `index` of `split`; depends on nothing else."""
    rng = scene_rng(seed, split, index)
    objects = sample_objects(rng, image_size)
    captions = make_captions(objects, rng, image_size)
    image = render(objects, rng, image_size)
    buf = io.BytesIO()
    # 4:4:4 chroma keeps small shapes' colours true; the default 4:2:0 bleeds them at 64 px.
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return Scene(tuple(objects), tuple(captions), buf.getvalue(), image_size)


# --------------------------------------------------------------------------- scenes


def _position(box: tuple[int, int, int, int], image_size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(int(3 * cx / image_size), 2)
    row = min(int(3 * cy / image_size), 2)
    return POSITIONS[3 * row + col]


def _overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return (a[0] < b[2] + _MARGIN and b[0] < a[2] + _MARGIN
            and a[1] < b[3] + _MARGIN and b[1] < a[3] + _MARGIN)


def sample_objects(rng: np.random.Generator, image_size: int) -> list[ShapeObject]:
    """1-3 non-overlapping objects with distinct (colour, shape) pairs, by rejection sampling."""
    n = int(rng.integers(1, 4))
    colors = list(COLORS)
    while True:
        # Three large shapes do not always fit; after many misses try one object fewer.
        for _ in range(20):
            pairs = rng.choice(len(colors) * len(SHAPES), size=n, replace=False)
            objects: list[ShapeObject] = []
            for pair in pairs:
                size = SIZES[int(rng.integers(len(SIZES)))]
                lo, hi = SIZE_RANGE[size]
                side = int(round(rng.uniform(lo, hi) * image_size))
                for _ in range(30):
                    x1, y1 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
                    box = (x1, y1, x1 + side, y1 + side)
                    if not any(_overlaps(box, o.box) for o in objects):
                        break
                else:
                    break
                color, shape = colors[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
                objects.append(ShapeObject(color, shape, size, box, _position(box, image_size)))
            if len(objects) == n:
                return objects
        n -= 1


def shape_polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Outline of `shape` filling `box` (a 24-gon for the circle), in pixel coordinates."""
    x1, y1 = box[0], box[1]
    w, h = box[2] - 1 - x1, box[3] - 1 - y1  # PIL fills polygons including their last pixel
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        unit = np.stack([0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)], 1)
    elif shape == "square":
        unit = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    elif shape == "triangle":
        unit = np.array([[0.5, 0], [1, 1], [0, 1]], float)
    elif shape == "diamond":
        unit = np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]], float)
    elif shape == "star":
        # A fat star (inner radius 1/2) so its middle is solid colour, stretched to fill the box.
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        unit = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        unit = (unit - unit.min(0)) / (unit.max(0) - unit.min(0))
    elif shape == "cross":
        a, b = 1 / 3, 2 / 3
        unit = np.array([[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b],
                         [b, 1], [a, 1], [a, b], [0, b], [0, a], [a, a]], float)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    return [(round(x1 + u * w, 2), round(y1 + v * h, 2)) for u, v in unit]


def render(objects: list[ShapeObject], rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw `objects` over a dark, slightly tinted, mildly noisy background."""
    base = np.array(_BACKGROUND) + rng.integers(-10, 11, size=3)
    noise = rng.integers(-6, 7, size=(image_size, image_size, 1))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        if o.shape == "circle":
            draw.ellipse([o.box[0], o.box[1], o.box[2] - 1, o.box[3] - 1], fill=COLORS[o.color])
        else:
            draw.polygon(shape_polygon(o.shape, o.box), fill=COLORS[o.color])
    return image


# --------------------------------------------------------------------------- captions


def _articles(text: str) -> str:
    """'a orange cross' -> 'an orange cross' (the templates write 'a' everywhere)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: ShapeObject, b: ShapeObject, image_size: int) -> int | None:
    """Index into _RELATIONS of where `a` is relative to `b`, or None when it is not clear-cut."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    far = image_size / 8
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) >= far:
        return 0 if dx > 0 else 1
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) >= far:
        return 2 if dy > 0 else 3
    return None


def _counted(shapes: list[str]) -> str:
    """'two circles and a star' from ['circle', 'star', 'circle']."""
    counts = Counter(shapes)
    return _join([f"a {s}" if c == 1 else f"{_NUMBER[c]} {_PLURAL[s]}" for s, c in counts.items()])


def make_captions(objects: list[ShapeObject], rng: np.random.Generator,
                  image_size: int) -> list[str]:
    """Five distinct captions: a full description first, then one spatial caption, then three
    drawn from every phrasing, so colours and shapes of all objects, positions and relations
    are all stated somewhere."""
    n = len(objects)
    full = [f"a {o.size} {o.color} {o.shape}" for o in objects]
    short = [f"a {o.color} {o.shape}" for o in objects]
    count = f"{_NUMBER[n]} shape" + ("s" if n > 1 else "")
    primary = f"{full[0]} {_PLACE[objects[0].position]}" if n == 1 else _join(full)

    spatial = [f"{_PLACE[o.position]} there is {s}" for s, o in zip(short, objects)]
    if n == 1:  # "there is <full> <place>" would only restate the primary caption
        spatial.append(f"{short[0]} {_PLACE[objects[0].position]}")
    else:
        spatial += [f"there is {f} {_PLACE[o.position]}" for f, o in zip(full, objects)]
        spatial.append(_join([f"{s} {_PLACE[o.position]}" for s, o in zip(short, objects)]))
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            rel = _relation(a, b, image_size) if i != j else None
            if rel is not None:
                spatial.append(f"{short[i]} {_RELATIONS[rel]} {short[j]}")
                spatial.append(f"the {a.label} is {_RELATIONS[rel]} the {b.label}")

    colors = [o.color for o in objects]
    if len(set(colors)) == 1:
        color_only = f"{_NUMBER[n]} {colors[0]} shape" + ("s" if n > 1 else "")
    else:
        color_only = f"{count} colored {_join(list(dict.fromkeys(colors)))}"
    general = [
        f"{count}: {_join(short)}",
        f"a picture of {_join(short)}",
        f"{_join(full)} on a dark background",
        f"{_counted([o.shape for o in objects])} on a dark background",
        color_only,
    ]
    if n == 1:
        o = objects[0]
        general += [f"a single {o.label}", f"the {o.shape} is {o.color}",
                    f"a {o.size} {o.shape} colored {o.color}"]
    else:
        general.append(f"{count}: {_join(full)}")

    spatial = [c for c in dict.fromkeys(spatial) if c != primary]
    captions = [primary, spatial[int(rng.integers(len(spatial)))]]
    rest = [c for c in dict.fromkeys(spatial + general) if c not in captions]
    captions += [rest[int(i)] for i in rng.permutation(len(rest))[:5 - len(captions)]]
    return [_articles(c) for c in captions]


# --------------------------------------------------------------------------- region features


def region_label_names() -> list[str]:
    """The names of the regions.npz `labels`, in index order: the shapes."""
    return list(SHAPES)


def object_label_names() -> list[str]:
    """Every json object `label` ("red circle": colour and shape), colour-major: label names
    for `visual="roi_align"`, which looks up the json label (not the shape)."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def extract_region_features(image: Image.Image,
                            boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """The "thumb8_meanstd" extractor: [N, 198] float32 for N integer pixel boxes of an RGB
    image — per box the 8x8 bilinear thumbnail of its crop (192 values in [0, 1], row-major
    y, x, channel), then the per-channel mean and population std of its pixels in [0, 1]."""
    rgb = np.asarray(image)  # (H, W, 3) uint8
    out = np.empty((len(boxes), REGION_DIM), np.float32)
    n_thumb = 3 * REGION_THUMB * REGION_THUMB
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        thumb = image.crop((x1, y1, x2, y2)).resize((REGION_THUMB, REGION_THUMB),
                                                    Image.Resampling.BILINEAR)
        out[i, :n_thumb] = np.asarray(thumb, dtype=np.float64).reshape(-1) / 255.0
        # mean and std in float64, written out (faster than .mean/.std on these small arrays)
        pixels = rgb[y1:y2, x1:x2].reshape(-1, 3).astype(np.float64) / 255.0
        mean = pixels.sum(0) / len(pixels)
        dev = pixels - mean
        out[i, n_thumb:n_thumb + 3] = mean
        out[i, n_thumb + 3:] = np.sqrt(np.einsum("ij,ij->j", dev, dev) / len(pixels))
    return out


@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """numpy's own .npy header for an array of `dtype` and `shape` (cached: writing it is most
    of the cost of a small array)."""
    array = np.zeros(shape, np.dtype(dtype))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()[:-array.nbytes or None]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez's layout (a stored zip of .npy members) with fixed member timestamps:
    np.savez stamps the current time, which would break same seed, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            array = np.asarray(array)  # tobytes() writes C order, as the header says
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_header(array.dtype.str, array.shape) + array.tobytes())
    return buf.getvalue()


def scene_regions_npz(scene: Scene) -> bytes:
    """The `{key}.regions.npz` of a scene: features of its decoded JPEG, boxes, shape labels,
    image size."""
    image = Image.open(io.BytesIO(scene.jpeg))  # RGB: saved from an RGB image
    boxes = [o.box for o in scene.objects]
    return _npz_bytes({
        "features": extract_region_features(image, boxes),
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.array([SHAPES.index(o.shape) for o in scene.objects], np.int64),
        "image_w": np.array(scene.image_size, np.int64),
        "image_h": np.array(scene.image_size, np.int64),
    })


# --------------------------------------------------------------------------- benchmark items


def _vqa_candidates(objects: list[ShapeObject], rng: np.random.Generator,
                    image_size: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, question_type, answer_type) for every unambiguous question."""
    items = [("how many shapes are there?", str(len(objects)), "how many", "number")]
    # Half the time a colour that is present, so count answers are not mostly "0".
    pool = [o.color for o in objects] if rng.random() < 0.5 else list(COLORS)
    color = pool[int(rng.integers(len(pool)))]
    items.append((f"how many {color} shapes are there?",
                  str(sum(o.color == color for o in objects)), "how many", "number"))
    present = objects[int(rng.integers(len(objects)))]
    items.append((_articles(f"is there a {present.label}?"), "yes", "is there a", "yes/no"))
    labels = {o.label for o in objects}
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in labels]
    absent_label = absent[int(rng.integers(len(absent)))]
    items.append((_articles(f"is there a {absent_label}?"), "no", "is there a", "yes/no"))

    shape_count = Counter(o.shape for o in objects)
    color_count = Counter(o.color for o in objects)
    cell_count = Counter(o.position for o in objects)
    for o in objects:
        if shape_count[o.shape] == 1:
            items.append((f"what color is the {o.shape}?", o.color, "what color is the", "other"))
            size = SIZES[int(rng.integers(len(SIZES)))]
            items.append((f"is the {o.shape} {size}?", "yes" if size == o.size else "no",
                          "is the", "yes/no"))
        if color_count[o.color] == 1:
            items.append((f"what shape is the {o.color} object?", o.shape, "what", "other"))
        if cell_count[o.position] == 1:
            items.append((f"what shape is {_PLACE[o.position]}?", o.shape, "what", "other"))
            items.append((f"what color is the shape {_PLACE[o.position]}?", o.color,
                          "what color is the", "other"))
    for a in objects:
        for b in objects:
            rel = _relation(a, b, image_size) if a is not b else None
            if rel is not None and shape_count[a.shape] == shape_count[b.shape] == 1:
                asked = int(rng.integers(len(_RELATIONS)))
                items.append((f"is the {a.shape} {_RELATIONS[asked]} the {b.shape}?",
                              "yes" if asked == rel else "no", "is the", "yes/no"))
    return items


def _vqa_answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[dict]:
    """Ten annotator answers: mostly `answer`, with up to four alternatives so that the official
    accuracy min(#matches / 3, 1) sees partial agreement."""
    if answer_type == "yes/no":
        alts = ["no" if answer == "yes" else "yes"]
    elif answer_type == "number":
        k = int(answer)
        alts = [_NUMBER[k]] + [str(v) for v in (k + 1, k - 1) if v >= 0]
    elif answer in COLORS:
        alts = _COLOR_ALTS[answer]
    else:
        alts = _SHAPE_ALTS[answer]
    n_alt = int(rng.choice([0, 1, 2, 2, 3, 4]))  # at most 4 of 10, so `answer` stays the majority
    given = [(answer, "yes")] * (10 - n_alt)
    given += [(alts[int(rng.integers(len(alts)))], "maybe" if rng.random() < 0.5 else "no")
              for _ in range(n_alt)]
    order = rng.permutation(10)
    return [{"answer": given[i][0], "answer_confidence": given[i][1], "answer_id": k + 1}
            for k, i in enumerate(order)]


def _vcr_candidates(objects: list[ShapeObject], image_size: int) -> list[tuple]:
    """VCR items as token lists: (question, answer, wrong answers, rationale, wrong rationales)."""
    items = []
    for i, o in enumerate(objects):
        others = [c for c in COLORS if c != o.color]
        items.append((
            ["what", "color", "is", [i], "?"],
            [[i], "is", o.color, "."], [[[i], "is", c, "."] for c in others],
            [[i], "has", *_COLOR_WHY[o.color].split()],
            [[[i], "has", *_COLOR_WHY[c].split()] for c in others],
        ))
        others = [s for s in SHAPES if s != o.shape]
        items.append((
            ["what", "shape", "is", [i], "?"],
            [[i], "is", "a", o.shape, "."], [[[i], "is", "a", s, "."] for s in others],
            [[i], *_SHAPE_WHY[o.shape].split()],
            [[[i], *_SHAPE_WHY[s].split()] for s in others],
        ))
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            rel = _relation(a, b, image_size) if i != j else None
            if rel is None:
                continue
            answers = [[[i], "is", *_RELATIONS[r].split(), [j], "."] for r in range(4)]
            whys = [["the", "center", "of", [i], "is", *_RELATION_WHY[r].split(),
                     "the", "center", "of", [j]] for r in range(4)]
            items.append((["where", "is", [i], "compared", "to", [j], "?"],
                          answers[rel], answers[:rel] + answers[rel + 1:],
                          whys[rel], whys[:rel] + whys[rel + 1:]))
    return items


def _four_choices(correct: list, wrong: list[list], rng: np.random.Generator) -> tuple[list, int]:
    picked = [wrong[int(i)] for i in rng.choice(len(wrong), size=3, replace=False)]
    label = int(rng.integers(4))
    return picked[:label] + [correct] + picked[label:], label


def _untokenize(tokens: list, names: list[str]) -> str:
    """VCR's *_orig strings: object references become their class names."""
    return " ".join(" and ".join(names[i] for i in t) if isinstance(t, list) else t for t in tokens)


# --------------------------------------------------------------------------- referring expressions

REFCOCO_DIR = "refcoco"
REFCOCO_REFS = "refs(unc)"
_REFER_RELATIONS = ("left of", "right of", "above", "below")  # _RELATIONS' order
_DET_MISS = 0.1  # a simulated detector misses an object this often


def _matching(objects: list[ShapeObject], image_size: int, *, color: str | None = None,
              shape: str | None = None, size: str | None = None, position: str | None = None,
              rel: int | None = None, landmark: int | None = None) -> list[int]:
    """Indices of the objects an expression's constraints fit (rel: where the object is
    relative to objects[landmark], as `_relation` says, the landmark itself excluded)."""
    out = []
    for i, o in enumerate(objects):
        if (color and o.color != color) or (shape and o.shape != shape) or \
                (size and o.size != size) or (position and o.position != position):
            continue
        if rel is not None and (i == landmark or
                                _relation(o, objects[landmark], image_size) != rel):
            continue
        out.append(i)
    return out


def referring_expressions(objects: list[ShapeObject], target: int,
                          image_size: int) -> list[str]:
    """Every expression of a small grammar that picks out exactly objects[target] among the
    scene's objects: attributes ("the red circle", "the circle", "the large shape", "the
    shape on the left") and relations to another object ("the red circle left of the blue
    square", "the shape above the star"). "the <colour> <shape>" always qualifies (a scene's
    colour-shape pairs are distinct)."""
    o = objects[target]
    place = _PLACE[o.position]
    forms = [(f"the {o.color} {o.shape}", dict(color=o.color, shape=o.shape)),
             (f"the {o.shape}", dict(shape=o.shape)),
             (f"the {o.color} shape", dict(color=o.color)),
             (f"the {o.color} one", dict(color=o.color)),
             (f"the {o.size} {o.shape}", dict(size=o.size, shape=o.shape)),
             (f"the {o.size} shape", dict(size=o.size)),
             (f"the {o.shape} {place}", dict(shape=o.shape, position=o.position)),
             (f"the shape {place}", dict(position=o.position)),
             (f"the {o.color} shape {place}", dict(color=o.color, position=o.position))]
    for j, landmark in enumerate(objects):
        rel = _relation(o, landmark, image_size) if j != target else None
        if rel is None:
            continue
        names = [f"the {landmark.color} {landmark.shape}"]
        if len(_matching(objects, image_size, shape=landmark.shape)) == 1:
            names.append(f"the {landmark.shape}")
        for name in names:
            r = _REFER_RELATIONS[rel]
            forms += [(f"the {o.color} {o.shape} {r} {name}",
                       dict(color=o.color, shape=o.shape, rel=rel, landmark=j)),
                      (f"the {o.shape} {r} {name}", dict(shape=o.shape, rel=rel, landmark=j)),
                      (f"the shape {r} {name}", dict(rel=rel, landmark=j))]
    picks = [text for text, c in forms if _matching(objects, image_size, **c) == [target]]
    return list(dict.fromkeys(picks))


def _jitter(box: tuple[int, int, int, int], sigma: float, rng: np.random.Generator,
            image_size: int) -> tuple[int, int, int, int]:
    """`box` with each side moved by N(0, sigma x its length), kept inside the image and at
    least 2 pixels wide and high."""
    w, h = box[2] - box[0], box[3] - box[1]
    x1, y1, x2, y2 = (v + rng.normal(0.0, sigma) * s for v, s in zip(box, (w, h, w, h)))
    x1, y1 = (int(np.clip(round(v), 0, image_size - 2)) for v in (x1, y1))
    x2 = int(np.clip(round(x2), x1 + 2, image_size))
    y2 = int(np.clip(round(y2), y1 + 2, image_size))
    return x1, y1, x2, y2


def simulated_detections(objects: list[ShapeObject], rng: np.random.Generator,
                         image_size: int) -> list[tuple[tuple[int, int, int, int], float]]:
    """(box, score) of a pretend detector, best score first: each object found with
    probability 0.9 as a slightly jittered box (sides moved by 8% of its size), a second,
    looser box around it 30% of the time (25%, often IoU < 0.5), and 0-2 false positives
    anywhere; never empty."""
    dets = []
    for o in objects:
        if rng.random() >= _DET_MISS:
            dets.append((_jitter(o.box, 0.08, rng, image_size), 0.6 + 0.4 * float(rng.random())))
        if rng.random() < 0.3:
            dets.append((_jitter(o.box, 0.25, rng, image_size), 0.3 + 0.4 * float(rng.random())))
    for _ in range(int(rng.integers(0, 3)) if dets else 1):
        side = int(round(rng.uniform(0.15, 0.35) * image_size))
        x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
        dets.append(((x, y, x + side, y + side), 0.5 * float(rng.random())))
    return sorted(dets, key=lambda d: -d[1])


class _RefCOCOWriter:
    """The RefCOCO-style files of the benchmark scenes, in the refer toolkit's layout
    (vlp/data/refer.py reads them):

        refcoco/instances.json    images with refs, every object as a COCO annotation
                                  (bbox [x, y, w, h], category = shape, polygon segmentation)
        refcoco/refs(unc).p       one ref per object of a scene with 2-3 objects, 1-3
                                  sentences each (`referring_expressions`), pickled plain data
        refcoco/refs(unc).json    the same refs as JSON
        refcoco/dets/{image}.npz  `simulated_detections` of every benchmark image: boxes,
                                  scores and the same thumb8_meanstd features as the gt-box
                                  region files

    Splits follow the benchmark's (by image): train + restval -> train, val -> val; test
    images with 3 objects -> testA, with 2 -> testB (RefCOCO's testA / testB split people
    from other objects; here crowded scenes from pairs). Scenes with one object have nothing
    to tell apart and get no ref. Draws come from each scene's streams 3 (sentences) and 4
    (detections), so the other benchmark files do not change."""

    def __init__(self, folder: Path, seed: int, image_size: int):
        self.folder, self.seed, self.image_size = folder, seed, image_size
        self.images, self.annotations, self.refs = [], [], []
        self.sentences = 0

    def add(self, index: int, image_id: int, file_name: str, split: str, scene: Scene) -> None:
        objects = list(scene.objects)
        self._detections(index, image_id, scene)
        if len(objects) < 2:
            return
        if split in ("train", "restval"):
            split = "train"
        elif split == "test":
            split = "testA" if len(objects) == 3 else "testB"
        self.images.append({"id": image_id, "file_name": file_name, "width": self.image_size,
                            "height": self.image_size, "license": 1})
        rng = scene_rng(self.seed, "benchmark", index, stream=3)
        for k, o in enumerate(objects):
            x1, y1, x2, y2 = o.box
            ann_id = image_id * 10 + k
            polygon = [v for point in shape_polygon(o.shape, o.box) for v in point]
            self.annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": SHAPES.index(o.shape) + 1,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0,
                "segmentation": [polygon]})
            expressions = referring_expressions(objects, k, self.image_size)
            picked = rng.permutation(len(expressions))[:int(rng.integers(1, 4))]
            sentences = []
            for i in picked:
                text = expressions[int(i)]
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": self.sentences,
                                  "sent": text})
                self.sentences += 1
            self.refs.append({
                "sent_ids": [s["sent_id"] for s in sentences], "file_name":
                f"{image_id:012d}_{ann_id}.jpg", "ann_id": ann_id, "ref_id": len(self.refs),
                "image_id": image_id, "split": split, "sentences": sentences,
                "category_id": SHAPES.index(o.shape) + 1})

    def _detections(self, index: int, image_id: int, scene: Scene) -> None:
        rng = scene_rng(self.seed, "benchmark", index, stream=4)
        dets = simulated_detections(list(scene.objects), rng, self.image_size)
        image = Image.open(io.BytesIO(scene.jpeg))
        boxes = [b for b, _ in dets]
        _write(self.folder / "dets" / f"{image_id:012d}.npz", _npz_bytes({
            "features": extract_region_features(image, boxes),
            "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "scores": np.array([s for _, s in dets], np.float32),
            "image_w": np.array(self.image_size, np.int64),
            "image_h": np.array(self.image_size, np.int64),
        }))

    def write(self) -> dict[str, int]:
        """Write instances.json and the refs (pickle + JSON); return the refs per split."""
        categories = [{"id": i + 1, "name": s, "supercategory": "shape"}
                      for i, s in enumerate(SHAPES)]
        _write(self.folder / "instances.json", _dumps({
            "info": _INFO, "licenses": [_LICENSE], "images": self.images,
            "annotations": self.annotations, "categories": categories}))
        _write(self.folder / f"{REFCOCO_REFS}.p", dumps_refs(self.refs))
        _write(self.folder / f"{REFCOCO_REFS}.json", _dumps(self.refs))
        return dict(Counter(r["split"] for r in self.refs))


# --------------------------------------------------------------------------- writing


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _write(path: Path, data: bytes) -> None:
    """Write via a temporary name so an interrupted run never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _shard_pattern(split: str, n_shards: int) -> str | None:
    if n_shards == 0:
        return None
    if n_shards == 1:
        return f"{split}/00000.tar"
    return f"{split}/{{00000..{n_shards - 1:05d}}}.tar"


def _write_split(out: Path, split: str, n: int, seed: int, image_size: int, shard_size: int,
                 bar: tqdm, keep_images: bool = False) -> list[dict]:
    """Write `split` as img2dataset shards; return the retrieval records of its samples (with
    `keep_images`, also each sample's JPEG bytes and json objects, for the zero-shot sets)."""
    records = []
    digits = max(4, len(str(shard_size - 1)))  # img2dataset's 4-digit index, wider if needed
    for shard in range((n + shard_size - 1) // shard_size):
        buf = io.BytesIO()
        count = 0
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                scene = make_scene(seed, split, index, image_size)
                key = f"{shard:05d}{count:0{digits}d}"
                meta = {
                    "key": key, "caption": scene.captions[0],
                    "url": f"synth://shapes/{split}/{key}",
                    "status": "success", "error_message": None,
                    "width": image_size, "height": image_size,
                    "original_width": image_size, "original_height": image_size,
                    "exif": "{}", "sha256": hashlib.sha256(scene.jpeg).hexdigest(),
                    "captions": list(scene.captions),
                    "objects": [o.to_json() for o in scene.objects],
                }
                _tar_add(tar, f"{key}.jpg", scene.jpeg)
                _tar_add(tar, f"{key}.json", _dumps(meta))
                _tar_add(tar, f"{key}.txt", scene.captions[0].encode())
                _tar_add(tar, f"{key}.regions.npz", scene_regions_npz(scene))
                records.append({"key": key, "shard": f"{split}/{shard:05d}.tar",
                                "captions": scene.captions})
                if keep_images:
                    records[-1].update(jpeg=scene.jpeg, objects=meta["objects"])
                count += 1
                bar.update()
        _write(out / split / f"{shard:05d}.tar", buf.getvalue())
        stats = {"count": count, "successes": count, "failed_to_download": 0,
                 "failed_to_resize": 0, "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
                 "status_dict": {"success": count}}
        _write(out / split / f"{shard:05d}_stats.json", _dumps(stats))
    return records


def _write_zeroshot(out: Path, val: list[dict]) -> dict[str, dict]:
    """The val shards' single-object images as zero-shot classification sets of their shape
    and colour, in CLIP_benchmark's webdataset layout (clip_benchmark/webdataset_builder.py):

        zeroshot/<attribute>/classnames.txt                          one class name a line
        zeroshot/<attribute>/zeroshot_classification_templates.txt  one template a line, {c}
        zeroshot/<attribute>/test/nshards.txt                        "1"
        zeroshot/<attribute>/test/0.tar                              {key}.jpg + {key}.cls

    `.cls` is the class index into classnames.txt, as text. The classes are the labels present,
    sorted, and the images those with one object: exactly what `evaluate_retrieval` scores as
    `zeroshot_<attribute>_top1` on the val shards, so both give the same number."""
    sets = {}
    for attribute, templates in ZEROSHOT_TEMPLATES.items():
        samples = [(r["key"], r["jpeg"], r["objects"][0][attribute]) for r in val
                   if len(r["objects"]) == 1]
        if not samples:
            continue
        classes = sorted({label for _, _, label in samples})
        root = out / "zeroshot" / attribute
        _write(root / "classnames.txt", "".join(f"{c}\n" for c in classes).encode())
        _write(root / "zeroshot_classification_templates.txt",
               "".join(f"{t}\n" for t in templates).encode())
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, label in samples:
                _tar_add(tar, f"{key}.jpg", jpeg)
                _tar_add(tar, f"{key}.cls", str(classes.index(label)).encode())
        _write(root / ZEROSHOT_SPLIT / "0.tar", buf.getvalue())
        _write(root / ZEROSHOT_SPLIT / "nshards.txt", b"1\n")
        sets[attribute] = {"path": f"zeroshot/{attribute}", "split": ZEROSHOT_SPLIT,
                           "images": len(samples), "classes": len(classes)}
    return sets


def _coco_captions(images: list[dict], captions: list[tuple[str, ...]]) -> dict:
    annotations = [{"id": img["id"] * 10 + k, "image_id": img["id"], "caption": c}
                   for img, caps in zip(images, captions) for k, c in enumerate(caps)]
    return {"info": _INFO, "licenses": [_LICENSE], "images": images, "annotations": annotations}


_INFO = {"description": "vlp shapes world (synthetic)", "version": str(VERSION),
         "contributor": "vlp.data.synth", "url": "", "year": 0, "date_created": ""}
_LICENSE = {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def _write_benchmarks(out: Path, n: int, seed: int, image_size: int, bar: tqdm,
                      refcoco: "_RefCOCOWriter") -> dict:
    """Render `n` benchmark scenes and write VQA, COCO captions, Karpathy, VCR files (and hand
    each scene to `refcoco`); return the number of images per Karpathy split."""
    bench = out / "benchmarks"
    bounds, acc = [], 0.0
    for name, frac in BENCHMARK_SPLITS:
        acc += frac
        bounds.append((name, round(acc * n)))

    coco = {"train2014": ([], []), "val2014": ([], [])}  # (images, captions)
    vqa = {"train2014": ([], []), "val2014": ([], [])}  # (questions, annotations)
    vcr = {"train2014": [], "val2014": []}
    karpathy, sentid, split_counts = [], 0, Counter()
    for index in range(n):
        scene = make_scene(seed, "benchmark", index, image_size)
        image_id = index + 1  # COCO ids start at 1
        split = next(name for name, end in bounds if index < end)
        subset = "train2014" if split == "train" else "val2014"
        split_counts[split] += 1
        file_name = f"{image_id:012d}.jpg"
        _write(bench / "images" / file_name, scene.jpeg)
        # the same region features the shards carry, one file per image (BUTD's layout of
        # per-image feature files); VCR's objects are these regions in the same order
        _write(bench / "regions" / f"{image_id:012d}.npz", scene_regions_npz(scene))

        image = {"id": image_id, "file_name": file_name, "width": image_size,
                 "height": image_size, "license": 1}
        coco[subset][0].append(image)
        coco[subset][1].append(scene.captions)
        sentences = []
        for caption in scene.captions:
            sentences.append({"tokens": re.findall(r"[a-z0-9]+", caption), "raw": caption,
                              "imgid": index, "sentid": sentid})
            sentid += 1
        karpathy.append({"filepath": "images", "filename": file_name, "imgid": index,
                         "cocoid": image_id, "split": split,
                         "sentids": [s["sentid"] for s in sentences], "sentences": sentences})

        objects = list(scene.objects)
        rng = scene_rng(seed, "benchmark", index, stream=1)
        candidates = _vqa_candidates(objects, rng, image_size)
        for j, c in enumerate(rng.permutation(len(candidates))[:5]):
            question, answer, question_type, answer_type = candidates[int(c)]
            question_id = image_id * 1000 + j
            vqa[subset][0].append({"image_id": image_id, "question": question,
                                   "question_id": question_id})
            vqa[subset][1].append({
                "question_id": question_id, "image_id": image_id, "question_type": question_type,
                "answer_type": answer_type, "multiple_choice_answer": answer,
                "answers": _vqa_answers(answer, answer_type, rng)})

        rng = scene_rng(seed, "benchmark", index, stream=2)
        names = [o.shape for o in objects]
        img_fn = f"shapes/{image_id:012d}.jpg"
        metadata = {"boxes": [[*o.box, 1.0] for o in objects],
                    "segms": [[[list(p) for p in shape_polygon(o.shape, o.box)]] for o in objects],
                    "names": names, "width": image_size, "height": image_size}
        _write(bench / "vcr" / "images" / img_fn, scene.jpeg)
        refcoco.add(index, image_id, file_name, split, scene)
        _write(bench / "vcr" / "images" / img_fn.replace(".jpg", ".json"), _dumps(metadata))
        candidates = _vcr_candidates(objects, image_size)
        vcr_split = "train" if subset == "train2014" else "val"
        for q, c in enumerate(rng.permutation(len(candidates))[:3]):
            question, answer, wrong, why, wrong_why = candidates[int(c)]
            answers, answer_label = _four_choices(answer, wrong, rng)
            rationales, rationale_label = _four_choices(why, wrong_why, rng)
            annot = len(vcr[subset])
            vcr[subset].append({
                "movie": "shapes", "objects": names, "img_fn": img_fn,
                "metadata_fn": img_fn.replace(".jpg", ".json"),
                "img_id": f"{vcr_split}-{index}", "annot_id": f"{vcr_split}-{annot}",
                "question_number": q, "question": question,
                "answer_choices": answers, "answer_label": answer_label,
                "rationale_choices": rationales, "rationale_label": rationale_label,
                "question_orig": _untokenize(question, names),
                "answer_orig": _untokenize(answer, names),
                "rationale_orig": _untokenize(why, names),
                "answer_likelihood": "likely", "match_fold": f"{vcr_split}-{annot % 2}",
            })
        bar.update()

    for subset, short in (("train2014", "train"), ("val2014", "val")):
        _write(bench / "coco" / f"captions_{short}.json", _dumps(_coco_captions(*coco[subset])))
        header = {"info": _INFO, "license": _LICENSE, "data_type": "mscoco", "data_subtype": subset}
        _write(bench / "vqa" / f"v2_OpenEnded_mscoco_{short}_questions.json",
               _dumps({**header, "task_type": "Open-Ended", "questions": vqa[subset][0]}))
        _write(bench / "vqa" / f"v2_mscoco_{short}_annotations.json",
               _dumps({**header, "annotations": vqa[subset][1]}))
        lines = [json.dumps(item, sort_keys=True) + "\n" for item in vcr[subset]]
        _write(bench / "vcr" / f"{short}.jsonl", "".join(lines).encode())
    _write(bench / "coco" / "dataset_coco.json", _dumps({"dataset": "coco", "images": karpathy}))
    return {name: split_counts[name] for name, _ in BENCHMARK_SPLITS}


def generate(out_dir: str | os.PathLike, *, images: int = 20000, val_images: int = 1000,
             seed: int = 0, image_size: int = 64, shard_size: int | None = None,
             benchmark_images: int = 2000, progress: bool = True) -> dict:
    """Write the shapes world under `out_dir` and return its manifest.

    MANIFEST.json is written last, so its presence marks a complete corpus.
    """
    for name, value in (("images", images), ("val_images", val_images),
                        ("benchmark_images", benchmark_images), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if shard_size is None:
        # img2dataset's 1,000 per shard, but at least 16 training shards for small corpora, so
        # that ranks x loader workers always have a shard each.
        shard_size = max(1, min(1000, -(-images // 16)))
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small to draw shapes; use >= 32")

    out = Path(out_dir)
    total = images + val_images + benchmark_images
    with tqdm(total=total, desc="shapes world", unit="img", disable=not progress) as bar:
        _write_split(out, "train", images, seed, image_size, shard_size, bar)
        val = _write_split(out, "val", val_images, seed, image_size, shard_size, bar,
                           keep_images=True)
        refcoco = _RefCOCOWriter(out / "benchmarks" / REFCOCO_DIR, seed, image_size)
        bench_splits = _write_benchmarks(out, benchmark_images, seed, image_size, bar, refcoco)
        refcoco_refs = refcoco.write()

    # The retrieval test set is the held-out val shards; images are named by their shard key.
    images_ = [{"id": i, "file_name": r["key"], "shard": r["shard"], "width": image_size,
                "height": image_size, "license": 1} for i, r in enumerate(val)]
    retrieval = _coco_captions(images_, [r["captions"] for r in val])
    _write(out / "benchmarks" / "retrieval" / "test.json", _dumps(retrieval))
    zeroshot = _write_zeroshot(out, val)

    n_shards = {s: (n + shard_size - 1) // shard_size
                for s, n in (("train", images), ("val", val_images))}
    manifest = {
        "name": "shapes-world", "version": VERSION, "seed": seed, "image_size": image_size,
        "counts": {"train": images, "val": val_images, "benchmark": benchmark_images},
        "shard_size": shard_size,
        "shards": {s: {"pattern": _shard_pattern(s, k), "count": k} for s, k in n_shards.items()},
        "captions_per_image": 5,
        # Region features in every train/val sample ({key}.regions.npz); their labels index
        # "labels" (shapes). "object_labels": the json objects' `label` values, for roi_align.
        "regions": {"extractor": REGION_EXTRACTOR, "dim": REGION_DIM,
                    "labels": region_label_names(), "object_labels": object_label_names(),
                    "member": "regions.npz", "splits": ["train", "val"]},
        "vocab": {"colors": {c: list(rgb) for c, rgb in COLORS.items()}, "shapes": list(SHAPES),
                  "sizes": list(SIZES), "positions": list(POSITIONS)},
        "benchmarks": {
            "images": "benchmarks/images",
            "regions": "benchmarks/regions",
            "splits": bench_splits,
            "vqa": {s: {"questions": f"benchmarks/vqa/v2_OpenEnded_mscoco_{s}_questions.json",
                        "annotations": f"benchmarks/vqa/v2_mscoco_{s}_annotations.json"}
                    for s in ("train", "val")},
            "coco": {"train": "benchmarks/coco/captions_train.json",
                     "val": "benchmarks/coco/captions_val.json",
                     "karpathy": "benchmarks/coco/dataset_coco.json"},
            "vcr": {"train": "benchmarks/vcr/train.jsonl", "val": "benchmarks/vcr/val.jsonl",
                    "images": "benchmarks/vcr/images"},
            "retrieval": {"test": "benchmarks/retrieval/test.json"},
            # the refer toolkit's layout (RefCOCO, splitBy unc); images and gt-box regions
            # are the benchmark's own; dets: per-image detected boxes with their features
            "refcoco": {"instances": f"benchmarks/{REFCOCO_DIR}/instances.json",
                        "refs": f"benchmarks/{REFCOCO_DIR}/{REFCOCO_REFS}.p",
                        "refs_json": f"benchmarks/{REFCOCO_DIR}/{REFCOCO_REFS}.json",
                        "dets": f"benchmarks/{REFCOCO_DIR}/dets",
                        "refs_per_split": refcoco_refs},
        },
        # zero-shot classification sets (CLIP_benchmark's webdataset layout): `vlp eval zeroshot`
        "zeroshot": zeroshot,
    }
    _write(out / "MANIFEST.json", json.dumps(manifest, sort_keys=True, indent=2).encode() + b"\n")
    return manifest
