"""vlp.data with region inputs: regions.npz parsing and validation (vlp/data/regions.py), the
loader's visual="regions" and "roi_align" modes, ImageTransform.map_boxes, and the shapes
world's region features. All on real tar shards."""
import io
import itertools
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from test_data import drain, good, image_bytes, keys_of, tok, write_tar  # noqa: F401
from test_synth import _samples
from vlp.config import ConfigError
from vlp.data import (ImageTransform, RegionError, SkipCounter, StreamPosition,
                      has_region_files, iter_captions, iter_eval_samples, make_loader,
                      read_regions, region_feature_dim)
from vlp.data.synth import SHAPES, generate, object_label_names, region_label_names
from vlp.tokenizer import train_tokenizer

SIZE, L = 16, 16


# --------------------------------------------------------------------------- helpers
def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def sample(key: str, i: int, regions: bytes | None = None, *, image: bytes | None = b"",
           objects=None, size=(32, 32)) -> list[tuple[str, bytes]]:
    """A sample's members: image (default a random JPEG of `size`; None: no image), txt, json
    (with `objects` when given), regions.npz when given."""
    if image == b"":
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
        image = buf.getvalue()
    meta = {"key": key, "caption": f"a red circle {i}"}
    if objects is not None:
        meta["objects"] = objects
    members = [] if image is None else [(f"{key}.jpg", image)]
    members += [(f"{key}.txt", meta["caption"].encode()),
                (f"{key}.json", json.dumps(meta).encode())]
    if regions is not None:
        members.append((f"{key}.regions.npz", regions))
    return members


def loader(urls, tok, **kw):  # noqa: F811
    args = dict(tokenizer=tok, transform=ImageTransform(SIZE), batch_size=4, context_length=L,
                num_workers=0, shuffle_buffer=0, seed=0, drop_last=False)
    args.update(kw)
    return make_loader(urls, **args)


def by_key(batches) -> dict[str, dict]:
    """key -> that sample's real (unpadded) regions as numpy."""
    out = {}
    for b in batches:
        for i, key in enumerate(b.keys):
            m = b.region_mask[i]
            out[key] = {"boxes": b.region_boxes[i][m].numpy(),
                        "labels": b.region_labels[i][m].numpy(),
                        "features": None if b.region_features is None
                        else b.region_features[i][m].numpy()}
    return out


def thumb8_meanstd(image: Image.Image, box) -> np.ndarray:
    """The shapes world's documented extractor, written again from its description."""
    crop = image.crop(tuple(box))
    thumb = np.asarray(crop.resize((8, 8), Image.Resampling.BILINEAR), np.float64) / 255
    pixels = np.asarray(crop, np.float64).reshape(-1, 3) / 255
    return np.concatenate([thumb.reshape(-1), pixels.mean(0), pixels.std(0)])


# --------------------------------------------------------------------------- the shapes world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, images=24, val_images=4, benchmark_images=0, shard_size=6, progress=False)
    return out


@pytest.fixture(scope="module")
def wtok(world):
    return train_tokenizer(iter_captions(str(world / "train")), vocab_size=120)


def test_shapes_world_region_features(world, wtok):
    manifest = json.loads((world / "MANIFEST.json").read_text())
    assert manifest["regions"]["labels"] == region_label_names() == list(SHAPES)
    assert manifest["regions"]["dim"] == 198
    assert has_region_files(str(world / "train")) and has_region_files(str(world / "val"))
    assert region_feature_dim(str(world / "train")) == 198
    raw = {k: v for p in sorted((world / "train").glob("*.tar")) for k, v in _samples(p).items()}

    batches, skipped = drain(loader(str(world / "train"), wtok, visual="regions", batch_size=5,
                                    region_labels=region_label_names()))
    assert skipped == {} and sorted(keys_of(batches)) == sorted(raw)
    for b in batches:
        n = [len(json.loads(raw[k]["json"])["objects"]) for k in b.keys]
        R = max(n)
        assert b.pixel_values.shape == (len(b), 0)
        assert b.region_features.shape == (len(b), R, 198)
        assert b.region_features.dtype == b.region_boxes.dtype == torch.float32
        assert b.region_boxes.shape == (len(b), R, 4)
        assert b.region_labels.shape == b.region_mask.shape == (len(b), R)
        assert b.region_labels.dtype == torch.long and b.region_mask.dtype == torch.bool
        assert b.region_mask.sum(1).tolist() == n
        pad = ~b.region_mask
        assert (b.region_labels[pad] == -100).all() and (b.region_features[pad] == 0).all()
    for key, got in by_key(batches).items():
        objects = json.loads(raw[key]["json"])["objects"]
        image = Image.open(io.BytesIO(raw[key]["jpg"])).convert("RGB")
        assert got["labels"].tolist() == [SHAPES.index(o["shape"]) for o in objects]
        np.testing.assert_allclose(got["boxes"], np.array([o["box"] for o in objects]) / 64,
                                   atol=1e-7)
        want = np.stack([thumb8_meanstd(image, o["box"]) for o in objects])
        np.testing.assert_allclose(got["features"], want, atol=1e-6)

    # at most max_regions, the first ones in file order
    capped = by_key(drain(loader(str(world / "train"), wtok, visual="regions",
                                 max_regions=2))[0])
    full = by_key(batches)
    assert any(len(v["labels"]) == 3 for v in full.values())
    for key, got in capped.items():
        np.testing.assert_array_equal(got["features"], full[key]["features"][:2])


