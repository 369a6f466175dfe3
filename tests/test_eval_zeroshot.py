"""`vlp eval zeroshot`: the shapes world's CLIP_benchmark-layout sets give exactly the zero-shot
numbers `evaluate_retrieval` reports on the val shards; an ImageNet-style folder scored by a
hand-built model whose predictions are known (accuracy worked out by hand); a CLIP_benchmark
set written by webdataset's own ShardWriter scored as an independent plain torch computation
from the model's encode_image / encode_text says; top-k and mean per-class recall against
hand-worked values; class-name and template files in every accepted format; bad input gives one
clear line."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

import vlp
from vlp.cli import main
from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.data.transforms import ImageTransform
from vlp.data.synth import ZEROSHOT_TEMPLATES, generate
from vlp.eval.inputs import EvalError
from vlp.eval.retrieval import evaluate_retrieval
from vlp.eval.zeroshot import classification_metrics, read_classnames, read_templates
from vlp.models.pretrained import Pretrained
from vlp.models.towers import DualTower
from vlp.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def zs_world(tmp_path_factory):
    """A shapes world with 120 val images (about 40 with one object) and no benchmark."""
    root = tmp_path_factory.mktemp("zs_world")
    generate(root, images=16, val_images=120, benchmark_images=0, shard_size=40,
             progress=False)
    return root


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", "zeroshot", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _expected(model, images: list[Image.Image], labels: list[int], names: list[str],
              templates: list[str]) -> dict:
    """The metrics worked out independently: plain torch over encode_image / encode_text, then
    loops over the images and classes."""
    feats = model.encode_image(images)  # (N, D), the model's own transform
    classes = []
    for name in names:
        prompts = [t.replace("{c}", name) for t in templates]
        emb = F.normalize(model.encode_text(prompts), dim=-1).mean(0)
        classes.append(emb / emb.norm())
    logits = (feats @ torch.stack(classes).T).tolist()
    top1 = top5 = 0
    per_class = {c: [0, 0] for c in set(labels)}
    for row, label in zip(logits, labels):
        ranked = sorted(range(len(names)), key=lambda j: -row[j])
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
        per_class[label][0] += ranked[0] == label
        per_class[label][1] += 1
    n = len(labels)
    return {"zeroshot_top1": 100 * top1 / n, "zeroshot_top5": 100 * top5 / n,
            "zeroshot_mean_per_class_recall":
                100 * sum(h / c for h, c in per_class.values()) / len(per_class),
            "num_images": n, "num_classes": len(names), "num_templates": len(templates)}


def _check(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# --------------------------------------------------------------------------- the shapes world
def test_shapes_world_sets_are_clip_benchmark_layout(zs_world):
    manifest = json.loads((zs_world / "MANIFEST.json").read_text())
    val = [json.loads(s["json"]) for s in wds.WebDataset(str(zs_world / "val" / "{00000..00002}.tar"),
                                                          shardshuffle=False)]
    for attribute, templates in ZEROSHOT_TEMPLATES.items():
        root = zs_world / "zeroshot" / attribute
        names = (root / "classnames.txt").read_text().splitlines()
        assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == \
            list(templates)
        assert (root / "test" / "nshards.txt").read_text().strip() == "1"
        # read as CLIP_benchmark reads it (webdataset: image + "cls" label)
        samples = list(wds.WebDataset(str(root / "test" / "0.tar"), shardshuffle=False)
                       .decode("pil").to_tuple("__key__", "jpg", "cls"))
        singles = {m["key"]: m["objects"][0][attribute] for m in val if len(m["objects"]) == 1}
        assert {k: names[c] for k, _, c in samples} == singles
        assert names == sorted(set(singles.values())) and len(names) >= 2
        assert manifest["zeroshot"][attribute] == {
            "path": f"zeroshot/{attribute}", "split": "test", "images": len(singles),
            "classes": len(names)}


@pytest.mark.parametrize("family", ["dual_tower", "combined"])
def test_shapes_world_sets_equal_evaluate_retrieval(zs_world, pretrained, family, tmp_path,
                                                    capsys):
    """The acceptance test: the CLIP_benchmark-layout sets through `vlp eval zeroshot` give
    exactly the zeroshot_* numbers evaluate_retrieval gives on the val shards."""
    model_dir = pretrained(family)
    ref = evaluate_retrieval(vlp.load(model_dir), str(zs_world / "val"), progress=False)
    for attribute in ("shape", "color"):
        out = tmp_path / f"{attribute}.json"
        rc, printed, _ = _run(capsys, "--model", model_dir, "--data",
                              zs_world / "zeroshot" / attribute, "--out", out)
        assert rc == 0
        got = json.loads(out.read_text())
        assert got["zeroshot_top1"] == ref[f"zeroshot_{attribute}_top1"]
        assert got["num_images"] == ref[f"zeroshot_{attribute}_images"] > 0
        assert got["num_classes"] == ref[f"zeroshot_{attribute}_classes"] >= 2
        assert got["num_templates"] == len(ZEROSHOT_TEMPLATES[attribute])
        assert got["skipped"] == 0
        assert "zeroshot_top1" in printed and "chance" in printed


# --------------------------------------------------------------------------- image folders
COLOURS = ("red", "green", "blue")


def colour_model(folder) -> str:
    """A dual tower whose features are known in closed form: its image feature is the direction
    of the image's mean normalised (R, G, B), its text feature the sum of the one-hot vectors of
    the colour words in the text. Every block is the identity (attention and MLP outputs zero),
    positions and other embeddings are zero, the final LayerNorm keeps a zero-mean token's
    direction ([v, -v, 0, 0] is zero-mean) and maps a zero token to zero."""
    tok = train_tokenizer(["a photo of a red green blue thing."] * 5, vocab_size=60)
    cfg = ModelConfig(embed_dim=3,
                      vision=VisionConfig(width=8, layers=1, heads=2, image_size=16,
                                          patch_size=8, pool="mean"),
                      text=TextConfig(width=8, layers=1, heads=2, context_length=16,
                                      mask="bidirectional", pool="mean"))
    model = DualTower(cfg, tok.vocab_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_()
            if ".ln_" in name and name.endswith("weight"):  # LayerNorms: unit gain
                param.fill_(1.0)
        conv = model.visual.embed.proj.weight  # (8, 3, 8, 8): channel j sums colour j, 3+j negates
        for j in range(3):
            conv[j, j] = 1.0
            conv[3 + j, j] = -1.0
            model.visual.proj.weight[j, j] = 1.0
            model.text.proj.weight[j, j] = 1.0
            word = tok.hf.token_to_id(COLOURS[j])
            assert word is not None and word > 4  # a whole word, not a special token
            model.text.embed.token_embed.weight[word, j] = 1.0
            model.text.embed.token_embed.weight[word, 3 + j] = -1.0
    Pretrained(model, tok, ImageTransform(16)).save(folder)
    return str(folder)


def test_colour_model_features_are_what_the_construction_says(tmp_path):
    model = vlp.load(colour_model(tmp_path / "m"))
    text = model.encode_text(["a photo of a red thing.", "green", "blue blue"])
    assert torch.allclose(text, torch.eye(3), atol=1e-6)
    image = model.encode_image([Image.new("RGB", (20, 16), (220, 30, 30))])[0]
    pixel = model.transform(Image.new("RGB", (16, 16), (220, 30, 30)))[:, 0, 0]  # normalised
    assert torch.allclose(image, pixel / pixel.norm(), atol=1e-5)


def test_image_folder_against_hand_computed_argmax(tmp_path, capsys):
    """3 class folders named by WordNet-like ids, a LOC_synset_mapping-style names file, solid
    colour images of several sizes and formats whose predicted class is their dominant colour
    (`colour_model`), some put in the wrong folder on purpose; one corrupt file (skipped,
    counted) and a non-image file (ignored)."""
    root = tmp_path / "imagenet"
    names = {"n03": "red", "n01": "green", "n02": "blue"}  # labels: sorted dirs n01, n02, n03
    red, green, blue = (220, 30, 30), (30, 200, 30), (30, 30, 220)
    folders = {"n03": [red, (180, 60, 40), red, green],  # 3 of 4 right
               "n01": [green, green, (60, 160, 50)],  # 3 of 3
               "n02": [blue, red]}  # 1 of 2
    for d, colours in folders.items():
        (root / "val" / d).mkdir(parents=True)
        for i, rgb in enumerate(colours):
            fmt, suffix = [("JPEG", ".JPEG"), ("PNG", ".png")][i % 2]
            Image.new("RGB", (24 + 8 * i, 16 + 4 * i), rgb).save(
                root / "val" / d / f"img{i}{suffix}", format=fmt)
    (root / "val" / "n02" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "val" / "n01" / "README.txt").write_text("not an image")
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{d} {names[d]}, other synonym\n" for d in names))
    (root / "templates.txt").write_text("a photo of a {c}.\nthe {c} thing\n\n")

    model_dir = colour_model(tmp_path / "model")
    out = tmp_path / "m.json"
    rc, printed, _ = _run(capsys, "--model", model_dir, "--data", root, "--classnames",
                          root / "LOC_synset_mapping.txt", "--templates",
                          root / "templates.txt", "--out", out)
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["zeroshot_top1"] == pytest.approx(100 * 7 / 9)
    assert got["zeroshot_mean_per_class_recall"] == pytest.approx(100 * (3 / 4 + 1 + 1 / 2) / 3)
    assert got["zeroshot_top5"] == 100.0  # 3 classes: top-5 holds them all
    assert (got["num_images"], got["num_classes"], got["num_templates"]) == (9, 3, 2)
    assert got["skipped"] == 1 and got["skipped_corrupt_image"] == 1
    assert "zeroshot_mean_per_class_recall" in printed

    # DIR/val/<class> given directly; the names in sorted dir order, one a line
    (tmp_path / "names.txt").write_text("green\nblue\nred\n")
    rc, _, _ = _run(capsys, "--model", model_dir, "--data", root / "val", "--classnames",
                    tmp_path / "names.txt", "--out", out)
    assert rc == 0 and json.loads(out.read_text())["zeroshot_top1"] == pytest.approx(700 / 9)
    # without a names file the dir names are the class names: no colour word, no signal
    rc, _, _ = _run(capsys, "--model", model_dir, "--data", root, "--out", out)
    assert rc == 0 and json.loads(out.read_text())["num_templates"] == 1


# --------------------------------------------------------------------------- CLIP_benchmark
def _write_clip_benchmark(root, samples: list[dict], names: list[str], templates: list[str]):
    """As clip_benchmark/webdataset_builder.py writes it: webdataset's ShardWriter, "cls" an
    int, the image bytes under their format's extension, nshards.txt."""
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=3, verbose=0) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:07d}", **sample})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "classnames.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "zeroshot_classification_templates.txt").write_text(
        "".join(f"{t}\n" for t in templates))


