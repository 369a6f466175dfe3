"""Captioning: the searches against greedy and brute force, the prefix-LM mask on every backbone
kind, LM targets, and fine-tuning end to end (results file, baseline, vlp.load(...).caption)."""
import itertools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import vlp
from vlp.cli import main
from vlp.config import ConfigError, FinetuneConfig, ModelConfig, load_config, to_dict
from vlp.models.joint import JointEncoder
from vlp.models.joint import FinetunedModel
from vlp.models.heads.caption import CaptionHead, beam_search, greedy_search
from vlp.tasks.caption import caption_step, lm_inputs, most_frequent_caption, special_ids
from vlp.tokenizer import train_tokenizer

PAD, BOS, EOS, MASK = 0, 1, 2, 3  # the toy vocabulary's special ids; words are 4..V-1
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="the COCO caption metrics need Java")


def hashed_scorer(vocab: int, seed: int = 0):
    """A deterministic step function: the logits depend on (image, prefix) only, drawn from a
    generator seeded by them (so any search sees the same scores for the same prefix)."""
    def step(tokens, images):
        rows = []
        for prefix, image in zip(tokens.tolist(), images.tolist()):
            g = torch.Generator().manual_seed(hash((seed, image, *prefix)) % (2 ** 31))
            rows.append(torch.randn(vocab, generator=g) * 2.0)
        return torch.stack(rows)
    return step


def brute_force(step, image: int, vocab: int, max_length: int, length_penalty: float,
                banned=(PAD, BOS, MASK), min_length: int = 1):
    """The best sequence by enumeration: every word sequence shorter than max_length ended by
    [SEP] (after at least min_length words), and every max_length words without one; scored
    as the searches define (log_softmax over the whole vocabulary, then bans)."""
    words = [w for w in range(vocab) if w not in banned and w != EOS]

    def logp(prefix, token):
        logits = step(torch.tensor([[BOS, *prefix]]), torch.tensor([image]))[0]
        return float(F.log_softmax(logits.float(), -1)[token])

    best = (-math.inf, None)
    for n in range(min_length, max_length + 1):
        for seq in itertools.product(words, repeat=n):
            total = sum(logp(seq[:k], seq[k]) for k in range(n))
            if n < max_length:
                total += logp(seq, EOS)
                length = n + 1
            else:
                length = n
            score = total / length ** length_penalty
            if score > best[0]:
                best = (score, list(seq))
    return best[1]


def test_beam_size_one_is_greedy():
    step = hashed_scorer(9)
    common = dict(bos_id=BOS, eos_id=EOS, max_length=7, banned_ids=(PAD, BOS, MASK))
    greedy = greedy_search(step, 5, **common)
    assert greedy == beam_search(step, 5, beam_size=1, length_penalty=1.0, **common)
    assert all(PAD not in s and BOS not in s and MASK not in s and EOS not in s
               for s in greedy)
    assert all(1 <= len(s) <= 7 for s in greedy)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_is_brute_force(length_penalty):
    vocab, max_length = 6, 4  # words 4, 5: 2 + 4 + 8 + 16 + 16 sequences per image
    step = hashed_scorer(vocab, seed=3)
    found = beam_search(step, 3, bos_id=BOS, eos_id=EOS, beam_size=64, max_length=max_length,
                        length_penalty=length_penalty, banned_ids=(PAD, BOS, MASK))
    assert found == [brute_force(step, i, vocab, max_length, length_penalty) for i in range(3)]


def test_beam_finds_what_greedy_misses():
    """Word 4 is likelier first (0.6 vs 0.4) but every continuation after it is unsure; after
    word 5 the caption ends with p=0.99: greedy says [4, ...], beam 2 and brute force say [5]."""
    table = {(): [0.6, 0.4, 0.0], (4,): [0.34, 0.33, 0.33], (5,): [0.005, 0.005, 0.99]}

    def step(tokens, images):
        rows = []
        for prefix in tokens.tolist():
            p4, p5, peos = table.get(tuple(prefix[1:]), [0.3, 0.3, 0.4])
            p = torch.full((6,), 1e-9)
            p[4], p[5], p[EOS] = p4, p5, peos
            rows.append(p.log())
        return torch.stack(rows)

    common = dict(bos_id=BOS, eos_id=EOS, max_length=3, banned_ids=(PAD, BOS, MASK))
    assert greedy_search(step, 1, **common)[0][0] == 4
    assert beam_search(step, 1, beam_size=2, length_penalty=0.0, **common) == [[5]]
    assert brute_force(step, 0, 6, 3, 0.0) == [5]


