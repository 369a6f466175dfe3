"""Single-stream (VL-BERT) pretraining: masking by hand-checkable rules, the joint sequence, and
short real runs of `vlp pretrain recipe=single_stream` for each kind of visual token."""
import json

import pytest
import torch

from vlp.cli import main
from vlp.config import ModelConfig
from vlp.data.synth import generate
from vlp.objectives.masking import IGNORE, mask_regions, mask_tokens, mismatch_pairs
from vlp.models.single_stream import SingleStream

SPECIAL = torch.tensor([0, 2, 3, 4])  # pad, cls, sep, mask
MASK_ID, VOCAB = 4, 50


def _ids(b=200, n=30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (b, n), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    ids[:, 20:-1], mask[:, 20:-1] = 0, 0  # padding in the middle of the row: never chosen
    return ids, mask


def test_mask_tokens_follows_bert_rules():
    ids, mask = _ids(b=2000)
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, mask, prob=0.15, special_ids=SPECIAL, mask_id=MASK_ID,
                              vocab_size=VOCAB, generator=g)
    chosen = labels != IGNORE
    candidates = mask.bool() & ~torch.isin(ids, SPECIAL)
    assert not (chosen & ~candidates).any()  # never [CLS]/[SEP]/padding
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(out[~chosen], ids[~chosen])  # nothing else changes
    rate = chosen.sum() / candidates.sum()
    assert abs(float(rate) - 0.15) < 0.01
    n = int(chosen.sum())
    as_mask = int((out[chosen] == MASK_ID).sum())
    unchanged = int((out[chosen] == ids[chosen]).sum())
    assert abs(as_mask / n - 0.8) < 0.02
    # 10% kept on purpose plus random draws that hit the same token (1/50 of 10%)
    assert abs(unchanged / n - (0.1 + 0.1 / VOCAB)) < 0.02
    assert not torch.isin(out[chosen & (out != MASK_ID)], SPECIAL).any()


def test_whole_word_masking_takes_all_pieces():
    ids, mask = _ids(b=500)
    continuation = torch.zeros(VOCAB, dtype=torch.bool)
    continuation[30:] = True  # ids >= 30 are '##' pieces of the token before them
    g = torch.Generator().manual_seed(2)
    _, labels = mask_tokens(ids, mask, prob=0.3, special_ids=SPECIAL, mask_id=MASK_ID,
                            vocab_size=VOCAB, continuation=continuation, generator=g)
    chosen = labels != IGNORE
    pieces = continuation[ids] & mask.bool()
    # a continuation piece is chosen exactly when the token before it is (same word)
    follows = pieces[:, 1:] & mask.bool()[:, :-1] & ~torch.isin(ids[:, :-1], SPECIAL)
    assert torch.equal(chosen[:, 1:][follows], chosen[:, :-1][follows])
    assert chosen.any()


def test_mismatch_pairs_and_regions():
    ids = torch.arange(40).reshape(8, 5)
    ids[3] = ids[4]  # two samples with the same caption
    g = torch.Generator().manual_seed(0)
    index, labels = mismatch_pairs(ids, 1.0, generator=g)  # every image gets another text...
    assert (index != torch.arange(8)).all()
    # ...which still counts as matched when it is token for token its own caption
    assert torch.equal(labels, (ids[index] == ids).all(1).long())
    index, labels = mismatch_pairs(ids, 0.0)
    assert torch.equal(index, torch.arange(8)) and labels.all()
    region_mask = torch.tensor([[True, True, False], [True, False, False]])
    chosen = mask_regions(region_mask, 1.0)
    assert torch.equal(chosen, region_mask)  # padded regions are never masked


