"""The refer toolkit's files (RefCOCO, RefCOCO+, RefCOCOg; github.com/lichengunc/refer, its
`refer.py` `REFER` class) -> referring-expression records, with pickles read safely.

    DATA_ROOT/<dataset>/instances.json    COCO style: images [{id, file_name, width, height}],
                                          annotations [{id, image_id, bbox [x, y, w, h] in
                                          pixels, category_id, ...}], categories [{id, name}]
    DATA_ROOT/<dataset>/refs(<splitBy>).p a pickled list of refs (Python 2, protocol 2):
        {ref_id, ann_id, image_id, category_id, split ("train", "val", "testA", "testB",
         "test"), file_name, sent_ids, sentences: [{sent_id, sent, raw, tokens}]}

The same list of refs as JSON (`refs(unc).json`: what `vlp data synth` writes beside its
pickle, and what a converted copy of a real one holds) reads the same way: a path ending in
`.json` is read as JSON, anything else as a pickle.

**Pickles are untrusted input.** `pickle.load` runs whatever callable a file names (a
`__reduce__` that returns `os.system` runs a shell command). `load_pickle` reads with an
unpickler that resolves no global at all except `set` / `frozenset` (how protocols 0-3 write
sets), and no persistent ids: a file whose opcodes ask for anything else is refused with one
line naming what it asked for, before that object is built, so nothing it names runs. What
it can build is plain containers (dict, list, tuple, set), strings, numbers, booleans and
None. Python 2 `str` values are decoded as UTF-8 (bad bytes replaced).
"""
from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np

# the globals a refs pickle may name: the builtin set types (protocols 0-3 pickle a set as
# `set(list)`); everything else (os.system, posix.system, builtins.eval, ...) is refused
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
                 ("__builtin__", "frozenset")}
REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences")
SENTENCE_FIELDS = ("sent_id", "sent")


class UnsafePickleError(ValueError):
    """A pickle that asks for something other than plain containers and numbers."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return set if name == "set" else frozenset
        raise UnsafePickleError(f"it asks for {module}.{name}; only plain containers "
                                "(dict, list, tuple, set), strings and numbers are allowed")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"it holds a persistent id {pid!r:.80}; only plain containers "
                                "(dict, list, tuple, set), strings and numbers are allowed")


def loads_plain(data: bytes):
    """Unpickle bytes that may hold only plain containers, strings and numbers; anything else
    raises UnsafePickleError (without building it)."""
    return _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()


def load_pickle(path: str | Path, what: str = "pickle"):
    """A pickle file of plain data (see the module docstring); a refused or broken file is a
    ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return loads_plain(path.read_bytes())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{what}: {path} refused: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            KeyError, AttributeError, MemoryError, OverflowError) as e:
        raise ValueError(f"{what}: {path} is not a readable pickle ({type(e).__name__}: "
                         f"{e})") from None


def dumps_refs(refs: list[dict]) -> bytes:
    """refs as the toolkit's files hold them: a pickle of plain data, protocol 2 (the newest
    Python 2 reads)."""
    return pickle.dumps(refs, protocol=2)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def _require(record, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {list(fields)}, got "
                         f"{type(record).__name__}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(record)}")


def load_refs(path: str | Path) -> list[dict]:
    """The refs of `refs(<splitBy>).p` (safe unpickling) or of a .json copy, checked for the
    fields a referring-expression task reads."""
    path = Path(path)
    what = "refer toolkit refs"
    refs = _read_json(path, what) if path.suffix == ".json" else load_pickle(path, what)
    if not isinstance(refs, list):
        raise ValueError(f"{what}: {path} holds a {type(refs).__name__}, expected a list of "
                         "refs")
    for n, ref in enumerate(refs):
        where = f"{path}: ref {n}"
        _require(ref, REF_FIELDS, where)
        if not isinstance(ref["sentences"], list) or not ref["sentences"]:
            raise ValueError(f"{where} (ref_id {ref['ref_id']}): sentences must be a non-empty "
                             "list")
        for sent in ref["sentences"]:
            _require(sent, SENTENCE_FIELDS, f"{where} (ref_id {ref['ref_id']}): a sentence")
    return refs


