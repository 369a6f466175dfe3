"""vlp.convert: Hugging Face CLIP and OpenCLIP weights load into DualTower with the same
features (both directions for HF), and CLIP's BPE tokenizer gives transformers' ids.

Every model and tokenizer is built here, randomly initialised: no downloads.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizerFast  # noqa: E402

import vlp  # noqa: E402
from vlp.api import Pretrained  # noqa: E402
from vlp.cli import main  # noqa: E402
from vlp.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from vlp.convert.hf_clip import from_hf_clip, hf_config_from_model  # noqa: E402
from vlp.convert.open_clip import from_open_clip, tokenizer_from_bpe_gz  # noqa: E402
from vlp.data.transforms import ImageTransform  # noqa: E402
from vlp.modeldir import ModelDirError  # noqa: E402
from vlp.models import DualTower  # noqa: E402
from vlp.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

TOL = 1e-4  # max abs difference of L2-normalised features
CAPTIONS = ["a photo of a cat!", "Two dogs   playing in the SNOW.", "a red circle",
            "It's 42 degrees, isn't it? naïve café 🙂", "x",
            "a very long caption that keeps going and going well past the context length of "
            "these tiny test models so that it has to be truncated somewhere"]
TRAIN_TEXTS = CAPTIONS[:4] * 5 + ["a blue square on the left of a green triangle"] * 5

# Two CLIPModel shapes: patch sizes, widths, depths, heads, image sizes, activations, eps and
# the eos convention (the second uses the legacy eos_token_id=2: HF pools at argmax(ids)).
SHAPES = {
    "quick_gelu": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text=dict(hidden_size=24, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu"),
        projection_dim=16, legacy_eos=False),
    "gelu": dict(
        vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=3, image_size=28, patch_size=7, hidden_act="gelu",
                    layer_norm_eps=1e-6),
        text=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=20, hidden_act="gelu",
                  layer_norm_eps=1e-6),
        projection_dim=24, legacy_eos=True),
}


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output object (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Every parameter moved off its init (LayerNorms off 1/0, biases nonzero), so a weight
    mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _clip_bpe(texts) -> tuple[dict, list]:
    """A tiny byte-level BPE laid out as CLIP's: every byte, every byte + </w> (so nothing is
    unknown: CLIP's unk is <|endoftext|>, which would end the mask early), the merges, then
    <|startoftext|> and <|endoftext|>."""
    hf = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), "removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _write_bpe_gz(path, merges):
    """open_clip's bpe_simple_vocab_16e6.txt.gz layout: a version line, then the merges."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return path


@pytest.fixture(scope="module")
def bpe():
    return _clip_bpe(TRAIN_TEXTS)


