"""The shapes world generator: determinism, img2dataset shard layout, benchmark formats."""

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.data.synth import COLORS, POSITIONS, SHAPES, SIZES, generate, make_scene

TINY = dict(images=40, val_images=20, shard_size=16, benchmark_images=20, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, seed=0, **TINY)
    return out


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    generate(again, seed=0, **TINY)
    generate(other, seed=1, **TINY)
    ref = _digests(world)
    assert ref == _digests(again)
    assert not any(name.endswith(".tmp") for name in ref)
    changed = _digests(other)
    assert changed.keys() == ref.keys()
    assert all(changed[k] != ref[k] for k in ref if k.endswith((".tar", ".jpg")))


def test_scenes_do_not_depend_on_corpus_size():
    assert make_scene(0, "train", 7) == make_scene(0, "train", 7)
    assert make_scene(0, "train", 7) != make_scene(0, "val", 7)


def test_manifest(world):
    manifest = json.loads((world / "MANIFEST.json").read_text())
    assert manifest["seed"] == 0 and manifest["counts"] == {"train": 40, "val": 20, "benchmark": 20}
    assert manifest["shards"]["train"] == {"pattern": "train/{00000..00002}.tar", "count": 3}
    assert manifest["shards"]["val"] == {"pattern": "val/{00000..00001}.tar", "count": 2}
    assert manifest["vocab"]["shapes"] == list(SHAPES) and len(manifest["vocab"]["colors"]) == 8
    assert manifest["regions"] == {
        "extractor": "thumb8_meanstd", "dim": 198, "labels": list(SHAPES),
        "object_labels": [f"{c} {s}" for c in COLORS for s in SHAPES], "member": "regions.npz",
        "splits": ["train", "val"]}


