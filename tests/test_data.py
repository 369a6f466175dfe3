"""vlp.data: shard lists, transforms, the webdataset loader, skip accounting, eval iteration.

Shards are built here with tarfile + PIL in img2dataset's layout (key.jpg/.txt/.json and
{shard}_stats.json beside each tar).
"""
import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data import (CLIP_MEAN, CLIP_STD, Batch, ImageTransform, SkipCounter, accumulate,
                      check_shards_vs_workers, count_samples, expand_urls, format_skips,
                      iter_captions, iter_eval_samples, make_loader)
from vlp.data.transforms import random_resized_crop_box
from vlp.tokenizer import train_tokenizer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
N_SHARDS, PER_SHARD, SIZE, L = 4, 10, 16, 12


# --------------------------------------------------------------------------- shard building
def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, i: int, *, listed: bool, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """img2dataset's member order: image, txt, json. `listed`: json has a `captions` list."""
    color = COLORS[i % len(COLORS)]
    caps = [f"a {color} circle", f"the {color} square", f"one {color} star"]
    meta = {"key": key, "caption": caps[0], "width": 32, "height": 32,
            "objects": [{"box": [0, 0, 8, 8], "label": "circle"}]}
    if listed:
        meta["captions"] = caps
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    return [(f"{key}.{ext}", image_bytes(i, fmt)), (f"{key}.txt", caps[0].encode()),
            (f"{key}.json", json.dumps(meta).encode())]


def write_stats(tar: Path, n: int) -> None:
    stats = {"count": n + 2, "successes": n, "failed_to_download": 2}
    tar.with_name(tar.stem + "_stats.json").write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """4 shards x 10 samples; shards 0-1 have json caption lists, 2-3 only txt; shard 3 has
    PNG (and WebP) images. Returns (dir, keys in shard order, {key: captions})."""
    root = tmp_path_factory.mktemp("good")
    keys, captions = [], {}
    for s in range(N_SHARDS):
        members = []
        for i in range(PER_SHARD):
            key = f"{s:05d}{i:04d}"  # like img2dataset: unique across shards
            ext = "png" if s == 3 and i % 2 else ("webp" if s == 3 and i == 4 else "jpg")
            m = sample_members(key, s * PER_SHARD + i, listed=s < 2, ext=ext)
            members += m
            keys.append(key)
            meta = json.loads(m[2][1])
            captions[key] = meta.get("captions", [meta["caption"]])
        write_stats(write_tar(root / f"{s:05d}.tar", members), PER_SHARD)
    return root, keys, captions