@pytest.fixture(scope="module")
def hf_tokenizer(bpe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tok")
    CLIPTokenizerFast(vocab=bpe[0], merges=bpe[1]).save_pretrained(folder)
    return folder


def _save_hf_clip(folder, shape: dict, tok_folder, seed: int) -> CLIPModel:
    tok = CLIPTokenizerFast.from_pretrained(tok_folder)
    eos = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if shape["legacy_eos"] else \
        dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
             pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=dict(shape["text"], vocab_size=len(tok), **eos),
                        vision_config=shape["vision"], projection_dim=shape["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    _perturb(model, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, hf_tokenizer, tmp_path_factory):
    """(HF CLIPModel, its folder, the vlp model directory converted from it, shape)."""
    shape = SHAPES[request.param]
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    model = _save_hf_clip(root / "hf", shape, hf_tokenizer, seed=len(request.param))
    assert main(["convert", "hf-clip", str(root / "hf"), str(root / "vlp")]) == 0
    return model, root / "hf", root / "vlp", shape


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).abs().max().item()


# ------------------------------------------------------------------------------ tokenizer
def test_clip_tokenizer_ids_equal_transformers(hf_tokenizer, tmp_path, bpe):
    theirs = CLIPTokenizerFast.from_pretrained(hf_tokenizer)
    ours = load_tokenizer(hf_tokenizer)
    assert (ours.cls_id, ours.sep_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                       theirs.pad_token_id)
    for length in (8, 16, 77):
        ids, mask = ours(CAPTIONS, length)
        ref = theirs(CAPTIONS, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
        # the mask rebuilt from bare ids (pad == eos here): up to and including the first eos
        assert torch.equal(ours.attention_mask(ids), mask)
    # decoding drops CLIP's "</w>" word ends as transformers does (its tokenizer.json alone
    # would leave them: captions generated from a converted CLIP read as words)
    for row in ours(CAPTIONS, 77)[0]:
        assert ours.decode(row) == theirs.decode(row, skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False)
        assert "</w>" not in ours.decode(row)
    # saved into a model directory and loaded back: the same pad (<|endoftext|>) and ids
    back = load_tokenizer(ours.save(tmp_path / "tokenizer.json"))
    assert back.pad_id == ours.pad_id and torch.equal(back(CAPTIONS, 16)[0], ours(CAPTIONS, 16)[0])

    # the slow files only (vocab.json + merges.txt), padding with "!" (id 0) as some LAION
    # folders configure (transformers then reads a "!" in text as that special token, id 0)
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "vocab.json").write_text(json.dumps(bpe[0]))
    (slow / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in bpe[1]))
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "pad_token": "!"}))
    fast = tmp_path / "fast"  # the same pad beside a tokenizer.json
    fast.mkdir()
    (fast / "tokenizer.json").symlink_to(hf_tokenizer / "tokenizer.json")
    (fast / "tokenizer_config.json").symlink_to(slow / "tokenizer_config.json")
    for folder in (slow, fast):
        theirs, ours = CLIPTokenizerFast.from_pretrained(folder), load_tokenizer(folder)
        assert ours.pad_id == theirs.pad_token_id == 0
        ids, mask = ours(CAPTIONS, 16)
        ref = theirs(CAPTIONS, padding="max_length", max_length=16, truncation=True,
                     return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
        assert torch.equal(ours.attention_mask(ids), mask)  # "!" in a caption is not padding


def test_open_clip_bpe_gz_tokenizer(bpe, tmp_path):
    """bpe_simple_vocab_16e6.txt.gz layout -> CLIP's vocabulary order and transformers' ids."""
    ours = tokenizer_from_bpe_gz(_write_bpe_gz(tmp_path / "bpe.txt.gz", bpe[1]))
    vocab = ours.hf.get_vocab()
    n = len(vocab)
    assert (vocab["!"], vocab["Ā"], vocab["!</w>"]) == (0, 188, 256)  # as in OpenAI's vocab
    assert (ours.cls_id, ours.sep_id, ours.pad_id) == (n - 2, n - 1, 0)
    # open_clip pads with 0 but keeps "!" a text token (transformers, given pad_token="!",
    # makes it special): compare against the default pad and the real tokens only
    theirs = CLIPTokenizerFast(vocab=vocab, merges=bpe[1])
    ids, mask = ours(CAPTIONS, 16)
    ref = theirs(CAPTIONS, padding="max_length", max_length=16, truncation=True,
                 return_tensors="pt")
    assert torch.equal(mask, ref["attention_mask"])
    assert torch.equal(ids[mask == 1], ref["input_ids"][mask == 1]) and (ids[mask == 0] == 0).all()
    assert torch.equal(ours.attention_mask(ids), mask)


# ------------------------------------------------------------------------------ HF -> vlp
@torch.no_grad()
def test_hf_clip_features_match(converted):
    hf, _, out, shape = converted
    ours = vlp.load(out)
    cfg = ours.model.cfg
    assert cfg.vision.pre_norm and cfg.text.context_length == shape["text"][
        "max_position_embeddings"]
    size = shape["vision"]["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    d_img = _max_diff(ours.encode_image(pixels), _features(hf.get_image_features(pixels)))
    assert d_img < TOL

    tok = CLIPTokenizerFast.from_pretrained(converted[1])
    ctx = cfg.text.context_length
    diffs = {}
    for padding in ("max_length", "longest"):  # full context, and a shorter padded batch
        batch = tok(CAPTIONS, padding=padding, max_length=ctx, truncation=True,
                    return_tensors="pt")
        ref = _features(hf.get_text_features(**batch))
        diffs[f"ids ({padding})"] = _max_diff(ours.encode_text(batch["input_ids"]), ref)
        diffs[f"ids+mask ({padding})"] = _max_diff(
            ours.encode_text(batch["input_ids"], attention_mask=batch["attention_mask"]), ref)
    ref = _features(hf.get_text_features(**tok(CAPTIONS, padding="max_length", max_length=ctx,
                                                truncation=True, return_tensors="pt")))
    diffs["strings"] = _max_diff(ours.encode_text(CAPTIONS), ref)
    assert max(diffs.values()) < TOL, diffs
    print(f"\nmax |diff| image {d_img:.2e}, text {max(diffs.values()):.2e}")


def test_hf_clip_transform_settings(converted, tmp_path):
    _, src, _, shape = converted
    size = shape["vision"]["image_size"]
    pre = {"crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size},
           "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    t = vlp.load(from_hf_clip(folder, tmp_path / "vlp")).transform
    assert (t.image_size, t.mean, t.std, t.interpolation) == (
        size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")


def test_hf_clip_from_pytorch_model_bin(converted, tmp_path):
    """Older folders hold pytorch_model.bin (read with weights_only=True): the same model."""
    hf, src, out, _ = converted
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).symlink_to(src / name)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    a = vlp.load(out).model.state_dict()
    b = vlp.load(from_hf_clip(folder, tmp_path / "vlp")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_clip_refusals(converted, tmp_path):
    _, src, _, _ = converted
    config = json.loads((src / "config.json").read_text())
    weights = src / "model.safetensors"
    cases = [({"model_type": "siglip"}, "model_type='siglip'"),
             ({"text_config": {**config["text_config"], "hidden_act": "silu"}},
              "text_config.hidden_act='silu'")]
    for i, (change, message) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        (folder / "model.safetensors").symlink_to(weights)
        (folder / "tokenizer.json").symlink_to(src / "tokenizer.json")
        with pytest.raises(ValueError, match=message):
            from_hf_clip(folder, tmp_path / "out")
    # a missing weight names the key
    from safetensors.torch import load_file
    sd = load_file(weights)
    del sd["vision_model.pre_layrnorm.weight"]
    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").symlink_to(src / "tokenizer.json")
    with pytest.raises(ValueError, match="vision_model.pre_layrnorm.weight"):
        from_hf_clip(folder, tmp_path / "out")
    # a pytorch_model.bin that would run code when unpickled is refused; nothing runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({**sd, "x": Payload()}, folder / "pytorch_model.bin")
    (folder / "tokenizer.json").symlink_to(src / "tokenizer.json")
    with pytest.raises(ModelDirError, match="pytorch_model.bin: refused: not a plain tensor "
                       "checkpoint.*GLOBAL posix.system"):
        from_hf_clip(folder, tmp_path / "out")
    assert not marker.exists()


# ------------------------------------------------------------------------------ vlp -> HF
def _vlp_model_dir(folder, pos_embed: str = "learned", **text) -> Pretrained:
    tok = train_tokenizer(TRAIN_TEXTS, vocab_size=200)  # WordPiece: [PAD] 0, [CLS] 2, [SEP] 3
    cfg = ModelConfig(embed_dim=16,
                      vision=VisionConfig(width=32, layers=2, heads=4, image_size=24,
                                          patch_size=6, act="gelu", pre_norm=True,
                                          pos_embed=pos_embed),
                      text=TextConfig(width=24, layers=2, heads=3, mlp_ratio=2.5,
                                      act="quick_gelu", context_length=12, **text))
    torch.manual_seed(1)
    model = DualTower(cfg, vocab_size=tok.vocab_size)
    _perturb(model, 1)  # the patch conv's bias included: folded into the positions on export
    assert model.visual.embed.proj.bias.abs().min() > 0
    pretrained = Pretrained(model, tok, ImageTransform(24, mean=(0.4, 0.5, 0.6)))
    pretrained.save(folder)
    return pretrained


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
@torch.no_grad()
def test_round_trip_vlp_to_hf_clip(tmp_path, pos_embed):
    ours = _vlp_model_dir(tmp_path / "vlp", pos_embed)
    assert main(["convert", "to-hf-clip", str(tmp_path / "vlp"), str(tmp_path / "hf")]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    d_img = _max_diff(ours.encode_image(pixels), _features(hf.get_image_features(pixels)))
    # the HF folder's tokenizer gives our ids, and its model our text features
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tok(CAPTIONS, padding="max_length", max_length=12, truncation=True,
                return_tensors="pt")
    ids, mask = ours.tokenizer(CAPTIONS, 12)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    d_txt = _max_diff(ours.encode_text(CAPTIONS), _features(hf.get_text_features(**batch)))
    assert d_img < TOL and d_txt < TOL, (d_img, d_txt)
    assert torch.allclose(hf.logit_scale, ours.model.logit_scale[0])
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.4, 0.5, 0.6] and pre["crop_size"]["height"] == 24

    # and back into vlp: the same features again
    back = vlp.load(from_hf_clip(tmp_path / "hf", tmp_path / "back"))
    assert _max_diff(back.encode_image(pixels), ours.encode_image(pixels)) < TOL
    assert _max_diff(back.encode_text(CAPTIONS), ours.encode_text(CAPTIONS)) < TOL


@pytest.mark.parametrize("change, message", [
    (dict(vision=dict(pre_norm=False)), "model.vision.pre_norm=False"),
    (dict(vision=dict(pool="mean")), "model.vision.pool='mean'"),
    (dict(text=dict(mask="bidirectional")), "model.text.mask='bidirectional'"),
    (dict(text=dict(pool="mean")), "model.text.pool='mean'"),
    (dict(text=dict(norm_first=False)), "model.text.norm_first=False.*a BERT text tower"),
])
def test_to_hf_clip_refuses_what_clip_cannot_express(change, message):
    tok = train_tokenizer(TRAIN_TEXTS, vocab_size=200)
    cfg = ModelConfig(vision=VisionConfig(**{"pre_norm": True, **change.get("vision", {})}),
                      text=TextConfig(vocab_size=tok.vocab_size, **change.get("text", {})))
    with pytest.raises(ValueError, match=message):
        hf_config_from_model(cfg, tok, 1.0, "model")


def test_to_hf_clip_cli_error_is_one_line(tmp_path, capsys):
    _vlp_model_dir(tmp_path / "vlp", pool="cls")
    assert main(["convert", "to-hf-clip", str(tmp_path / "vlp"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.text.pool='cls'" in err and "Traceback" not in err


def test_encode_text_rejects_float_ids(tmp_path):
    ours = _vlp_model_dir(tmp_path / "vlp")
    with pytest.raises(TypeError, match="integer"):
        ours.encode_text(torch.zeros(2, 12))


# ------------------------------------------------------------------------------ OpenCLIP
def _open_clip_state(hf: CLIPModel) -> dict[str, torch.Tensor]:
    """The HF model's weights under OpenCLIP's names (written independently of vlp.convert)."""
    sd = {k: v.clone() for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    out = {"logit_scale": sd.pop("logit_scale"),
           "visual.proj": sd.pop("visual_projection.weight").T.contiguous(),
           "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    rename = [("vision_model.embeddings.patch_embedding.", "visual.conv1."),
              ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
              ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
              ("vision_model.pre_layrnorm.", "visual.ln_pre."),
              ("vision_model.post_layernorm.", "visual.ln_post."),
              ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
              ("text_model.embeddings.token_embedding.", "token_embedding."),
              ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
              ("text_model.final_layer_norm.", "ln_final."),
              ("text_model.encoder.layers.", "transformer.resblocks.")]
    inner = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
    for key in sorted(sd):
        if ".self_attn.q_proj." in key:  # in_proj = [q; k; v]
            kind = key.rsplit(".", 1)[1]
            parts = [sd[key.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")]
            key, value = key.replace("self_attn.q_proj." + kind, "attn.in_proj_" + kind), \
                torch.cat(parts)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            value = sd[key]
        for a, b in rename + inner:
            key = key.replace(a, b)
        out[key] = value
    out["attn_mask"] = torch.full((4, 4), float("-inf")).triu(1)  # a buffer old files carry
    return out


def _open_clip_config(shape: dict, vocab_size: int) -> dict:
    v, t = shape["vision"], shape["text"]
    eps = v.get("layer_norm_eps", 1e-5)
    return {"embed_dim": shape["projection_dim"], "quick_gelu": v["hidden_act"] == "quick_gelu",
            "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"],
                           "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                           "head_width": v["hidden_size"] // v["num_attention_heads"],
                           "mlp_ratio": v["intermediate_size"] / v["hidden_size"],
                           "norm_kwargs": {"eps": eps}},
            "text_cfg": {"context_length": t["max_position_embeddings"], "vocab_size": vocab_size,
                         "width": t["hidden_size"], "heads": t["num_attention_heads"],
                         "layers": t["num_hidden_layers"],
                         "mlp_ratio": t["intermediate_size"] / t["hidden_size"],
                         "norm_kwargs": {"eps": eps}}}


def test_open_clip_state_dict_gives_the_same_model(converted, bpe, tmp_path):
    hf, src, out, shape = converted
    save_file(_open_clip_state(hf), str(tmp_path / "open_clip.safetensors"))
    config = _open_clip_config(shape, hf.config.text_config.vocab_size)
    (tmp_path / "model.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor used (attn_mask aside), no warning
        assert main(["convert", "open-clip", str(tmp_path / "open_clip.safetensors"),
                     str(tmp_path / "vlp"), "--config", str(tmp_path / "model.json"),
                     "--tokenizer", str(src)]) == 0
    a, b = vlp.load(out).model, vlp.load(tmp_path / "vlp").model
    assert vars(a.cfg.vision) == vars(b.cfg.vision)
    assert {**vars(a.cfg.text), "vocab_size": 0} == {**vars(b.cfg.text), "vocab_size": 0}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # with open_clip's own tokenizer file (pads with "!" = 0), exported to HF: the HF folder
    # pads with <|endoftext|> instead, so "!" in a caption keeps its text id there
    gz = _write_bpe_gz(tmp_path / "bpe.txt.gz", bpe[1])
    from_open_clip(tmp_path / "open_clip.safetensors", tmp_path / "vlp_gz", tmp_path / "model.json",
                   gz)
    assert main(["convert", "to-hf-clip", str(tmp_path / "vlp_gz"), str(tmp_path / "hf")]) == 0
    ours = vlp.load(tmp_path / "vlp_gz").tokenizer
    ids, mask = ours(CAPTIONS, 16)
    ref = AutoTokenizer.from_pretrained(tmp_path / "hf")(
        CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert ours.pad_id == 0 and torch.equal(mask, ref["attention_mask"])
    assert torch.equal(ids[mask == 1], ref["input_ids"][mask == 1])

    bad = dict(config, vision_cfg={**config["vision_cfg"], "attentional_pool": True})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="vision_cfg.attentional_pool=True"):
        from_open_clip(tmp_path / "open_clip.safetensors", tmp_path / "x", tmp_path / "bad.json",
                       src)
    (tmp_path / "bad.json").write_text(json.dumps(dict(config, init_logit_bias=-10.0)))
    with pytest.raises(ValueError, match="init_logit_bias=-10.0"):
        from_open_clip(tmp_path / "open_clip.safetensors", tmp_path / "x", tmp_path / "bad.json",
                       src)