def _backbone(kind: str) -> JointEncoder:
    """A tiny random backbone of each kind (the mask is a property of the code, not weights)."""
    cfg = ModelConfig()
    for tower in (cfg.vision, cfg.text, cfg.fusion):
        tower.width, tower.layers, tower.heads = 32, 2, 2
    cfg.vision.image_size, cfg.vision.patch_size, cfg.max_regions = 32, 8, 5
    spec = {"architecture": {"regions": "single_stream", "patches": "single_stream"}.get(
        kind, kind), "region_feature_dim": 12 if kind == "regions" else 0}
    if kind in ("regions", "patches"):
        cfg.visual_tokens = kind
    if kind == "combined":  # a bidirectional text tower: causal_text must make it causal
        cfg.text.mask, cfg.text.pool = "bidirectional", "cls"
    if kind == "dual_tower":
        spec["fusion"] = {"layers": 2, "heads": 2}
    spec["model"] = to_dict(cfg)
    torch.manual_seed(0)
    return JointEncoder(spec, vocab_size=40).eval()


@pytest.mark.parametrize("kind", ["regions", "patches", "combined", "dual_tower"])
def test_prefix_lm_hides_future_words(kind):
    backbone = _backbone(kind)
    model = FinetunedModel(backbone, CaptionHead()).eval()
    g = torch.Generator().manual_seed(1)
    B, L, j = 2, 9, 5
    visual = {"pixel_values": torch.randn(B, 3, 32, 32, generator=g)}
    if kind == "regions":
        xy = torch.rand(B, 5, 2, generator=g) * 0.5
        visual = {"region_features": torch.randn(B, 5, 12, generator=g),
                  "region_boxes": torch.cat([xy, xy + 0.4], -1),
                  "region_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()}
    ids = torch.randint(5, 40, (B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[:, j] = (ids[:, j] - 5 + 7) % 35 + 5  # another word
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, visual=visual)["logits"]  # (B, L, V)
        b = model(input_ids=changed, attention_mask=mask, visual=visual)["logits"]
        assert (a[:, :j] - b[:, :j]).abs().max() < 1e-6  # exactly equal here, in fact
        assert (a[:, j] - b[:, j]).abs().max() > 1e-2
        # without the prefix-LM mask word j does reach earlier positions (random weights: a
        # small but clear change), so the check above can fail
        full = backbone.mlm_head(backbone(ids, mask, visual))
        full_changed = backbone.mlm_head(backbone(changed, mask, visual))
        assert (full[:, :j] - full_changed[:, :j]).abs().max() > 1e-5
        # decoding's path (visual tokens encoded once, rows picked per step) gives the same
        step, n, _ = caption_step(model, visual)
        assert n == B
        assert torch.allclose(step(ids[:, :j + 1], torch.arange(B)), a[:, j], atol=1e-5)
        assert torch.allclose(step(ids[[1, 1, 0], :3], torch.tensor([1, 1, 0])),
                              a[[1, 1, 0], 2], atol=1e-5)


def test_lm_inputs_shift_and_special_ids():
    tokenizer = train_tokenizer(["a red circle", "two blue squares left of a circle"] * 20,
                                vocab_size=60)
    bos, eos, banned = special_ids(tokenizer)
    assert (bos, eos) == (tokenizer.cls_id, tokenizer.sep_id)
    assert {tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id} <= set(banned)
    assert eos not in banned
    short = "a red circle"
    long = " ".join(["a red circle"] * 10)
    ids, mask, labels = lm_inputs(tokenizer, [short, long], 6)
    words = [i for i in tokenizer.hf.encode(short, add_special_tokens=False).ids
             if i != tokenizer.pad_id]  # (the tokenizer keeps its last padding setting)
    n = len(words)
    assert ids[0, :n + 2].tolist() == [bos, *words, eos]
    assert labels[0].tolist() == [*words, eos] + [-100] * (6 - n - 1)
    assert mask[0].tolist() == [1] * (n + 2) + [0] * (6 - n - 2)
    # cut at max_length: the targets still end in [SEP], every input position is scored
    assert ids[1, 0] == bos and labels[1, -1] == eos and (labels[1] != -100).all()
    assert ids[1, 1:].tolist() == labels[1, :-1].tolist()


def test_most_frequent_caption():
    assert most_frequent_caption(["b x", "a  x", "b x", "a x", "c"]) == "a x"  # tie: a < b
    assert most_frequent_caption(["z", "y", "z"]) == "z"


def test_config_and_length_check(tmp_path):
    cfg = load_config("configs/finetune/caption_shapes.yaml", cls=FinetuneConfig)
    assert cfg.task == "caption" and cfg.caption.beam_size >= 1
    from vlp.tasks.caption import check_max_length

    with pytest.raises(ConfigError, match="caption.max_length=99"):
        check_max_length(_backbone("regions"), 99)


class _NoMeteor:
    """METEOR's Java process spends ~20 s loading its paraphrase table, longer than the rest of
    this file; the metric itself is checked against pycocoevalcap in test_caption_metric.py."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(res)


# one thread: on a shared 2-core machine two threads of tiny ops mostly wait for each other
FT = ["train.steps=3", "train.threads=1", "train.batch_size=8", "train.save_every=2",
      "train.log_every=1", "eval.batch_size=6", "data.num_workers=0", "eval.split=test",
      "caption.max_length=12", "caption.beam_size=2"]


@needs_java
@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_caption_finetune_load_caption(ft_world, pretrained, tmp_path, family, monkeypatch):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", _NoMeteor)
    out = tmp_path / "caption"
    assert main(["finetune", "caption", "--out", str(out), "--no-progress",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}", *FT]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3
    for key in ("BLEU_4", "CIDEr", "ROUGE_L", "caption_constant_CIDEr",
                "caption_constant_BLEU_4"):
        assert 0.0 <= metrics[key] <= 1000.0, key
    bench = ft_world / "benchmarks"
    karpathy = json.loads((bench / "coco" / "dataset_coco.json").read_text())["images"]
    test = [im for im in karpathy if im["split"] == "test"]
    results = json.loads((out / "caption_test_results.json").read_text())
    assert [r["image_id"] for r in results] == [im["cocoid"] for im in test]
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str)
               and r["caption"].strip() and "[" not in r["caption"] and " ##" not in r["caption"]
               for r in results)
    assert metrics["num_images"] == len(test) and metrics["caption_fallback_captions"] == 0

    model = vlp.load(out / "model")
    regions = (lambda im: bench / "regions" / f"{im['cocoid']:012d}.npz") \
        if family == "regions" else (lambda im: None)
    first = test[0]
    got = model.caption(bench / first["filepath"] / first["filename"], regions=regions(first))
    assert got == results[0]["caption"]
    batch = model.captions([bench / im["filepath"] / im["filename"] for im in test[:4]],
                           regions=None if family != "regions" else
                           [regions(im) for im in test[:4]])
    assert batch == [r["caption"] for r in results[:4]]
    # on the real model too: beam_size=1 decodes exactly as greedy search
    from vlp.data.batch import Batch
    from vlp.data.visual import collate_visual

    items = [model.reader.read(bench / im["filepath"] / im["filename"],
                               regions_file=regions(im)) for im in test[:4]]
    step, n, _ = caption_step(model.model, Batch(["x"] * 4, **collate_visual(items)).visual())
    bos, eos, banned = special_ids(model.tokenizer)
    common = dict(bos_id=bos, eos_id=eos, max_length=12, banned_ids=banned)
    with torch.no_grad():
        assert greedy_search(step, n, **common) == beam_search(step, n, beam_size=1, **common)
