"""vlp.models.bert_init: a tiny random Hugging Face BERT, saved locally, loads into BertEmbed +
post-LN Transformer and reproduces BertModel's last_hidden_state."""
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlp.models.bert_init import (load_bert_weights, mlp_ratio_for, read_bert_config,  # noqa: E402
                                  text_encoder_from_bert)
from vlp.models.embed import BertEmbed  # noqa: E402
from vlp.models.encoder import Transformer, build_attention_mask  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=40, hidden_act="gelu",
            layer_norm_eps=1e-12)


def _tiny_pretraining_model() -> "transformers.BertForPreTraining":
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(**TINY)).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0: perturb every tensor so a swapped
    # LayerNorm, bias or q/k/v slice would show in the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(BertModel, folder with model.safetensors of BertModel: no key prefix, a pooler,
    folder with pytorch_model.bin of BertForPreTraining: "bert." prefix, MLM + NSP heads and
    the old LayerNorm.gamma/beta names)."""
    model = _tiny_pretraining_model()
    st_dir = tmp_path_factory.mktemp("bert_st")
    model.bert.save_pretrained(st_dir)
    bin_dir = tmp_path_factory.mktemp("bert_bin")
    model.config.save_pretrained(bin_dir)
    # transformers 5 only writes safetensors; write the .bin the way older versions did
    sd = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                 re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v.clone()
          for k, v in model.state_dict().items()}
    torch.save(sd, bin_dir / "pytorch_model.bin")
    return model, st_dir, bin_dir


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([10, 7, 4])
    L = 10
    attention_mask = (torch.arange(L)[None] < lengths[:, None]).long()  # (3, L), right-padded
    input_ids = torch.randint(1, TINY["vocab_size"], (3, L), generator=g) * attention_mask
    token_type_ids = ((torch.arange(L)[None] >= 3) & attention_mask.bool()).long()  # 0.., 1..
    return input_ids, token_type_ids, attention_mask


@pytest.mark.parametrize("which", ["safetensors", "pytorch_model.bin"])
def test_reproduces_bert_last_hidden_state(bert, which):
    model, st_dir, bin_dir = bert
    folder = st_dir if which == "safetensors" else bin_dir
    embed, transformer = text_encoder_from_bert(folder)
    embed.eval(), transformer.eval()
    input_ids, token_type_ids, attention_mask = _batch()
    with torch.no_grad():
        want = model.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
        mask = build_attention_mask("bidirectional", input_ids.shape[1],
                                    padding_mask=attention_mask)
        got = transformer(embed(input_ids, token_type_ids), attn_mask=mask)
    # Every position is compared, padded ones too: both mask padded keys only, so a padded
    # query attends the real tokens in both.
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs diff {diff:.2e}"


def test_report_and_mlm_head(bert):
    model, st_dir, bin_dir = bert
    cfg = read_bert_config(st_dir)
    assert {k: cfg[k] for k in TINY} == TINY and cfg["act"] == "gelu"
    assert cfg["type_vocab_size"] == 2 and cfg["pad_token_id"] == 0

    embed, transformer = BertEmbed(100, 64, 40), Transformer(64, 2, 4, 2.0, norm_first=False)
    report = load_bert_weights(embed, transformer, st_dir)
    assert report["loaded"] == 5 + 16 * 2
    assert report["unused"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert report["mlm_head"] == {}

    report = load_bert_weights(embed, transformer, bin_dir)
    assert report["loaded"] == 5 + 16 * 2
    assert "cls.seq_relationship.weight" in report["unused"]
    mlm = report["mlm_head"]
    assert {"transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
            "transform.LayerNorm.bias", "bias"} <= set(mlm)
    torch.testing.assert_close(mlm["transform.LayerNorm.weight"],
                               model.cls.predictions.transform.LayerNorm.weight)
    torch.testing.assert_close(mlm["bias"], model.cls.predictions.bias)
    # q | k | v concatenated on the output axis of the fused qkv
    attn = model.bert.encoder.layer[1].attention.self
    torch.testing.assert_close(transformer.blocks[1].attn.qkv.weight,
                               torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]))


def test_visual_tokens_through_inputs_embeds(bert):
    """The single-stream path: caller-built embeddings + token type 1 + own positions ==
    HF's BertEmbeddings(inputs_embeds=...)."""
    model, st_dir, _ = bert
    embed, _ = text_encoder_from_bert(st_dir)
    v = torch.randn(2, 5, 64)
    types = torch.ones(2, 5, dtype=torch.long)
    pos = torch.arange(5).expand(2, 5) + 7
    with torch.no_grad():
        want = model.bert.embeddings(inputs_embeds=v, token_type_ids=types, position_ids=pos)
        got = embed(inputs_embeds=v, token_type_ids=types, position_ids=pos)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ids = torch.tensor([[5, 6, 7]])
        torch.testing.assert_close(embed(inputs_embeds=embed.token_embed(ids)), embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        embed(ids, inputs_embeds=v)
    with pytest.raises(ValueError, match="max_positions=40"):
        embed(torch.ones(1, 41, dtype=torch.long))


def test_clear_errors(bert, tmp_path):
    _, st_dir, _ = bert
    missing = tmp_path / "no_such_bert"
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        text_encoder_from_bert(missing)

    # shape mismatch: the first one is named with both shapes
    embed, transformer = BertEmbed(99, 64, 40), Transformer(64, 2, 4, 2.0, norm_first=False)
    with pytest.raises(ValueError, match=re.escape("embed.token_embed.weight <- "
                                                   "embeddings.word_embeddings.weight: "
                                                   "ours (99, 64) vs theirs (100, 64)")):
        load_bert_weights(embed, transformer, st_dir)
    with pytest.raises(ValueError, match="layers=2"):
        load_bert_weights(BertEmbed(100, 64, 40), Transformer(64, 3, 4, 2.0, norm_first=False),
                          st_dir)
    with pytest.raises(ValueError, match="norm_first=False"):
        load_bert_weights(BertEmbed(100, 64, 40), Transformer(64, 2, 4, 2.0), st_dir)

    # unsupported activation; keys absent from older configs take BertConfig's defaults
    bad = tmp_path / "bad_act"
    bad.mkdir()
    raw = {k: v for k, v in TINY.items() if k != "layer_norm_eps"}
    (bad / "config.json").write_text(json.dumps({**raw, "hidden_act": "silu"}))
    with pytest.raises(ValueError, match="hidden_act='silu'.*valid: gelu, relu"):
        read_bert_config(bad)
    (bad / "config.json").write_text(json.dumps({**raw, "hidden_act": "gelu_new"}))
    cfg = read_bert_config(bad)
    assert cfg["act"] == "gelu_tanh" and cfg["layer_norm_eps"] == 1e-12
    with pytest.raises(FileNotFoundError, match="no weights"):
        text_encoder_from_bert(bad)
    del raw["vocab_size"]
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing key.*vocab_size"):
        read_bert_config(bad)


def test_pre_ln_default_unchanged():
    """The default (pre-LN) Transformer keeps its state-dict keys and computes
    x + attn(ln_1(x)), x + mlp(ln_2(x)), then ln_f; post-LN has the same keys minus ln_f."""
    block_keys = [f"blocks.0.{m}.{p}" for m in ("ln_1", "attn.qkv", "attn.proj", "ln_2",
                                                "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
    torch.manual_seed(0)
    pre = Transformer(width=16, layers=1, heads=2).eval()
    assert list(pre.state_dict()) == block_keys + ["ln_f.weight", "ln_f.bias"]
    post = Transformer(width=16, layers=1, heads=2, norm_first=False)
    assert list(post.state_dict()) == block_keys
    b = pre.blocks[0]
    x = torch.randn(2, 5, 16)
    h = x + b.attn(b.ln_1(x))
    h = h + b.mlp(b.ln_2(h))
    torch.testing.assert_close(pre(x), pre.ln_f(h))


def test_mlp_ratio_for_gives_the_exact_hidden_size():
    for hidden in (64, 96, 312, 384, 768, 1000, 1024):
        for inter in range(hidden, 5 * hidden, 7):
            assert int(hidden * mlp_ratio_for(hidden, inter)) == inter