@pytest.fixture(scope="module")
def tok(good):
    return train_tokenizer(iter_captions(str(good[0])), vocab_size=200)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """4 shards: one good; one with bad samples; one cut at a member boundary; one cut inside
    a member. Returns (urls, good keys in order, exact expected skip counts)."""
    root = tmp_path_factory.mktemp("bad")
    good_keys = []

    members = []
    for i in range(10):
        members += sample_members(f"0000{i}", i, listed=True)
        good_keys.append(f"0000{i}")
    write_tar(root / "00000.tar", members)

    members = []
    for i in range(10):
        key = f"1000{i}"
        m = sample_members(key, i, listed=False)
        if i == 1:  # corrupt image: a JPEG cut in half
            m[0] = (m[0][0], m[0][1][: len(m[0][1]) // 2])
        elif i == 2:  # no txt, and no caption in the json
            m = [m[0], (m[2][0], json.dumps({"key": key, "width": 32}).encode())]
        elif i == 3:  # undecodable json
            m[2] = (m[2][0], b"{not json")
        elif i == 4:  # no image
            m = m[1:]
        elif i == 5:  # no txt, but img2dataset's json "caption": kept
            m = [m[0], m[2]]
        if i not in (1, 2, 3, 4):
            good_keys.append(key)
        members += m
    write_tar(root / "00001.tar", members)

    # Cut at the header of sample 5: python's tarfile alone would call this a complete tar.
    members = [m for i in range(10) for m in sample_members(f"2000{i}", i, listed=True)]
    full = write_tar(root / "full2.tar", members)
    with tarfile.open(full) as t:
        cut = t.getmember("20005.jpg").offset
    (root / "00002.tar").write_bytes(full.read_bytes()[:cut])
    good_keys += [f"2000{i}" for i in range(4)]  # sample 4 may be incomplete: dropped

    # Cut inside the image data of sample 2: samples 0 and 1 are complete.
    members = [m for i in range(10) for m in sample_members(f"3000{i}", i, listed=True)]
    full = write_tar(root / "full3.tar", members)
    with tarfile.open(full) as t:
        info = t.getmember("30002.jpg")
        cut = info.offset_data + info.size // 2
    (root / "00003.tar").write_bytes(full.read_bytes()[:cut])
    good_keys += ["30000", "30001"]

    urls = [str(root / f"{s:05d}.tar") for s in range(4)]
    counts = {"corrupt_image": 1, "missing_caption": 1, "bad_json": 1, "missing_image": 1,
              "shard_error": 2}
    return urls, good_keys, counts


def loader(urls, tok, **kw):
    args = dict(tokenizer=tok, transform=ImageTransform(SIZE, train=True), batch_size=8,
                context_length=L, num_workers=0, shuffle_buffer=16, seed=0, drop_last=False)
    args.update(kw)
    return make_loader(urls, **args)


def drain(dl) -> tuple[list[Batch], dict]:
    batches, skipped = [], {}
    for b in dl:
        accumulate(skipped, b.skipped)
        batches.append(b)
    return batches, skipped


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


# --------------------------------------------------------------------------- shards
def test_expand_urls(good, tmp_path):
    root, _, _ = good
    shards = [str(root / f"{s:05d}.tar") for s in range(4)]
    assert expand_urls(f"{root}/{{00000..00003}}.tar") == shards
    assert expand_urls(str(root)) == shards
    assert expand_urls(f"{root}/*.tar") == shards
    assert expand_urls(f"{root}/00003.tar::{root}/{{00000..00001}}.tar") == shards[3:] + shards[:2]
    assert expand_urls([shards[1], f"file://{shards[0]}"]) == [shards[1], shards[0]]
    assert expand_urls("pipe:aws s3 cp s3://b/{000..002}.tar -") == [
        "pipe:aws s3 cp s3://b/000.tar -", "pipe:aws s3 cp s3://b/001.tar -",
        "pipe:aws s3 cp s3://b/002.tar -"]
    assert expand_urls("s3://b/{0..1}.tar::https://h/x.tar") == [
        "s3://b/0.tar", "s3://b/1.tar", "https://h/x.tar"]
    with pytest.raises(FileNotFoundError, match="6 of 10 shards named by .*00004.tar"):
        expand_urls(f"{root}/{{00000..00009}}.tar")
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        expand_urls(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_urls(f"{tmp_path}/*.tar")


def test_count_samples(good, tmp_path):
    root, _, _ = good
    assert count_samples(str(root)) == 40  # "successes", not "count"
    shard = write_tar(tmp_path / "x.tar", sample_members("x", 0, listed=False))
    (tmp_path / "x_stats.json").write_text(json.dumps({"count": 7}))
    assert count_samples([str(root / "00000.tar"), str(shard)]) == 17
    (tmp_path / "x_stats.json").unlink()
    assert count_samples([str(root / "00000.tar"), str(shard)]) is None
    assert count_samples([f"pipe:cat {root}/00000.tar"]) is None


def test_check_shards_vs_workers():
    check_shards_vs_workers(8, 2, 4)
    check_shards_vs_workers(2, 2, 0)
    with pytest.raises(ValueError) as err:
        check_shards_vs_workers(3, 2, 2)
    assert str(err.value) == (
        "3 shards cannot feed 2 ranks x 2 loader workers: some workers would get no shard and "
        "the loader would hang or stall (a common cause of hung loaders). Use at least 4 shards "
        "(re-shard the data with smaller shards), lower data.num_workers, or set "
        "data.resampled=true.")


# --------------------------------------------------------------------------- transforms
def test_eval_transform_constant_colour():
    t = ImageTransform(SIZE)
    x = t(Image.new("RGB", (50, 30), (255, 128, 0)))
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    for c, v in enumerate((255, 128, 0)):
        want = (v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(x[c], torch.full((SIZE, SIZE), want), atol=1e-5)
    # grayscale and arrays go through the same path
    assert torch.equal(t(Image.new("L", (20, 40), 77)), t(np.full((40, 20, 3), 77, np.uint8)))
    assert torch.allclose(t(np.full((8, 8, 3), 0.5, np.float32)),
                          t(np.full((8, 8, 3), 128, np.uint8)))


def test_eval_transform_center_crop():
    # left third red, middle green, right third blue; the center crop keeps only green
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    x = ImageTransform(10)(arr)
    g = (1 - CLIP_MEAN[1]) / CLIP_STD[1]
    assert x.shape == (3, 10, 10)
    assert torch.allclose(x[1, :, 2:8], torch.full((10, 6), g), atol=0.05)


def test_train_transform_is_seeded():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8))
    t = ImageTransform(SIZE, train=True, scale=(0.3, 0.6))
    a, b = t(img, rng=random.Random(0)), t(img, rng=random.Random(0))
    assert a.shape == (3, SIZE, SIZE) and torch.equal(a, b)
    assert not torch.equal(a, t(img, rng=random.Random(1)))
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_crop_box(60, 40, (0.3, 0.6), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 40
        assert 0.25 < (x1 - x0) * (y1 - y0) / 2400 < 0.65


def test_transform_dict_round_trip():
    t = ImageTransform(24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    d = json.loads(json.dumps(t.to_dict()))
    assert d == {"image_size": 24, "mean": [0.5] * 3, "std": [0.25] * 3,
                 "interpolation": "bilinear"}
    u = ImageTransform.from_dict(d)
    assert not u.train and u.to_dict() == d
    with pytest.raises(ValueError, match="unknown image transform setting.*'size'"):
        ImageTransform.from_dict({"size": 3})


# --------------------------------------------------------------------------- loader
@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_sees_every_key_once(good, tok, num_workers):
    root, keys, _ = good
    batches, skipped = drain(loader(str(root), tok, num_workers=num_workers))
    seen = keys_of(batches)
    assert sorted(seen) == sorted(keys) and len(seen) == len(keys)
    assert seen != keys  # shuffled
    assert skipped == {} and all(b.skipped == {} for b in batches)
    for b in batches:
        n = len(b)
        assert 0 < n <= 8
        assert b.pixel_values.shape == (n, 3, SIZE, SIZE) and b.pixel_values.dtype == torch.float32
        assert b.input_ids.shape == b.attention_mask.shape == (n, L)
        assert b.input_ids.dtype == b.attention_mask.dtype == torch.long
        assert (b.input_ids[:, 0] == tok.cls_id).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_drop_last(good, tok, num_workers):
    root, _, _ = good
    batches, _ = drain(loader(str(root), tok, num_workers=num_workers, batch_size=16,
                              drop_last=True))
    # 40 samples: one reader makes 2 full batches; 2 workers x 20 samples make 1 each.
    assert [len(b) for b in batches] == [16, 16]
    batches, _ = drain(loader(str(root), tok, num_workers=num_workers, batch_size=16))
    assert sum(len(b) for b in batches) == 40


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_see_disjoint_shards(good, tok, num_workers):
    root, keys, _ = good
    seen = [keys_of(drain(loader(str(root), tok, num_workers=num_workers, rank=r,
                                 world_size=2))[0]) for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(keys)
    assert len(seen[0]) == len(seen[1]) == 20
    with pytest.raises(ValueError, match="4 shards cannot feed 2 ranks x 3 loader workers"):
        loader(str(root), tok, num_workers=3, rank=0, world_size=2)


def test_same_seed_same_batches(good, tok):
    root, _, _ = good
    a, _ = drain(loader(str(root), tok, num_workers=2))
    b, _ = drain(loader(str(root), tok, num_workers=2))
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x.pixel_values, y.pixel_values) and torch.equal(x.input_ids, y.input_ids)
               for x, y in zip(a, b))
    c, _ = drain(loader(str(root), tok, num_workers=2, epoch=1))
    assert keys_of(c) != keys_of(a) and sorted(keys_of(c)) == sorted(keys_of(a))


def test_caption_modes(good, tok):
    root, _, captions = good
    for mode in ("first", "random"):
        batches, _ = drain(loader(str(root), tok, caption=mode))
        picked = {k: tok.decode(ids) for b in batches for k, ids in zip(b.keys, b.input_ids)}
        assert all(picked[k] in captions[k] for k in picked)
        n_first = sum(picked[k] == captions[k][0] for k in picked)
        if mode == "first":
            assert n_first == 40
        else:  # 20 samples have 3 captions
            assert 20 < n_first < 40
    with pytest.raises(ValueError, match="caption='last'"):
        loader(str(root), tok, caption="last")


def test_pipe_urls(good, tok, tmp_path):
    root, keys, _ = good
    spec = f"pipe:cat {root}/{{00000..00003}}.tar"
    batches, skipped = drain(loader(spec, tok, num_workers=2))
    assert sorted(keys_of(batches)) == sorted(keys) and skipped == {}
    # a failing command is a shard error, not a crash
    batches, skipped = drain(loader(f"{spec}::pipe:cat {tmp_path}/missing.tar", tok))
    assert sorted(keys_of(batches)) == sorted(keys) and skipped == {"shard_error": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last,batch_size", [(False, 4), (True, 4), (True, 64)])
def test_bad_input_skipped_and_counted(bad, tok, num_workers, drop_last, batch_size):
    urls, good_keys, counts = bad
    batches, skipped = drain(loader(urls, tok, num_workers=num_workers, drop_last=drop_last,
                                    batch_size=batch_size))
    assert skipped == counts
    seen = keys_of(batches)
    if not drop_last:
        assert sorted(seen) == sorted(good_keys)
    assert set(seen) <= set(good_keys) and len(set(seen)) == len(seen)
    if batch_size == 64:  # no full batch anywhere: only stats-only batches
        assert seen == [] and all(len(b) == 0 for b in batches) and batches
    for b in batches:
        if len(b) == 0:
            assert b.pixel_values.shape == (0, 3, SIZE, SIZE) and b.input_ids.shape == (0, L)


def test_resampled_stream(good, tok):
    root, keys, _ = good
    dl = loader(str(root), tok, resampled=True, world_size=8, rank=7)  # no shard-count limit
    it = iter(dl)
    seen = keys_of([next(it) for _ in range(12)])  # 96 samples > 40: an endless stream
    assert len(seen) == 96 and set(seen) <= set(keys)


def test_resampled_unreadable_data_fails_loudly(tok, tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    dl = loader(str(tmp_path / "junk.tar"), tok, resampled=True)
    with pytest.raises(RuntimeError, match="100 shards in a row failed"):
        next(iter(dl))


def test_pickle_and_batch_to(good, tok):
    root, _, _ = good
    dl = loader(str(root), tok)
    clone = pickle.loads(pickle.dumps(dl.dataset))  # spawn-start workers need this
    b = next(iter(dl))
    assert next(iter(clone)).keys == b.keys
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and moved.keys == b.keys and len(moved) == len(b)
    assert torch.equal(moved.input_ids, b.input_ids)


# --------------------------------------------------------------------------- eval and captions
def test_iter_eval_samples(good, bad):
    root, keys, captions = good
    t = ImageTransform(SIZE)
    samples = list(iter_eval_samples(str(root), t))
    assert [s["key"] for s in samples] == keys
    assert all(s["captions"] == captions[s["key"]] for s in samples)
    assert samples[0]["pixel_values"].shape == (3, SIZE, SIZE)
    assert samples[0]["json"]["objects"][0]["label"] == "circle"

    urls, good_keys, counts = bad
    skips = SkipCounter()
    assert [s["key"] for s in iter_eval_samples(urls, t, skips=skips)] == good_keys
    assert skips.counts == counts
    assert format_skips(skips.counts) == ("4 samples skipped (bad_json=1, corrupt_image=1, "
                                          "missing_caption=1, missing_image=1); 2 shard errors")
    assert format_skips({"shard_error": 1}) == "0 samples skipped; 1 shard error"
    assert format_skips({"bad_json": 1, "missing_image": 0}) == "1 sample skipped (bad_json=1)"
    assert format_skips({}) == "none skipped"


def test_iter_captions(good):
    root, keys, captions = good
    got = list(iter_captions(str(root)))
    assert got == [c for k in keys for c in captions[k]]
    assert len(got) == 20 * 3 + 20