def _picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_clip_benchmark_shards_against_hand_computed_argmax(pretrained, tmp_path, capsys):
    rng = np.random.default_rng(1)
    names = ["cat", "dog", "bird", "fish", "horse", "cow", "sheep"]
    templates = ["a photo of a {c}.", "a blurry photo of the {c}.", "itap of a {c}."]
    samples, images, labels = [], [], []
    for i in range(10):
        im = _picture(rng, (48, 36))
        ext = ["png", "webp", "jpg"][i % 3]
        data = _png(im, {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}[ext])
        samples.append({ext: data, "cls": i % 7})
        with Image.open(io.BytesIO(data)) as saved:
            images.append(saved.convert("RGB"))
        labels.append(i % 7)
    samples.insert(3, {"png": b"\x89PNG truncated", "cls": 2})  # corrupt: skipped
    samples.insert(6, {"png": _png(_picture(rng, (8, 8)))})  # no label: skipped
    root = tmp_path / "wds_set"
    _write_clip_benchmark(root, samples, names, templates)
    assert int((root / "test" / "nshards.txt").read_text()) == 4  # 12 samples, 3 a shard

    model_dir = pretrained("dual_tower")
    model = vlp.load(model_dir)
    out = tmp_path / "m.json"
    rc, _, _ = _run(capsys, "--model", model_dir, "--data", root, "--out", out)
    assert rc == 0
    got = json.loads(out.read_text())
    _check(got, _expected(model, images, labels, names, templates))
    assert got["skipped"] == 2
    assert got["skipped_corrupt_image"] == 1 and got["skipped_missing_label"] == 1

    # --classnames (a JSON list) and --templates override the set's own files
    other = ["kitten", "puppy", "sparrow", "trout", "pony", "calf", "lamb"]
    (tmp_path / "names.json").write_text(json.dumps(other))
    (tmp_path / "t.txt").write_text("{c}\n")
    rc, _, _ = _run(capsys, "--model", model_dir, "--data", root, "--classnames",
                    tmp_path / "names.json", "--templates", tmp_path / "t.txt", "--out", out)
    assert rc == 0
    _check(json.loads(out.read_text()), _expected(model, images, labels, other, ["{c}"]))


