"""Retrieval fine-tuning on the shapes world's Karpathy split: Recall@K against brute force with
5 captions per image, re-ranking order, the runs from dual_tower and combined checkpoints, the
results file, vlp.load(...) features and ITM scores equal to the evaluation's, and the clear
error for single-stream checkpoints."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlp
from vlp.cli import main
from vlp.config import ConfigError, FinetuneConfig, ModelConfig, to_dict
from vlp.eval.retrieval import recall_at_k
from vlp.data.karpathy import read_karpathy
from vlp.models.joint import JointEncoder
from vlp.tasks.retrieval import RetrievalHead, RetrievalModel, RetrievalTask, rerank_orders, \
    rsum

FT = ["train.steps=3", "train.batch_size=8", "train.save_every=2", "train.log_every=1",
      "eval.batch_size=16", "data.num_workers=0", "eval.split=test"]
KEYS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def brute_force_recall(sim: np.ndarray, text_to_image: np.ndarray, k: int) -> tuple[float, float]:
    """Independent reference: loops over queries, sorting each row by hand."""
    n_img, n_txt = sim.shape
    i2t = 0
    for i in range(n_img):
        ranked = sorted(range(n_txt), key=lambda j: -sim[i, j])[:k]
        i2t += any(text_to_image[j] == i for j in ranked)
    t2i = 0
    for j in range(n_txt):
        ranked = sorted(range(n_img), key=lambda i: -sim[i, j])[:k]
        t2i += text_to_image[j] in ranked
    return 100.0 * i2t / n_img, 100.0 * t2i / n_txt


def test_recall_five_captions_per_image_against_brute_force():
    rng = np.random.default_rng(0)
    n_img = 12
    text_to_image = rng.permutation(np.repeat(np.arange(n_img), 5))  # captions in any order
    # a signal so recalls are neither 0 nor 100: each caption leans towards its image
    sim = rng.normal(size=(n_img, 5 * n_img))
    sim[text_to_image, np.arange(5 * n_img)] += 1.2
    got = recall_at_k(torch.tensor(sim), torch.tensor(text_to_image))
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(sim, text_to_image, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@1"] < 100
    assert rsum(got) == pytest.approx(sum(got[k] for k in KEYS))


def test_rerank_orders_top_k_by_pair_score_rest_by_similarity():
    rng = np.random.default_rng(1)
    sim = torch.tensor(rng.uniform(-1, 1, size=(4, 9)), dtype=torch.float32)
    pair_score = torch.tensor(rng.normal(size=(4, 9)), dtype=torch.float32)
    k = 3
    matrix, top, scores = rerank_orders(sim, k, lambda r, c: pair_score[r, c], 5, "", False)
    for q in range(4):
        by_sim = sorted(range(9), key=lambda j: -float(sim[q, j]))
        head = sorted(by_sim[:k], key=lambda j: -float(pair_score[q, j]))
        expected = head + by_sim[k:]
        assert matrix[q].argsort(descending=True).tolist() == expected
        assert top[q].tolist() == head
        assert scores[q].tolist() == [float(pair_score[q, j]) for j in head]


def test_read_karpathy_flickr_style(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [
        {"filename": "1.jpg", "imgid": 7, "split": "test",
         "sentences": [{"raw": "a dog", "sentid": 35}, {"tokens": ["a", "cat"], "sentid": 36}]},
        {"filepath": "val2014", "filename": "2.jpg", "cocoid": 99, "imgid": 1, "split": "restval",
         "sentences": [{"raw": "x"}]}]}))
    a, b = read_karpathy(path)
    assert (a["image_id"], a["file"], a["captions"]) == (7, "1.jpg", [(35, "a dog"),
                                                                     (36, "a cat")])
    assert (b["image_id"], b["file"], b["captions"]) == (99, "val2014/2.jpg", [(2, "x")])
    path.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "test",
                                            "sentences": []}]}))
    with pytest.raises(ValueError, match="cocoid.*imgid"):
        read_karpathy(path)


def test_itm_hard_negatives_never_an_identical_caption(pretrained):
    backbone, tokenizer, _ = JointEncoder.from_pretrained(pretrained("combined"))
    head = RetrievalHead(train_itm=True)
    size = backbone.cfg.vision.image_size
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, size, size)
    ids, mask = tokenizer(["a red circle", "a red circle", "a blue square", "a green cross"], 32)
    for _ in range(5):  # the draw is random: captions 0 and 1 must never be each other's negative
        out = head(backbone, pixel_values=pixels, input_ids=ids, attention_mask=mask)
        assert out["itm_logits"].shape == (12, 2)
        assert out["itm_labels"].tolist() == [1] * 4 + [0] * 8
    # nothing but identical captions to draw from: the "negatives" are labelled matches
    ids, mask = tokenizer(["a red circle"] * 3, 32)
    out = head(backbone, pixel_values=pixels[:3], input_ids=ids, attention_mask=mask)
    assert out["itm_labels"].tolist() == [1] * 9


def _run(ft_world, pretrained, out, family, rerank_k):
    assert main(["finetune", "retrieval", "--out", str(out), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}",
                 f"retrieval.rerank_k={rerank_k}", *FT]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("family,rerank_k", [("dual_tower", 0), ("combined", 4)])
def test_retrieval_finetune_results_and_load(ft_world, pretrained, tmp_path, family, rerank_k):
    out = tmp_path / "retrieval"
    metrics = _run(ft_world, pretrained, out, family, rerank_k)
    assert metrics["train_steps"] == 3
    for key in KEYS + ["rsum"]:
        assert 0.0 <= metrics[key] <= 100.0 * (6 if key == "rsum" else 1)
        assert f"zeroshot_{key}" in metrics
        assert (f"{key}_rerank" in metrics) == (rerank_k > 0)
    if rerank_k:  # the combined checkpoint's ITM head is pretrained: a zero-shot re-ranking too
        assert "zeroshot_i2t_R@1_rerank" in metrics
    karpathy = read_karpathy(ft_world / "benchmarks" / "coco" / "dataset_coco.json")
    test = [r for r in karpathy if r["split"] == "test"]
    captions = [(cid, text) for r in test for cid, text in r["captions"]]
    assert metrics["retrieval_images"] == len(test) and len(test) > 10

    results = json.loads((out / "retrieval_test_results.json").read_text())
    assert results["split"] == "test"
    assert all(results["metrics"][k] == metrics[k] for k in results["metrics"])
    assert [q["image_id"] for q in results["i2t"]] == [r["image_id"] for r in test]
    assert [q["caption_id"] for q in results["t2i"]] == [c[0] for c in captions]
    caption_ids = {c[0] for c in captions}
    for q in results["i2t"]:
        assert len(q["top10"]) == 10 and set(q["top10"]) <= caption_ids
    for q in results["t2i"]:
        assert len(q["top10"]) == 10 and set(q["top10"]) <= {r["image_id"] for r in test}

    # vlp.load gives the features the evaluation ranked with: same scores, same recalls
    model = vlp.load(out / "model")
    assert isinstance(model, RetrievalModel)
    images = [Image.open(ft_world / "benchmarks" / r["file"]) for r in test]
    img = model.encode_image(images)
    txt = model.encode_text([c[1] for c in captions])
    sim = img @ txt.T
    text_to_image = torch.tensor([i for i, r in enumerate(test) for _ in r["captions"]])
    again = recall_at_k(sim, text_to_image)
    for key in KEYS:
        assert again[key] == pytest.approx(metrics[key])
    # the zero-shot baseline is the starting checkpoint's own towers (vlp.load of its directory)
    start = vlp.load(pretrained(family))
    start_sim = start.encode_image(images) @ start.encode_text([c[1] for c in captions]).T
    zeroshot = recall_at_k(start_sim, text_to_image)
    for key in KEYS:
        assert zeroshot[key] == pytest.approx(metrics[f"zeroshot_{key}"])
    index = {c[0]: j for j, c in enumerate(captions)}
    for i, q in enumerate(results["i2t"]):
        assert [float(sim[i, index[c]]) for c in q["top10"]] == pytest.approx(q["scores"],
                                                                             abs=1e-5)
        assert q["scores"][0] == pytest.approx(float(sim[i].max()), abs=1e-5)

    if rerank_k:
        q = results["i2t"][0]
        assert len(q["top10_rerank"]) == 10
        # the first rerank_k were re-ordered by ITM: the same set as the similarity top k
        assert set(q["top10_rerank"][:rerank_k]) == set(q["top10"][:rerank_k])
        texts = [captions[index[c]][1] for c in q["top10_rerank"][:rerank_k]]
        scores = model.itm_scores(images[0], texts)
        assert scores.tolist() == pytest.approx(q["itm_scores"][:rerank_k], abs=1e-4)
        assert [i for i, _ in model.rerank(images[0], texts)] == list(range(rerank_k))
    else:
        with pytest.raises(ValueError, match="rerank_k=0"):
            model.itm_scores(images[0], ["a red circle"])


def test_single_stream_backbone_is_a_clear_error():
    # a single-stream backbone as JointEncoder.from_pretrained builds it (random weights: the task
    # refuses it before reading anything)
    model = ModelConfig()
    model.visual_tokens = "patches"
    backbone = JointEncoder({"architecture": "single_stream", "model": to_dict(model)}, 100)
    cfg = FinetuneConfig(task="retrieval", init_from="runs/vlbert/model")
    with pytest.raises(ConfigError, match="dual_tower or combined checkpoint.*ITM"):
        RetrievalTask(cfg, backbone, None, None, None)
