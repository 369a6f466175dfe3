"""A dual tower's text tower from BERT (`model.text.init_from`): the BERT-shaped tower
(BertEmbed + post-LN blocks) against transformers' BertModel at two shapes, the shape and
tokenizer the run takes from the folder, what is refused, wrong checkpoints, and a real
`vlp pretrain` that starts from BERT."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlp import modeldir
from vlp.cli import main
from vlp.config import ConfigError, load_config
from vlp.models import DualTower
from vlp.models.towers import init_text_tower
from vlp.recipes import build_recipe
from vlp.recipes.combined import CombinedRecipe
from vlp.recipes.dual_tower import DualTowerRecipe, resolve_tower_inits
from vlp.recipes.single_stream import adopt_bert_shape
from vlp.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ("a an the red green blue yellow purple orange white black circle square triangle star "
         "cross diamond hexagon left right of above below on is there small large big two one "
         "three and with next to in image picture shape shapes").split()
VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
                            *"abcdefghijklmnopqrstuvwxyz",
                            *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), ".", ","]))

# two shapes: exact GELU, eps 1e-12, 4-wide MLP; gelu_new, eps 1e-6, an MLP ratio that is no
# integer, 3 heads, positions and token types of their own sizes
SHAPES = {
    "w64": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, max_position_embeddings=40, hidden_act="gelu"),
    "w48": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                intermediate_size=100, max_position_embeddings=24, hidden_act="gelu_new",
                layer_norm_eps=1e-6, type_vocab_size=3),
}


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    """name -> (BertModel, its folder: save_pretrained + vocab.txt)."""
    out = {}
    for name, spec in SHAPES.items():
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(vocab_size=len(VOCAB),
                                                               **spec)).eval()
        with torch.no_grad():  # LayerNorms (1, 0), zero biases: perturb so swaps would show
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        folder = tmp_path_factory.mktemp(f"bert_{name}")
        model.save_pretrained(folder)
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        out[name] = (model, folder)
    return out


def _text_cfg(folder, *extra):
    return load_config(overrides=[f"model.text.init_from={folder}", "model.text.mask=bidirectional",
                                  "model.text.pool=cls", "model.text.context_length=16",
                                  "model.vision.width=32", "model.vision.layers=1",
                                  "model.vision.heads=2", "model.embed_dim=16", *extra])


@pytest.mark.parametrize("shape", SHAPES)
def test_text_tower_reproduces_bert(berts, shape):
    """The dual tower's text tower built from model.text.init_from gives BertModel's
    last_hidden_state (every position of a right-padded batch, 1e-4) and pools [CLS]."""
    model, folder = berts[shape]
    cfg, changed = resolve_tower_inits(_text_cfg(folder))
    spec = SHAPES[shape]
    t = cfg.model.text
    assert (t.width, t.layers, t.heads, t.norm_first) == (
        spec["hidden_size"], spec["num_hidden_layers"], spec["num_attention_heads"], False)
    assert int(t.width * t.mlp_ratio) == spec["intermediate_size"]
    assert t.norm_eps == spec.get("layer_norm_eps", 1e-12)
    assert f"tokenizer.path={folder}" in changed and cfg.tokenizer.path == str(folder)
    tower = DualTower(cfg.model, len(VOCAB))
    report = init_text_tower(tower.text, folder)
    assert report["loaded"] == 5 + 16 * spec["num_hidden_layers"]
    assert report["unused"] == ["pooler.dense.bias", "pooler.dense.weight"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([16, 11, 5, 1])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    ids = torch.randint(5, len(VOCAB), (4, 16), generator=g) * mask
    ids[:, 0] = 2  # [CLS]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = tower.text.eval().forward_features(ids, mask)
        pooled = tower.text.forward_head(got, mask)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    torch.testing.assert_close(pooled, tower.text.proj(got[:, 0]))
    # the weights loaded are BERT's: positions up to context_length, token type 0
    emb = model.embeddings
    assert torch.equal(tower.text.embed.pos_embed.weight, emb.position_embeddings.weight[:16])
    assert torch.equal(tower.text.embed.type_embed.weight, emb.token_type_embeddings.weight[:1])
    assert torch.equal(tower.text.embed.token_embed.weight, emb.word_embeddings.weight)


def test_recipes_start_from_bert_and_refuse_what_does_not_fit(berts, tmp_path):
    model, folder = berts["w64"]
    tok = load_tokenizer(folder)
    cfg, _ = resolve_tower_inits(_text_cfg(folder))
    built = DualTowerRecipe(cfg, tok, 1).build_model()
    want = model.state_dict()
    layer = built.text.transformer.blocks[1]
    assert torch.equal(layer.ln_2.weight, want["encoder.layer.1.output.LayerNorm.weight"])
    assert torch.equal(layer.attn.qkv.weight, torch.cat([
        want[f"encoder.layer.1.attention.self.{n}.weight"] for n in ("query", "key", "value")]))
    combined_cfg, _ = resolve_tower_inits(_text_cfg(folder, "recipe=combined",
                                                    "model.fusion.width=32",
                                                    "model.fusion.heads=2",
                                                    "model.fusion.layers=1"))
    combined = CombinedRecipe(combined_cfg, tok, 1).build_model()
    assert torch.equal(combined.towers.text.embed.token_embed.weight,
                       want["embeddings.word_embeddings.weight"])

    # a tokenizer of another vocabulary is refused by name (without the folder's own)
    other = tmp_path / "tok"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(VOCAB[:-2]) + "\n")
    with pytest.raises(ConfigError, match=f"tokenizer.path={re.escape(str(folder))}"):
        DualTowerRecipe(cfg, load_tokenizer(other), 1)

    refusals = {
        "model.text.mask=causal": "model.text.mask=causal cannot run BERT weights",
        "model.text.pool=eos": "model.text.pool=eos with BERT",
        "recipe=single_stream": "model.text.init_from=.* starts a tower of recipe=dual_tower "
                                "or combined; recipe=single_stream has none \\(the single "
                                "stream's BERT is model.init_text_from\\)",
    }
    for override, message in refusals.items():
        with pytest.raises(ConfigError, match=message):
            _text_cfg(folder, override)
    with pytest.raises(ConfigError, match="model.init_text_from=.* is the single stream's BERT; "
                                          "for recipe=dual_tower's text tower use "
                                          "model.text.init_from"):
        load_config(overrides=[f"model.init_text_from={folder}"])
    # explicit shape keys that conflict with the folder's, and a context it cannot hold
    with pytest.raises(ConfigError, match=r"model.text.width=96 but .*config.json has "
                                          r"width=64: drop the override"):
        resolve_tower_inits(_text_cfg(folder, "model.text.width=96", "model.text.heads=4"))
    with pytest.raises(ConfigError, match="context_length=48 is longer than .*"
                                          "max_position_embeddings=40"):
        resolve_tower_inits(_text_cfg(folder, "model.text.context_length=48"))
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        resolve_tower_inits(_text_cfg(tmp_path / "no_such_bert"))


def test_wrong_bert_checkpoints_are_refused(berts, tmp_path):
    """Missing and misshapen weights and a pickle that would run code: one line naming the
    folder or file and the key; the payload never runs."""
    _, folder = berts["w64"]
    good = load_file(str(folder / "model.safetensors"))
    cfg, _ = resolve_tower_inits(_text_cfg(folder))

    def variant(name, weights=None, pickle_obj=None):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "vocab.txt"):
            (d / f).write_text((folder / f).read_text())
        if weights is not None:
            save_file(weights, str(d / "model.safetensors"))
        if pickle_obj is not None:
            torch.save(pickle_obj, d / "pytorch_model.bin")
        return d

    key = "encoder.layer.1.output.dense.weight"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = [(variant("missing", {k: v for k, v in good.items() if k != key}),
              f"checkpoint has no '{key}'"),
             (variant("shape", {**good, key: torch.zeros(64, 200)}),
              f"shape mismatch at transformer.blocks.1.mlp.fc2.weight <- {key}"),
             (variant("pickle", pickle_obj={**good, "x": Payload()}),
              "pytorch_model.bin: refused: not a plain tensor checkpoint")]
    for src, message in cases:
        tower = DualTower(cfg.model, len(VOCAB))
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            init_text_tower(tower.text, src)
        assert str(src) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="norm_first=false"):
        init_text_tower(DualTower(load_config().model, len(VOCAB)).text, folder)


def test_vlp_pretrain_starts_from_bert(berts, tmp_path):
    """A real `vlp pretrain model.text.init_from=DIR` (dual tower): the run's tokenizer is
    BERT's, and after one step at a vanishing learning rate its text tower is still BERT."""
    from vlp.data.synth import generate

    model, folder = berts["w64"]
    shapes = tmp_path / "shapes"
    generate(shapes, images=48, val_images=8, benchmark_images=0, shard_size=24,
             progress=False, image_size=32)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 "data.val=", "eval.at_end=false", "train.steps=1", "train.batch_size=8",
                 "train.save_every=0", "train.lr=1e-12", "train.min_lr=0",
                 "train.warmup_steps=0", "data.num_workers=0", "model.embed_dim=16",
                 "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
                 "model.vision.image_size=32", f"model.text.init_from={folder}",
                 "model.text.mask=bidirectional", "model.text.pool=cls",
                 "model.text.context_length=16", f"tokenizer.path={folder}"]) == 0
    saved = modeldir.read(out / "model")
    assert saved.tokenizer().vocab_size == len(VOCAB)
    fast = transformers.BertTokenizerFast(str(folder / "vocab.txt"))
    text = "a red circle left of a blue square."
    want = fast(text)["input_ids"]
    ids, mask = saved.tokenizer()([text], 16)
    assert ids[0, :len(want)].tolist() == want and int(mask.sum()) == len(want)
    t = saved.model_config().text
    assert (t.width, t.layers, t.norm_first) == (64, 2, False)
    trained = load_file(str(out / "model" / "model.safetensors"))
    bert = model.state_dict()
    pairs = {"text.embed.token_embed.weight": bert["embeddings.word_embeddings.weight"],
             "text.embed.ln.weight": bert["embeddings.LayerNorm.weight"],
             "text.transformer.blocks.1.mlp.fc2.weight": bert["encoder.layer.1.output.dense.weight"]}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(trained[ours], theirs, rtol=0, atol=1e-8)
    assert json.loads((out / "model" / "config.json").read_text())["model"]["text"][
        "init_from"] == str(folder)


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory):
    """(BertForMaskedLM, its folder): a BERT checkpoint with its MLM head."""
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(VOCAB),
                                                                **SHAPES["w64"])).eval()
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("bert_mlm")
    bert.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return bert, folder