def test_shapes_world_roi_align(world, wtok):
    names = object_label_names()
    raw = {k: v for p in sorted((world / "val").glob("*.tar")) for k, v in _samples(p).items()}
    batches, skipped = drain(loader(str(world / "val"), wtok, visual="roi_align",
                                    region_labels=names))
    assert skipped == {} and sorted(keys_of(batches)) == sorted(raw)
    for key, got in by_key(batches).items():
        objects = json.loads(raw[key]["json"])["objects"]
        assert got["labels"].tolist() == [names.index(o["label"]) for o in objects]
        # a square image: resized, not cropped, so boxes are just normalised
        np.testing.assert_allclose(got["boxes"], np.array([o["box"] for o in objects]) / 64,
                                   atol=1e-6)


def test_resume_in_regions_mode(world, wtok):
    kw = dict(visual="regions", num_workers=2, shuffle_buffer=4, batch_size=3)
    urls = str(world / "train")

    def run(start=None):
        dl = loader(urls, wtok, start=start, **kw)
        tracker = StreamPosition.for_loader(dl)
        out = []
        for b in dl:
            tracker.update(b)
            out.append((b, json.loads(json.dumps(tracker.state_dict()))))
        return out

    full = run()
    assert len(full) > 6
    for k in (2, 5):
        rest = run(start=full[k - 1][1])
        assert len(rest) == len(full) - k
        for (a, _), (b, _) in zip(rest, full[k:]):
            assert a.keys == b.keys and a.position == b.position
            for name in ("input_ids", "region_features", "region_boxes", "region_labels",
                         "region_mask"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_stats_only_batches_and_batch_to(world, wtok, bad_shards):
    url, _, counts = bad_shards
    for visual in ("regions", "roi_align"):  # roi_align: none has json objects
        (b,) = drain(loader(url, wtok, visual=visual, batch_size=64, drop_last=True))[0]
        assert len(b) == 0 and b.input_ids.shape == (0, L)
        assert b.region_boxes.shape == (0, 0, 4) and b.region_mask.shape == (0, 0)
        if visual == "regions":
            assert b.skipped == counts and b.pixel_values.shape == (0, 0)
            assert b.region_features.shape == (0, 0, 16)
        else:
            assert b.skipped == {"missing_regions": 20}  # objects are checked first
            assert b.pixel_values.shape == (0, 3, SIZE, SIZE) and b.region_features is None
    b = next(iter(loader(str(world / "train"), wtok, visual="regions")))
    moved = b.to("cpu")
    assert torch.equal(moved.region_features, b.region_features)
    assert pickle.loads(pickle.dumps(loader(url, wtok, visual="roi_align").dataset)).visual
    assert loader(str(world / "train"), wtok).dataset.visual.mode == "patches"
    p = next(iter(loader(str(world / "train"), wtok)))
    assert p.region_features is p.region_boxes is p.region_labels is p.region_mask is None
    assert p.pixel_values.shape == (4, 3, SIZE, SIZE)


# --------------------------------------------------------------------------- file formats
def test_bottom_up_attention_layout(tmp_path, wtok):
    rng = np.random.default_rng(0)
    members, want = [], {}
    for i, n in enumerate((10, 100)):
        x = rng.standard_normal((n, 2048)).astype(np.float32)
        xy = rng.uniform(0, 300, (n, 2))
        bbox = np.concatenate([xy, xy + rng.uniform(5, 300, (n, 2))], 1).astype(np.float32)
        bbox[0] = [600, 400, 700, 500]  # partly outside the 640 x 480 image: clipped
        stored = x.T if i == 1 else x  # the MCAN release stores x as [2048, N]
        data = npz(x=stored, bbox=bbox, image_w=np.int64(640), image_h=np.int64(480),
                   num_bbox=np.int64(n), objects_id=np.zeros(n, np.int64),
                   objects_conf=np.ones(n, np.float32),
                   info=np.array([{"pickled": True}], dtype=object))  # never unpickled
        key = f"b{i}"
        # the npz's own size is used; the sample need not even have an image
        members += sample(key, i, data, image=None if i == 1 else b"")
        boxes = np.minimum(bbox / np.array([640, 480, 640, 480]), 1.0)
        want[key] = (x, boxes)
    write_tar(tmp_path / "00000.tar", members)
    batches, skipped = drain(loader(str(tmp_path / "00000.tar"), wtok, visual="regions",
                                    max_regions=100))
    assert skipped == {}
    assert batches[0].region_features.shape == (2, 100, 2048)
    got = by_key(batches)
    for key, (x, boxes) in want.items():
        np.testing.assert_array_equal(got[key]["features"], x)
        np.testing.assert_allclose(got[key]["boxes"], boxes, atol=1e-6)
        assert (got[key]["labels"] == -100).all()
    np.testing.assert_allclose(got["b0"]["boxes"][0], [600 / 640, 400 / 480, 1, 1], atol=1e-6)


def test_read_regions():
    f = np.ones((3, 4), np.float32)
    boxes = np.array([[0, 0, 10, 10], [5, -5, 25, 10], [30, 30, 40, 40]], np.float32)
    r = read_regions(npz(features=f, boxes=boxes, labels=np.array([2, 7, -1])), (20, 20),
                     num_labels=5)
    assert r.features.dtype == np.float32 and r.labels.dtype == np.int64
    np.testing.assert_allclose(r.boxes, [[0, 0, 0.5, 0.5], [0.25, 0, 1, 0.5]])
    assert r.labels.tolist() == [2, -100]  # 7 >= num_labels: unknown; the third box dropped
    with pytest.raises(RegionError, match="image size is unknown"):
        read_regions(npz(features=f, boxes=boxes), None)
    with pytest.raises(RegionError, match="x2 < x1"):
        read_regions(npz(features=f[:1], boxes=np.array([[0, 0, -5, 3]])), (20, 20))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Shard 0 starts with a good D=16 sample (the dataset's D); then every kind of bad file.
    Returns (url, good keys, exact skip counts)."""
    root = tmp_path_factory.mktemp("bad_regions")
    rng = np.random.default_rng(1)
    f16 = rng.standard_normal((3, 16)).astype(np.float32)
    boxes = np.array([[0, 0, 16, 16], [8, 8, 24, 24], [2, 4, 30, 31]], np.float32)
    labels = np.array([0, 1, 2])
    nan_f, nan_b = f16.copy(), boxes.copy()
    nan_f[1, 3], nan_b[2, 0] = np.nan, np.inf
    goods = {
        "g0": npz(features=f16, boxes=boxes, labels=labels),
        "g1": npz(features=f16[:2], boxes=boxes[:2]),  # size from the image header
        # partly outside: clipped; fully outside: dropped with its feature row and label
        "clip": npz(features=f16, boxes=np.array([[-8, 4, 20, 40], [40, 40, 50, 50],
                                                  [4, 4, 8, 8]], np.float32), labels=labels),
    }
    bads = {
        "shape_f": npz(features=f16.reshape(-1), boxes=boxes),
        "shape_b": npz(features=f16, boxes=boxes[:, :3]),
        "n_mismatch": npz(features=f16[:2], boxes=boxes),
        "labels_n": npz(features=f16, boxes=boxes, labels=labels[:2]),
        "empty": npz(features=np.zeros((0, 16), np.float32), boxes=np.zeros((0, 4))),
        "nan_f": npz(features=nan_f, boxes=boxes),
        "inf_b": npz(features=f16, boxes=nan_b),
        "unreadable": b"PK\x03\x04 this is not a zip",
        "npy": (lambda b: (np.save(b, f16), b.getvalue())[1])(io.BytesIO()),
        "truncated": npz(features=f16, boxes=boxes)[:300],
        "dim": npz(features=rng.standard_normal((3, 12)).astype(np.float32), boxes=boxes),
        "outside": npz(features=f16[:1], boxes=np.array([[40, 0, 60, 10]], np.float32)),
        "xywh": npz(features=f16[:1], boxes=np.array([[20, 20, 5, 5]], np.float32)),
        "pickled": npz(features=np.array([[1.0]], dtype=object), boxes=boxes[:1]),
        "no_boxes": npz(features=f16),
    }
    members = []
    for i, (key, data) in enumerate(itertools.chain(goods.items(), bads.items())):
        members += sample(key, i, data)
    members += sample("none", 99)  # no regions member
    members += sample("noimg", 98, npz(features=f16, boxes=boxes), image=None)  # size unknown
    path = write_tar(root / "00000.tar", members)
    counts = {"bad_regions": len(bads), "missing_regions": 1, "missing_image": 1}
    return str(path), sorted(goods), counts


def test_bad_region_files_are_skipped_and_counted(bad_shards, wtok):
    url, good_keys, counts = bad_shards
    assert region_feature_dim(url) == 16
    batches, skipped = drain(loader(url, wtok, visual="regions", region_labels=["a", "b", "c"]))
    assert skipped == counts and sorted(keys_of(batches)) == good_keys
    got = by_key(batches)
    assert len(got["g0"]["labels"]) == 3 and got["g0"]["labels"].tolist() == [0, 1, 2]
    assert got["g1"]["labels"].tolist() == [-100, -100]
    np.testing.assert_allclose(got["g1"]["boxes"][1], [0.25, 0.25, 0.75, 0.75])
    clip = got["clip"]
    np.testing.assert_allclose(clip["boxes"], [[0, 4 / 32, 20 / 32, 1],
                                               [4 / 32, 4 / 32, 8 / 32, 8 / 32]])
    assert clip["labels"].tolist() == [0, 2]
    f16 = got["g0"]["features"]
    np.testing.assert_array_equal(clip["features"], f16[[0, 2]])
    # the same policy outside the loader
    skips = SkipCounter()
    samples = list(iter_eval_samples(url, ImageTransform(SIZE), skips, visual="regions"))
    assert skips.counts == counts and sorted(s["key"] for s in samples) == good_keys
    assert samples[0]["pixel_values"].shape == (0,) and len(samples[0]["regions"]) == 3


def test_one_odd_region_file_first_is_the_odd_one_out(tmp_path, wtok):
    """Issue 17: the dataset's feature width is the majority of the first files', so a
    100-wide file ahead of 99 good 16-wide ones is the one counted bad (it used to set the
    width and make the 99 the bad ones)."""
    rng = np.random.default_rng(0)
    boxes = np.array([[2, 2, 10, 10]], np.float32)
    members = sample("odd", 0, npz(features=rng.standard_normal((1, 100)).astype(np.float32),
                                   boxes=boxes))
    for i in range(1, 100):
        members += sample(f"g{i:03d}", i, npz(
            features=rng.standard_normal((1, 16)).astype(np.float32), boxes=boxes))
    url = str(write_tar(tmp_path / "00000.tar", members))
    assert region_feature_dim(url) == 16
    batches, skipped = drain(loader(url, wtok, visual="regions"))
    assert skipped == {"bad_regions": 1} and len(keys_of(batches)) == 99
    assert "odd" not in keys_of(batches)


# --------------------------------------------------------------------------- roi_align
def test_map_boxes_by_hand():
    # 48 x 32 -> shorter side to 16: 24 x 16, centre crop 16 x 16 at left 4: x' = x / 2 - 4
    t = ImageTransform(SIZE)
    boxes, keep = t.map_boxes([[8, 4, 24, 20],  # inside: [0, 2, 8, 10] px of the output
                               [0, 0, 6, 10],  # in the cropped-off left strip: dropped
                               [30, 8, 46, 24],  # over the right edge: clipped at 16
                               [40, 0, 48, 32]], (48, 32))  # right strip: dropped
    assert keep.tolist() == [True, False, True, False]
    np.testing.assert_allclose(boxes, [[0, 2 / 16, 8 / 16, 10 / 16],
                                       [11 / 16, 4 / 16, 1, 12 / 16]], atol=1e-6)
    # a tall image: 32 x 64 -> 16 x 32, crop at top 8: y' = y / 2 - 8
    boxes, keep = t.map_boxes(np.array([[0, 16, 32, 48]]), (32, 64))
    np.testing.assert_allclose(boxes, [[0, 0, 1, 1]])
    boxes, keep = t.map_boxes([], (32, 64))
    assert boxes.shape == (0, 4) and keep.shape == (0,)
    with pytest.raises(ValueError, match="eval geometry"):
        ImageTransform(SIZE, train=True).map_boxes([[0, 0, 1, 1]], (4, 4))
    assert not ImageTransform(SIZE, train=True).as_eval().train


def test_roi_align_mode(tmp_path, wtok):
    names = ["circle", "square"]
    objs = [{"box": [8, 4, 24, 20], "label": "square"}, {"box": [0, 0, 6, 10], "label": "circle"},
            {"box": [30, 8, 46, 24], "label": "blob"}, {"box": [1, 1, 5, 5]}]
    members = sample("wide", 0, objects=objs, size=(48, 32))
    members += sample("square", 1, objects=[{"box": [0, 0, 16, 32], "label": "circle"}])
    members += sample("noobj", 2)  # no objects: missing_regions
    members += sample("empty", 3, objects=[])  # missing_regions
    members += sample("cropped", 4, objects=[{"box": [0, 0, 4, 32]}], size=(64, 32))  # missing
    members += sample("badbox", 5, objects=[{"box": [0, 0, 4]}])  # bad_regions
    members += sample("strbox", 6, objects=[{"box": ["0", "0", "4", "4"]}])  # bad_regions
    members += sample("notlist", 7, objects={"box": [0, 0, 4, 4]})  # bad_regions
    members += sample("inverted", 8, objects=[{"box": [9, 0, 4, 4]}])  # bad_regions
    url = str(write_tar(tmp_path / "00000.tar", members))
    for transform in (ImageTransform(SIZE), ImageTransform(SIZE, train=True, scale=(0.3, 0.5))):
        batches, skipped = drain(loader(url, wtok, transform=transform, visual="roi_align",
                                        region_labels=names, batch_size=8))
        assert skipped == {"missing_regions": 3, "bad_regions": 4}
        (b,) = batches
        assert b.keys == ["wide", "square"] and b.region_features is None
        # the eval geometry even with a training transform
        with tarfile.open(url) as tar:
            jpg = tar.extractfile("wide.jpg").read()
        want = ImageTransform(SIZE)(Image.open(io.BytesIO(jpg)))
        assert torch.equal(b.pixel_values[0], want)
        # "wide" keeps objects 0 and 2 (1 and 3 lie in the cropped-off left strip)
        assert b.region_mask.tolist() == [[True, True], [True, False]]
        np.testing.assert_allclose(b.region_boxes[0].numpy(), [
            [0, 2 / 16, 8 / 16, 10 / 16], [11 / 16, 4 / 16, 1, 12 / 16]], atol=1e-6)
        assert b.region_labels.tolist() == [[1, -100], [0, -100]]  # "blob" is unknown
        np.testing.assert_allclose(b.region_boxes[1, 0].numpy(), [0, 0, 0.5, 1])
    b = next(iter(loader(url, wtok, visual="roi_align", batch_size=2)))  # no label names
    assert (b.region_labels == -100).all()


# --------------------------------------------------------------------------- start-up checks
def test_has_region_files_and_clear_errors(world, good, tok, tmp_path):  # noqa: F811
    root, _, _ = good
    assert not has_region_files(str(root))
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 10)
    first = sorted((world / "train").glob("*.tar"))[0]
    assert has_region_files([str(tmp_path / "junk.tar"), str(first)])  # first readable shard
    assert not has_region_files([str(tmp_path / "junk.tar")])
    with pytest.raises(ConfigError, match="vlp data synth"):
        loader(str(root), tok, visual="regions")
    with pytest.raises(ValueError, match="visual='boxes'.*'patches', 'regions', 'roi_align'"):
        loader(str(root), tok, visual="boxes")
    with pytest.raises(ValueError, match="max_regions=0"):
        loader(str(root), tok, visual="roi_align", max_regions=0)
    # a given region_dim wins over the probe: every file then has the wrong D
    _, skipped = drain(loader(str(world / "val"), tok, visual="regions", region_dim=2048))
    assert skipped == {"bad_regions": 4}
