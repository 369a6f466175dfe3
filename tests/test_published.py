"""Issue 12: the checkpoints people have reach every task. A random `CLIPModel` shaped like a
published CLIP (vision width 64, text width 48: unequal, as in every released CLIP) converts
with `vlp convert hf-clip`, then fine-tunes on VQA and captioning (each tower's tokens
projected into the fusion width) and scores above the baselines after a short run."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_convert_clip import _clip_bpe, _perturb  # noqa: E402
from test_ft_caption import _NoMeteor, needs_java  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast  # noqa: E402

from vlp.cli import main  # noqa: E402
from vlp.data.karpathy import read_karpathy  # noqa: E402


@pytest.fixture(scope="module")
def published_clip(ft_world, tmp_path_factory):
    """A B/32-proportioned CLIPModel scaled down (vision 64 wide, text 48), its BPE trained on
    the shapes world's captions, converted to a vlp model directory."""
    root = tmp_path_factory.mktemp("published")
    captions = [c for r in read_karpathy(ft_world / "benchmarks" / "coco" / "dataset_coco.json")
                for _, c in r["captions"]]
    vocab, merges = _clip_bpe(captions)
    tok = CLIPTokenizerFast(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32,
                         vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    _perturb(model, 0)
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    assert main(["convert", "hf-clip", str(root / "hf"), str(root / "vlp")]) == 0
    cfg = json.loads((root / "vlp" / "config.json").read_text())["model"]
    assert (cfg["vision"]["width"], cfg["text"]["width"]) == (64, 48)
    return root / "vlp"


FT = ["--no-progress", "train.batch_size=16", "train.log_every=5", "train.save_every=0",
      "eval.batch_size=64", "data.num_workers=0", "train.warmup_steps=5"]


def test_vqa_from_a_published_clip(published_clip, ft_world, tmp_path):
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), f"init_from={published_clip}",
                 f"data.synth_dir={ft_world}", *FT, "train.steps=60", "train.lr=3e-3",
                 "eval.split=val"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["vqa_acc"] > m["vqa_majority_baseline"] + 5, m
    spec = json.loads((out / "model" / "config.json").read_text())["backbone"]
    assert spec["model"]["fusion"]["width"] == 48  # the default: the text tower's width


@needs_java
def test_caption_from_a_published_clip(published_clip, ft_world, tmp_path, monkeypatch):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", _NoMeteor)
    out = tmp_path / "caption"
    assert main(["finetune", "caption", "--out", str(out), f"init_from={published_clip}",
                 f"data.synth_dir={ft_world}", *FT, "train.steps=200", "train.lr=1e-3",
                 "train.batch_size=32", "caption.beam_size=1", "caption.max_length=20"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["CIDEr"] > m["caption_constant_CIDEr"], m
    # CLIP's word ends are decoded as spaces: the captions are words, not one long token
    results = json.loads((out / "caption_test_results.json").read_text())
    assert all("</w>" not in r["caption"] for r in results) and m["caption_mean_words"] > 2