def _assert_bert_mlm_head(ours, bert) -> None:
    head = bert.cls.predictions
    for mine, theirs in ((ours.dense.weight, head.transform.dense.weight),
                         (ours.dense.bias, head.transform.dense.bias),
                         (ours.norm.weight, head.transform.LayerNorm.weight),
                         (ours.norm.bias, head.transform.LayerNorm.bias), (ours.bias, head.bias)):
        assert torch.equal(mine, theirs)
    assert torch.equal(ours.word_embeddings.weight,
                       bert.bert.embeddings.word_embeddings.weight)  # the tied decoder


def test_the_single_stream_starts_its_mlm_head_from_bert(bert_mlm, ft_world, capsys):
    bert, folder = bert_mlm
    cfg, _ = adopt_bert_shape(load_config(overrides=[
        "recipe=single_stream", "model.visual_tokens=patches", f"model.init_text_from={folder}",
        "model.text.context_length=16", "model.vision.width=32", "model.vision.heads=2"]))
    shards = sorted(str(p) for p in (ft_world / "train").glob("*.tar"))
    model = build_recipe(cfg, load_tokenizer(folder), shards, world_size=1).build_model()
    assert "loaded BERT's MLM head" in capsys.readouterr().out
    _assert_bert_mlm_head(model.mlm_head, bert)


def test_combined_starts_its_mlm_head_from_bert(bert_mlm, capsys):
    """The combined recipe's MLM head (over the fusion) starts as BERT's when the fusion has
    BERT's width; otherwise it starts fresh and the log says why."""
    bert, folder = bert_mlm
    tok = load_tokenizer(folder)

    def build(width: int):
        cfg, _ = resolve_tower_inits(_text_cfg(folder, "recipe=combined",
                                               f"model.fusion.width={width}",
                                               "model.fusion.heads=2", "model.fusion.layers=1"))
        return CombinedRecipe(cfg, tok, 1).build_model()

    model = build(64)
    assert "loaded BERT's MLM head" in capsys.readouterr().out
    _assert_bert_mlm_head(model.mlm_head, bert)
    narrow = build(32)  # a 32-wide fusion: BERT's 64 -> 64 transform does not fit
    assert "does not fit (mlm_head.dense.weight (64, 32) vs (64, 64)" in capsys.readouterr().out
    assert narrow.mlm_head.dense.weight.shape == (64, 32)
    assert torch.equal(narrow.mlm_head.bias, torch.zeros(len(VOCAB)))  # fresh