@pytest.mark.parametrize("split,n", [("train", 40), ("val", 20)])
def test_shards_read_with_tarfile(world, split, n):
    shards = sorted((world / split).glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:05d}.tar" for i in range(len(shards))]
    total = 0
    for shard_id, path in enumerate(shards):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        samples = _samples(path)
        stats = json.loads(path.with_name(path.stem + "_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(samples)
        assert stats["status_dict"] == {"success": len(samples)}
        for index, (key, files) in enumerate(sorted(samples.items())):
            assert key == f"{shard_id:05d}{index:04d}"
            assert set(files) == {"jpg", "json", "txt", "regions.npz"}  # regions: format v2
            meta = json.loads(files["json"])
            for field in ("key", "caption", "url", "status", "error_message", "width", "height",
                          "original_width", "original_height", "exif", "sha256"):
                assert field in meta, field
            assert meta["key"] == key and meta["status"] == "success"
            assert meta["sha256"] == hashlib.sha256(files["jpg"]).hexdigest()
            image = Image.open(io.BytesIO(files["jpg"]))
            assert image.size == (meta["width"], meta["height"]) == (64, 64) and image.mode == "RGB"
            captions = meta["captions"]
            assert len(captions) == len(set(captions)) == 5
            assert files["txt"].decode() == meta["caption"] == captions[0]
            assert 1 <= len(meta["objects"]) <= 3
            for o in meta["objects"]:
                x1, y1, x2, y2 = o["box"]
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
                assert o["color"] in COLORS and o["shape"] in SHAPES and o["size"] in SIZES
                assert o["position"] in POSITIONS and o["label"] == f"{o['color']} {o['shape']}"
                # The first caption names every object's colour and shape.
                assert f"{o['color']} {o['shape']}" in captions[0]
        total += len(samples)
    assert total == n


def test_shards_read_with_webdataset(world):
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted((world / "train").glob("*.tar"))]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert {"jpg", "json", "txt"} <= set(sample)
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == 40


def test_drawn_colour_matches_json(world):
    palette = np.array(list(COLORS.values()), float)
    checked = 0
    for path in sorted((world / "train").glob("*.tar")):
        for files in _samples(path).values():
            image = np.asarray(Image.open(io.BytesIO(files["jpg"])), float)
            for o in json.loads(files["json"])["objects"]:
                x1, y1, x2, y2 = o["box"]
                cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
                mean = image[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
                assert np.abs(mean - COLORS[o["color"]]).max() < 40, (o, mean)
                nearest = list(COLORS)[int(np.linalg.norm(palette - mean, axis=1).argmin())]
                assert nearest == o["color"]
                checked += 1
    assert checked >= 40


def test_vqa_files(world):
    vqa = world / "benchmarks" / "vqa"
    n_questions = 0
    for split, subtype in (("train", "train2014"), ("val", "val2014")):
        questions = json.loads((vqa / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())
        annotations = json.loads((vqa / f"v2_mscoco_{split}_annotations.json").read_text())
        assert questions["task_type"] == "Open-Ended" and questions["data_type"] == "mscoco"
        assert questions["data_subtype"] == annotations["data_subtype"] == subtype
        assert {"info", "license"} <= set(questions) and {"info", "license"} <= set(annotations)
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        assert sorted(by_id) == sorted(q["question_id"] for q in questions["questions"])
        for q in questions["questions"]:
            a = by_id[q["question_id"]]
            assert a["image_id"] == q["image_id"] and q["question_id"] // 1000 == q["image_id"]
            assert (world / "benchmarks" / "images" / f"{q['image_id']:012d}.jpg").is_file()
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
            # The official accuracy credits the multiple-choice answer fully (>= 3 matches).
            assert sum(x["answer"] == a["multiple_choice_answer"] for x in a["answers"]) >= 6
        n_questions += len(questions["questions"])
    assert n_questions >= 20


def test_coco_and_karpathy(world):
    coco = world / "benchmarks" / "coco"
    ids = set()
    for split in ("train", "val"):
        data = json.loads((coco / f"captions_{split}.json").read_text())
        assert {"info", "licenses", "images", "annotations"} <= set(data)
        image_ids = {img["id"] for img in data["images"]}
        assert Counter(a["image_id"] for a in data["annotations"]) == {i: 5 for i in image_ids}
        ids |= image_ids
    karpathy = json.loads((coco / "dataset_coco.json").read_text())
    assert karpathy["dataset"] == "coco"
    assert {img["cocoid"] for img in karpathy["images"]} == ids and len(ids) == 20
    assert {img["split"] for img in karpathy["images"]} <= {"train", "val", "test", "restval"}
    assert {"train", "val", "test"} <= {img["split"] for img in karpathy["images"]}
    sentids = [s["sentid"] for img in karpathy["images"] for s in img["sentences"]]
    assert len(sentids) == len(set(sentids)) == 100
    for img in karpathy["images"]:
        assert (world / "benchmarks" / img["filepath"] / img["filename"]).is_file()
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        assert all(s["tokens"] and s["imgid"] == img["imgid"] for s in img["sentences"])


def test_vcr_files(world):
    vcr = world / "benchmarks" / "vcr"
    lines = 0
    for split in ("train", "val"):
        for line in (vcr / f"{split}.jsonl").read_text().splitlines():
            item = json.loads(line)
            lines += 1
            meta = json.loads((vcr / "images" / item["metadata_fn"]).read_text())
            assert (vcr / "images" / item["img_fn"]).is_file()
            assert meta["names"] == item["objects"] and len(meta["boxes"]) == len(item["objects"])
            assert all(len(b) == 5 for b in meta["boxes"]) and meta["width"] == 64
            assert item["annot_id"].startswith(split) and item["img_id"].startswith(split)
            assert 0 <= item["answer_label"] <= 3 and 0 <= item["rationale_label"] <= 3
            assert len(item["answer_choices"]) == len(item["rationale_choices"]) == 4
            token_lists = [item["question"], *item["answer_choices"], *item["rationale_choices"]]
            assert any(isinstance(t, list) for t in item["question"])
            for tokens in token_lists:
                for t in tokens:
                    if isinstance(t, list):
                        assert all(0 <= i < len(item["objects"]) for i in t)
                    else:
                        assert isinstance(t, str)
    assert lines >= 20


def test_retrieval_split_is_the_val_shards(world):
    data = json.loads((world / "benchmarks" / "retrieval" / "test.json").read_text())
    keys = {k for p in (world / "val").glob("*.tar") for k in _samples(p)}
    assert {img["file_name"] for img in data["images"]} == keys
    assert len(data["annotations"]) == 5 * len(keys) == 100
    assert len({a["id"] for a in data["annotations"]}) == 100


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, image_size=8, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        generate(tmp_path, shard_size=0, progress=False)
