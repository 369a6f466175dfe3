"""Recall@K against brute force; `vlp eval retrieval --karpathy` (and --rerank-k) against an
independent computation on the shapes world's Karpathy file."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vlp
from vlp.cli import main
from vlp.eval.retrieval import chance_levels, recall_at_k
from vlp.models.joint import JointEncoder


def _brute_force(sim: np.ndarray, txt2img: np.ndarray, k: int):
    n_img, n_txt = sim.shape
    i2t = 0
    for i in range(n_img):
        top = np.argsort(-sim[i], kind="stable")[:k]
        i2t += any(txt2img[t] == i for t in top)
    t2i = 0
    for t in range(n_txt):
        top = np.argsort(-sim[:, t], kind="stable")[:k]
        t2i += txt2img[t] in top
    return 100 * i2t / n_img, 100 * t2i / n_txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_img = 40
    txt2img = np.repeat(np.arange(n_img), 5)
    rng.shuffle(txt2img)
    img = rng.normal(size=(n_img, 8))
    txt = img[txt2img] + rng.normal(scale=1.5, size=(len(txt2img), 8))  # noisy, so ranks vary
    sim = img @ txt.T
    got = recall_at_k(torch.tensor(sim), torch.tensor(txt2img), ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(sim, txt2img, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@1"] < 100


def test_perfect_and_chance():
    txt2img = torch.arange(4).repeat_interleave(2)
    sim = (torch.arange(4)[:, None] == txt2img[None]).float()
    got = recall_at_k(sim, txt2img)
    assert got["i2t_R@1"] == 100 and got["t2i_R@1"] == 100
    c = chance_levels({"num_images": 1000, "num_texts": 5000})
    assert c["t2i_R@1"] == pytest.approx(0.1)
    assert c["i2t_R@1"] == pytest.approx(0.1)  # 5 positives among 5000 texts


# --------------------------------------------------------------------------- Karpathy splits
# `vlp eval retrieval --karpathy` on the shapes world's benchmarks/coco/dataset_coco.json,
# against recalls computed independently: the file read with json, images opened with PIL,
# the public encode_image / encode_text, and ranking loops (re-ranking: the ITM log-odds of
# each pair computed one query at a time, the top k re-sorted by hand).
KEYS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def _karpathy_test_split(world):
    path = world / "benchmarks" / "coco" / "dataset_coco.json"
    return path, [im for im in json.loads(path.read_text())["images"] if im["split"] == "test"]


def _eval(capsys, *args) -> tuple[int, str]:
    rc = main(["eval", "retrieval", *map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err


def _ranked_recalls(orders_i2t, orders_t2i, text_to_image, ks=(1, 5, 10)) -> dict:
    """Recall@K from explicit rankings (lists of column indexes, best first)."""
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * np.mean([any(text_to_image[j] == i for j in order[:k])
                                             for i, order in enumerate(orders_i2t)])
        out[f"t2i_R@{k}"] = 100.0 * np.mean([text_to_image[j] in order[:k]
                                             for j, order in enumerate(orders_t2i)])
    return out


def test_karpathy_recalls_against_independent_computation(ft_world, pretrained, tmp_path,
                                                          capsys):
    model_dir = pretrained("dual_tower")
    karpathy, test = _karpathy_test_split(ft_world)
    # a copy of the images with one test image corrupt: it and its captions are left out
    shutil.copytree(ft_world / "benchmarks" / "images", tmp_path / "bench" / "images")
    images = tmp_path / "bench"
    (images / test[2]["filepath"] / test[2]["filename"]).write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "m.json"
    rc, _ = _eval(capsys, "--model", model_dir, "--karpathy", karpathy, "--images", images,
                  "--split", "test", "--batch-size", "5", "--out", out)
    assert rc == 0
    got = json.loads(out.read_text())

    kept = test[:2] + test[3:]
    model = vlp.load(model_dir)
    pictures = []
    for im in kept:
        with Image.open(images / im["filepath"] / im["filename"]) as f:
            pictures.append(f.convert("RGB"))
    captions = [(s["raw"], i) for i, im in enumerate(kept) for s in im["sentences"]]
    sim = (model.encode_image(pictures) @ model.encode_text([c for c, _ in captions]).T).numpy()
    text_to_image = np.array([i for _, i in captions])
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(sim, text_to_image, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert got["rsum"] == pytest.approx(sum(got[k] for k in KEYS))
    assert (got["num_images"], got["num_texts"]) == (len(test) - 1, 5 * (len(test) - 1))
    assert got["skipped"] == 1 and got["skipped_corrupt_image"] == 1
    assert not any(k.endswith("_rerank") for k in got)


def test_karpathy_rerank_against_independent_itm_ordering(ft_world, pretrained, tmp_path,
                                                          capsys):
    model_dir, k = pretrained("combined"), 4
    karpathy, test = _karpathy_test_split(ft_world)
    out = tmp_path / "m.json"
    rc, _ = _eval(capsys, "--model", model_dir, "--karpathy", karpathy, "--images",
                  ft_world / "benchmarks", "--rerank-k", k, "--out", out)
    assert rc == 0
    got = json.loads(out.read_text())

    model = vlp.load(model_dir)  # the towers, from model.safetensors
    encoder, tokenizer, transform = JointEncoder.from_pretrained(model_dir)  # + fusion, ITM
    core = encoder.core.eval()
    pictures = []
    for im in test:
        with Image.open(ft_world / "benchmarks" / im["filepath"] / im["filename"]) as f:
            pictures.append(f.convert("RGB"))
    captions = [(s["raw"], i) for i, im in enumerate(test) for s in im["sentences"]]
    texts = [c for c, _ in captions]
    text_to_image = [i for _, i in captions]
    sim = (model.encode_image(pictures) @ model.encode_text(texts).T).numpy()
    with torch.no_grad():
        image_tokens = core.towers.visual.forward_features(
            torch.stack([transform(p) for p in pictures]))
        ids, mask = tokenizer(texts, core.towers.cfg.text.context_length)
        text_tokens = core.towers.text.forward_features(ids, mask)

        def log_odds(i, j_list):
            logits = core.itm_logits(text_tokens[j_list], mask[j_list],
                                     image_tokens[[i] * len(j_list)])
            return (logits[:, 1] - logits[:, 0]).tolist()

    def rerank(row, score):  # top k by similarity re-sorted by ITM score, then the rest
        order = sorted(range(len(row)), key=lambda j: -row[j])
        top = order[:k]
        scores = score(top)
        moved = sorted(range(k), key=lambda a: -scores[a])
        return [top[a] for a in moved] + order[k:], moved != list(range(k))

    i2t = [rerank(sim[i], lambda js, i=i: log_odds(i, js)) for i in range(len(test))]
    t2i = [rerank(sim[:, j], lambda is_, j=j: [log_odds(i, [j])[0] for i in is_])
           for j in range(len(texts))]
    want = _ranked_recalls([o for o, _ in i2t], [o for o, _ in t2i], text_to_image)
    assert any(moved for _, moved in i2t + t2i)  # the ITM head did re-order something
    for key in KEYS:
        assert got[f"{key}_rerank"] == pytest.approx(want[key]), key
    plain = recall_at_k(torch.tensor(sim), torch.tensor(text_to_image))
    for key in KEYS:
        assert got[key] == pytest.approx(plain[key])
    assert got["rsum_rerank"] == pytest.approx(sum(want.values()))
    assert got["rerank_k"] == k


def test_karpathy_bad_input_is_one_clear_line(ft_world, pretrained, tmp_path, capsys):
    karpathy, _ = _karpathy_test_split(ft_world)
    dual, images = pretrained("dual_tower"), ft_world / "benchmarks"
    for args, words in (
            (["--karpathy", karpathy, "--images", images, "--rerank-k", 3],
             "re-ranking needs fusion layers and an ITM head"),
            (["--karpathy", karpathy], "--karpathy needs --images DIR"),
            (["--karpathy", karpathy, "--images", images, "--data", images],
             "needs one of --data SHARDS"),
            (["--karpathy", karpathy, "--images", images, "--split", "dev"],
             "no images with captions in split 'dev' (splits present: ['restval', 'test', "
             "'train', 'val'])"),
            (["--karpathy", karpathy, "--images", tmp_path], "none of the 16 test images"),
            (["--data", images, "--rerank-k", 3], "go with --karpathy")):
        rc, err = _eval(capsys, "--model", dual, *args)
        assert rc == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("family,rerank_k", [("dual_tower", 0), ("combined", 4)])
def test_karpathy_eval_equals_the_retrieval_finetuning_evaluation(ft_world, pretrained,
                                                                  tmp_path, capsys, family,
                                                                  rerank_k):
    """One protocol: the fine-tuning's own evaluation (vlp/tasks/retrieval.py, of its final
    model and, as `zeroshot_*`, of the starting checkpoint) equals `vlp eval retrieval
    --karpathy` on the fine-tuned model directory and on the checkpoint."""
    run = tmp_path / "ft"
    assert main(["finetune", "retrieval", "--out", str(run), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}",
                 f"retrieval.rerank_k={rerank_k}", "train.steps=2", "train.batch_size=8",
                 "train.save_every=0", "eval.batch_size=16", "data.num_workers=0",
                 "eval.split=test"]) == 0
    task = json.loads((run / "metrics.json").read_text())
    karpathy, _ = _karpathy_test_split(ft_world)
    keys = KEYS + ["rsum"] + ([f"{k}_rerank" for k in KEYS] + ["rsum_rerank"] if rerank_k else [])
    for model_dir, prefix in ((run / "model", ""), (pretrained(family), "zeroshot_")):
        out = tmp_path / f"{prefix}eval.json"
        rc, _ = _eval(capsys, "--model", model_dir, "--karpathy", karpathy, "--images",
                      ft_world / "benchmarks", "--rerank-k", rerank_k, "--out", out)
        assert rc == 0
        got = json.loads(out.read_text())
        for key in keys:
            assert got[key] == pytest.approx(task[prefix + key]), prefix + key