@pytest.mark.parametrize("kind", ["patches", "regions", "roi_align"])
def test_joint_sequence_and_blanked_visual_tokens(kind):
    cfg = ModelConfig(visual_tokens=kind)
    cfg.vision.width, cfg.vision.layers = 32, 1
    cfg.fusion.width, cfg.fusion.layers, cfg.fusion.heads = 32, 2, 2
    torch.manual_seed(0)
    model = SingleStream(cfg, vocab_size=VOCAB, region_feature_dim=12, num_region_labels=5).eval()
    ids, mask = _ids(b=3, n=10)
    visual = {"pixel_values": torch.randn(3, 3, 64, 64),
              "region_features": torch.randn(3, 4, 12),
              "region_boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]).repeat(3, 4, 1),
              "region_mask": torch.tensor([[1, 1, 1, 0]] * 3).bool()}
    noise = torch.Generator().manual_seed(1)
    other = {k: (v + torch.randn(v.shape, generator=noise)
                 if v.dtype == torch.float32 and k != "region_boxes" else v)
             for k, v in visual.items()}
    h, _ = model.hidden_states(ids, mask, **visual)
    n_visual = 64 // 8 * (64 // 8) if kind == "patches" else 4
    assert h.shape == (3, 10 + n_visual + 1, 32)  # [CLS] text [SEP] pad | visual | [END]
    h_other, _ = model.hidden_states(ids, mask, **other)
    assert not torch.allclose(h[:, :10], h_other[:, :10])  # text sees the image
    blank, _ = model.hidden_states(ids, mask, blank_visual=True, **visual)
    blank_other, _ = model.hidden_states(ids, mask, blank_visual=True, **other)
    torch.testing.assert_close(blank[:, :10], blank_other[:, :10])  # text-only: blind to it
    if kind != "patches":  # a padded region changes nothing
        padded = dict(visual, region_features=visual["region_features"].clone())
        padded["region_features"][:, 3] += 5
        h_pad, _ = model.hidden_states(ids, mask, **padded)
        torch.testing.assert_close(h_pad[:, :10], h[:, :10])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 2] = ids[:, 2]
    out = model(ids, mask, task="masked", mlm_labels=labels,
                masked_regions=visual["region_mask"] if kind != "patches" else None, **visual)
    assert out["mlm_logits"].shape == (3, VOCAB)
    if kind != "patches":
        assert out["mrc_logits"].shape == (9, 5) and out["mrfr_pred"].shape[0] == 9
    assert model(ids, mask, task="itm", **visual)["itm_logits"].shape == (3, 2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=192, val_images=32, benchmark_images=0, shard_size=24, progress=False)
    return root


TINY = ["recipe=single_stream", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.fusion.width=32", "model.fusion.layers=2",
        "model.fusion.heads=2", "model.max_regions=6", "tokenizer.vocab_size=200",
        "train.batch_size=16", "train.log_every=1", "train.save_every=0", "train.steps=3"]


@pytest.mark.parametrize("kind", ["patches", "regions", "roi_align"])
def test_single_stream_runs(shapes, tmp_path, kind):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 f"data.val={shapes}/val", f"model.visual_tokens={kind}", *TINY]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all("mlm_loss" in r and "itm_acc" in r for r in steps)
    if kind != "patches":
        assert all("mrc_loss" in r and "mrfr_loss" in r for r in steps)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mlm_acc", "mlm_text_only_acc", "attr_mlm_acc", "itm_acc"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["num_samples"] == 32
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architecture"] == "single_stream"


