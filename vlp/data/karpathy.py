"""Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`): the one reader, for
captioning, retrieval and the caption metric's references.

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg", "cocoid": 391895,
                 "imgid": 0, "split": "test" | "val" | "train" | "restval",
                 "sentences": [{"raw": "A man ...", "tokens": [...], "sentid": 770337}, ...]}]}

Flickr30k's file has no `filepath` and no `cocoid` (its id is `imgid`). A sentence without
`raw` is its `tokens` joined by spaces; a sentence without `sentid` is numbered by its place in
the file.
"""
from __future__ import annotations

from pathlib import Path

from vlp.data.jsonfiles import read_json


def read_karpathy(source: str | Path | dict) -> list[dict]:
    """A Karpathy split file (or its parsed JSON) -> one dict per image, in file order:
    {"image_id" (cocoid, else imgid), "split", "filepath", "filename", "file" (filepath/
    filename), "captions": [(sentence id, raw caption), ...]}. A malformed file raises
    ValueError naming the file, the image and the field."""
    name = "the Karpathy split" if isinstance(source, dict) else str(source)
    data = source if isinstance(source, dict) else read_json(source, "Karpathy split")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{name}: expected a JSON object with an \"images\" list (Karpathy's "
                         "dataset_coco.json / dataset_flickr30k.json)")
    records, n_sentences = [], 0
    for i, img in enumerate(data["images"]):
        where = f"{name}: images[{i}]"
        if not isinstance(img, dict):
            raise ValueError(f"{where}: expected an object, got {type(img).__name__}")
        missing = [f for f in ("filename", "split", "sentences") if f not in img]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; it has {sorted(img)}")
        if "cocoid" in img:
            image_id = img["cocoid"]
        elif "imgid" in img:
            image_id = img["imgid"]
        else:
            raise ValueError(f"{where}: no image id (cocoid for COCO, imgid for Flickr30k)")
        if not isinstance(img["sentences"], list):
            raise ValueError(f"{where}.sentences: expected a list")
        captions = []
        for j, sentence in enumerate(img["sentences"]):
            if not isinstance(sentence, dict):
                raise ValueError(f"{where}.sentences[{j}]: expected an object")
            if "raw" in sentence:  # the untokenised caption: what the metric scores against
                text = sentence["raw"]
            elif isinstance(sentence.get("tokens"), list):
                text = " ".join(sentence["tokens"])
            else:
                raise ValueError(f"{where}.sentences[{j}]: no caption (raw or tokens)")
            captions.append((sentence.get("sentid", n_sentences), text))
            n_sentences += 1
        filepath = img.get("filepath", "")
        records.append({"image_id": image_id, "split": img["split"], "filepath": filepath,
                        "filename": img["filename"],
                        "file": str(Path(filepath) / img["filename"]), "captions": captions})
    return records