def test_label_outside_the_class_names_is_one_clear_line(pretrained, tmp_path, capsys):
    rng = np.random.default_rng(2)
    root = tmp_path / "bad"
    _write_clip_benchmark(root, [{"png": _png(_picture(rng, (16, 16))), "cls": 5}],
                          ["a", "b"], ["{c}"])
    rc, _, err = _run(capsys, "--model", pretrained("dual_tower"), "--data", root)
    assert rc == 2
    assert "has class 5" in err and "classnames.txt names 2 classes" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_sets_are_one_clear_line(pretrained, tmp_path, capsys):
    model_dir = pretrained("dual_tower")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noname" / "test").mkdir(parents=True)
    (tmp_path / "noname" / "test" / "0.tar").write_bytes(b"")
    for folder, words in (("missing", "not a folder"),
                          ("empty", "no zero-shot set found"),
                          ("noname", "CLIP_benchmark's layout needs classnames.txt")):
        rc, _, err = _run(capsys, "--model", model_dir, "--data", tmp_path / folder)
        assert rc == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- metrics and files
def test_classification_metrics_hand_worked():
    # 6 images, 4 classes (class 3 has no image: left out of the mean per-class recall)
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.5],   # label 0: top1 right
                           [0.2, 0.8, 0.1, 0.9],   # label 0: ranks 3, 1, 0, 2 -> 0 is 3rd
                           [0.1, 0.7, 0.3, 0.0],   # label 1: right
                           [0.5, 0.4, 0.3, 0.2],   # label 2: 3rd
                           [0.0, 0.0, 0.9, 0.1],   # label 2: right
                           [0.3, 0.3, 0.3, 0.9]])  # label 2: ties 0,1,2 -> 2 is 4th
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    got = classification_metrics(logits, targets, ks=(1, 2, 3, 5))
    assert got["top1"] == pytest.approx(100 * 3 / 6)
    assert got["top2"] == pytest.approx(100 * 3 / 6)
    assert got["top3"] == pytest.approx(100 * 5 / 6)
    assert got["top5"] == 100.0  # k capped at the 4 classes
    # recalls: class 0 1/2, class 1 1/1, class 2 1/3
    assert got["mean_per_class_recall"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 3) / 3)