def test_regions_without_region_files_names_the_fix(shapes, tmp_path, capsys):
    import shutil
    import tarfile

    bare = tmp_path / "bare"
    bare.mkdir()
    with tarfile.open(shapes / "train" / "00000.tar") as src, \
            tarfile.open(bare / "00000.tar", "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".regions.npz"):
                dst.addfile(member, src.extractfile(member))
    shutil.copy(bare / "00000.tar", bare / "00001.tar")
    rc = main(["pretrain", "--out", str(tmp_path / "run"), "--no-progress",
               f"data.train={bare}", "data.num_workers=1", "model.visual_tokens=regions", *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "regions.npz" in err and "vlp data regions" in err


def test_vlp_data_regions_tool(shapes, tmp_path):
    """`vlp data regions` writes .regions.npz from a model's vision tower and the json boxes;
    the shards it writes train `model.visual_tokens=regions` directly."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    import vlp
    from vlp.api import Pretrained
    from vlp.data.shards import expand_urls
    from vlp.data.transforms import ImageTransform
    from vlp.models import DualTower
    from vlp.models.regions import RoIRegionFeatures
    from vlp.data.pipeline import iter_captions
    from vlp.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_captions(expand_urls(f"{shapes}/train")), vocab_size=200)
    cfg = ModelConfig()
    cfg.vision.width, cfg.vision.layers, cfg.vision.heads = 32, 1, 2
    cfg.text.width, cfg.text.layers, cfg.text.heads = 32, 1, 2
    torch.manual_seed(0)
    model_dir = Pretrained(DualTower(cfg, tok.vocab_size), tok,
                           ImageTransform(64, train=False)).save(tmp_path / "model")
    out = tmp_path / "with_regions"
    assert main(["data", "regions", "--model", str(model_dir), "--data", f"{shapes}/val",
                 "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    with tarfile.open(out / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = sorted(n for n in members if n.endswith(".jpg"))[0][:-4]
    npz = np.load(io.BytesIO(members[f"{key}.regions.npz"]))
    meta = json.loads(members[f"{key}.json"])
    assert npz["features"].shape == (len(meta["objects"]), 32)
    np.testing.assert_array_equal(npz["boxes"], [o["box"] for o in meta["objects"]])
    names = json.loads((shapes / "MANIFEST.json").read_text())["regions"]["object_labels"]
    assert npz["labels"].tolist() == [names.index(o["label"]) for o in meta["objects"]]
    # the features are the vision tower's patch grid pooled over the boxes
    loaded = vlp.load(model_dir)
    image = Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB")
    with torch.no_grad():
        tokens = loaded.model.visual.forward_features(loaded.transform(image)[None])[:, 1:]
        grid = tokens.transpose(1, 2).reshape(1, 32, 8, 8)
        boxes, _ = loaded.transform.map_boxes(np.asarray(npz["boxes"]), image.size)
        want = RoIRegionFeatures()(grid, torch.as_tensor(boxes)[None],
                                   torch.ones(1, len(boxes), dtype=torch.bool))[0]
    np.testing.assert_allclose(npz["features"], want.numpy(), rtol=1e-5, atol=1e-6)
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--no-progress", f"data.train={out}",
                 "data.num_workers=1", "eval.at_end=false", "model.visual_tokens=regions",
                 *TINY]) == 0
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["region_feature_dim"] == 32 and config["region_labels"] == names


def test_hard_negatives_follow_similarity():
    from vlp.objectives.matching import hard_negatives

    sim = torch.tensor([[9.0, 8.0, -9.0], [0.0, 9.0, 0.0], [-9.0, 8.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(sim, generator=g) for _ in range(200)])
    assert (draws != torch.arange(3)).all()  # never the positive
    assert (draws[:, 0] == 1).float().mean() > 0.99  # row 0: column 1 is far more similar
    assert 0.3 < (draws[:, 1] == 0).float().mean() < 0.7  # row 1: a tie between 0 and 2


def test_combined_recipe_runs(shapes, tmp_path):
    import vlp

    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 f"data.val={shapes}/val", "recipe=combined", "model.embed_dim=32",
                 "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
                 "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
                 "model.text.mask=bidirectional", "model.text.pool=cls",
                 "model.fusion.width=32", "model.fusion.layers=1", "model.fusion.heads=2",
                 "tokenizer.vocab_size=200", "train.batch_size=16", "train.log_every=1",
                 "train.save_every=0", "train.steps=3"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "event" not in r]
    assert all(k in steps[-1] for k in ("itc_loss", "itm_acc", "mlm_loss"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("i2t_R@1", "attr_mlm_acc", "attr_mlm_text_only_acc", "itm_acc"):
        assert key in metrics
    towers = vlp.load(out / "model")  # the dual tower part loads like a dual-tower run's
    assert towers.encode_text(["a red circle"]).shape == (1, 32)


def test_combined_config_errors(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "recipe=combined"]) == 2
    assert "model.text.mask=bidirectional" in capsys.readouterr().err


def test_attribute_words_found_after_the_tokenizer_padded(shapes):
    from vlp.data.shards import expand_urls
    from vlp.eval.single_stream import attribute_token_ids
    from vlp.data.pipeline import iter_captions
    from vlp.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_captions(expand_urls(f"{shapes}/train")), vocab_size=200)
    before = attribute_token_ids(tok)
    tok(["a red circle"], 16)  # turns on padding to 16 in the HF tokenizer
    assert len(before) >= 8 and torch.equal(attribute_token_ids(tok), before)