def _box(value, where: str) -> list[float]:
    """A COCO [x, y, w, h] box of finite numbers with w, h >= 0."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            for v in value):
        raise ValueError(f"{where}: bbox must be [x, y, w, h] (4 finite numbers), got "
                         f"{value!r:.120}")
    if value[2] < 0 or value[3] < 0:
        raise ValueError(f"{where}: bbox {list(value)} has a negative width or height (COCO "
                         "boxes are [x, y, w, h])")
    return [float(v) for v in value]


def load_instances(path: str | Path) -> dict:
    """instances.json -> {"images": {id: image}, "annotations": {id: ann}, "image_anns":
    {image id: [ann, ...] in file order}, "categories": {id: name}}, checked."""
    path = Path(path)
    raw = _read_json(path, "refer toolkit instances")
    _require(raw, ("images", "annotations"), f"{path}")
    images = {}
    for img in raw["images"]:
        _require(img, ("id", "file_name", "width", "height"), f"{path}: an image")
        images[img["id"]] = img
    anns, image_anns = {}, {}
    for ann in raw["annotations"]:
        where = f"{path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r:.40}"
        _require(ann, ("id", "image_id", "bbox"), where)
        ann = {**ann, "bbox": _box(ann["bbox"], where)}
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: image_id {ann['image_id']} is not in the file's images")
        anns[ann["id"]] = ann
        image_anns.setdefault(ann["image_id"], []).append(ann)
    categories = {c["id"]: c.get("name", str(c["id"])) for c in raw.get("categories", [])
                  if isinstance(c, dict) and "id" in c}
    return {"images": images, "annotations": anns, "image_anns": image_anns,
            "categories": categories}


def split_matches(ref_split: str, split: str) -> bool:
    """Whether a ref of `ref_split` belongs to `split`, as REFER.getRefIds selects: testA /
    testB / testC take every ref whose split holds that letter (testAB too), "test" every
    split holding "test", anything else only itself."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


class Refer:
    """Refs joined to their annotations and images: one record per sentence."""

    def __init__(self, refs: list[dict], instances: dict, where: str = "refs"):
        self.refs, self.instances = refs, instances
        for ref in refs:
            if ref["ann_id"] not in instances["annotations"]:
                raise ValueError(f"{where}: ref_id {ref['ref_id']} names ann_id "
                                 f"{ref['ann_id']}, which the instances file does not hold")
            if ref["image_id"] not in instances["images"]:
                raise ValueError(f"{where}: ref_id {ref['ref_id']} names image_id "
                                 f"{ref['image_id']}, which the instances file does not hold")

    @classmethod
    def from_files(cls, refs_path: str | Path, instances_path: str | Path) -> "Refer":
        return cls(load_refs(refs_path), load_instances(instances_path), str(refs_path))

    def splits(self) -> list[str]:
        """The refs' split names, in order of first appearance."""
        return list(dict.fromkeys(r["split"] for r in self.refs))

    def sentences(self, split: str) -> list[dict]:
        """{sent_id, ref_id, ann_id, image_id, file_name, width, height, sent, box} for every
        sentence of the refs in `split` (refs order, then sentence order); `box` is the
        referred annotation's [x, y, w, h]."""
        out = []
        for ref in self.refs:
            if not split_matches(ref["split"], split):
                continue
            image = self.instances["images"][ref["image_id"]]
            box = self.instances["annotations"][ref["ann_id"]]["bbox"]
            for sent in ref["sentences"]:
                out.append({"sent_id": sent["sent_id"], "ref_id": ref["ref_id"],
                            "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                            "file_name": image["file_name"], "width": image["width"],
                            "height": image["height"], "sent": sent["sent"], "box": box})
        return out

    def image_boxes(self, image_id) -> list[list[float]]:
        """The [x, y, w, h] of every annotation of an image (the ground-truth candidates)."""
        return [a["bbox"] for a in self.instances["image_anns"].get(image_id, [])]


def read_boxes_file(path: str | Path) -> list[list[float]]:
    """The detected boxes of one image: the `boxes` (or bottom-up-attention `bbox`) array of
    its region file ([N, 4] x1, y1, x2, y2 pixels; features, scores and the rest are not
    needed for patch backbones, which pool the boxes themselves). Raises ValueError."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            names = list(npz.files)
            key = "boxes" if "boxes" in names else "bbox" if "bbox" in names else None
            boxes = np.asarray(npz[key]) if key else None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and OSError all surface here
        raise ValueError(f"unreadable npz ({type(e).__name__}: {e})") from None
    if boxes is None:
        raise ValueError(f"no 'boxes' (or 'bbox') array; found {sorted(names)}")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
        raise ValueError(f"boxes must be [N, 4] numbers, got {boxes.dtype} {boxes.shape}")
    boxes = boxes.astype(np.float64)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes hold NaN or inf")
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("a box has x2 < x1 or y2 < y1 (boxes must be x1, y1, x2, y2)")
    return boxes.tolist()