@pytest.mark.parametrize("name,text,expected", [
    ("one.txt", "cat\n\ndog\nbig bird\n", ["cat", "dog", "big bird"]),
    ("map.tsv", "n2\tdog\nn1\tcat, tabby\nn3\tbig bird\n", ["cat, tabby", "dog", "big bird"]),
    ("LOC_synset_mapping.txt", "n1 cat, domestic cat\nn2 dog\nn3 big bird, fowl\n",
     ["cat", "dog", "big bird"]),
    ("list.json", '["cat", "dog", "big bird"]', ["cat", "dog", "big bird"]),
    ("map.json", '{"n3": "big bird", "n1": "cat", "n2": "dog"}', ["cat", "dog", "big bird"]),
    ("imagenet_class_index.json", '{"0": ["n1", "cat"], "2": ["n3", "big bird"], '
     '"1": ["n2", "dog"]}', ["cat", "dog", "big bird"]),
])
def test_classnames_formats(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    assert read_classnames(tmp_path / name, ["n1", "n2", "n3"]) == expected


def test_classnames_and_templates_errors(tmp_path):
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(EvalError, match="2 names for 3 class folders"):
        read_classnames(tmp_path / "two.txt", ["n1", "n2", "n3"])
    (tmp_path / "map.tsv").write_text("n1\tcat\nn2\tdog\n")
    with pytest.raises(EvalError, match="no name for 1 class folder.*'n3'"):
        read_classnames(tmp_path / "map.tsv", ["n1", "n2", "n3"])
    (tmp_path / "map.json").write_text('{"a": "cat"}')
    with pytest.raises(EvalError, match="label indexes"):
        read_classnames(tmp_path / "map.json")  # shards: keys must be label indexes
    (tmp_path / "t.txt").write_text("a photo of a {c}\na photo\n")
    with pytest.raises(EvalError, match=r"t.txt:2: template 'a photo' has no \{c\}"):
        read_templates(tmp_path / "t.txt")
    (tmp_path / "t.json").write_text('["a {} thing", "the {c}"]')
    assert read_templates(tmp_path / "t.json") == ["a {} thing", "the {c}"]
