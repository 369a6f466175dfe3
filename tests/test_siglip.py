"""SigLIP's sigmoid loss (vlp/objectives/siglip.py), the dual tower's logit bias and OpenCLIP
SigLIP-style checkpoints.

- One process: value and gradients against the paper's formula written here with autograd
  over the whole logits matrix, and one logit worked by hand.
- 2 and 3 gloo processes x B rows give the value and gradients (after DeepSpeed's averaging)
  of 1 process x the global batch, and no process builds a logits block larger than
  B_local x B_local.
- objectives.loss=siglip: the config derives the bias and the paper's init; a real
  `vlp pretrain` trains the bias and writes it into the model directory, which `vlp.load`
  reads back; zero-shot scores are unchanged by the bias.
- `vlp convert open-clip` takes `init_logit_bias` + a `logit_bias` tensor.
"""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.config import ConfigError, ModelConfig, PretrainConfig, load_config
from vlp.models import DualTower
from vlp.objectives import siglip

B, D_IN, D = 4, 6, 5


def _reference(img, txt, t, b):
    """The paper's loss (Zhai et al. 2023, Algorithm 1) over the full N x N matrix."""
    n = img.shape[0]
    logits = t * img @ txt.T + b
    labels = 2 * torch.eye(n) - torch.ones(n, n)  # +1 on the pairs, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / n


def _model():
    torch.manual_seed(0)
    return (torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D),
            torch.nn.Parameter(torch.tensor(math.log(10.0))),
            torch.nn.Parameter(torch.tensor(-10.0)))


def _data(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_IN, generator=g)


def _params(model):
    img_enc, txt_enc, t, b = model
    return [*img_enc.parameters(), *txt_enc.parameters(), t, b]


def _features(model, x_img, x_txt):
    img_enc, txt_enc, t, b = model
    return F.normalize(img_enc(x_img), dim=-1), F.normalize(txt_enc(x_txt), dim=-1), t.exp(), b


def test_one_logit_by_hand():
    img = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[0.6, 0.8]])
    # one pair: -log sigmoid(10 * 0.6 - 10) = log(1 + e^4)
    got = siglip.siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert got["contrastive_loss"].item() == pytest.approx(math.log1p(math.exp(4.0)), rel=1e-6)


@pytest.mark.parametrize("n", [1, 7])
def test_one_process_matches_the_formula(n):
    x_img, x_txt = _data(n)
    a, b = _model(), _model()
    want = _reference(*_features(a, x_img, x_txt))
    want.backward()
    got = siglip.siglip_loss(*_features(b, x_img, x_txt))["contrastive_loss"]
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for p, q in zip(_params(b), _params(a)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    shapes = []
    original = siglip.block_logits

    def recording(*args):
        logits = original(*args)
        shapes.append(tuple(logits.shape))
        return logits

    siglip.block_logits = recording  # the forward's logits blocks, to check their size
    model = _model()
    x_img, x_txt = _data(world * B)
    rows = slice(rank * B, (rank + 1) * B)
    loss = siglip.siglip_loss(*_features(model, x_img[rows], x_txt[rows]))["contrastive_loss"]
    (loss * 1.0).backward()
    params = _params(model)
    for p in params:  # what DeepSpeed does with gradients: average over processes
        dist.all_reduce(p.grad)
        p.grad /= world
    total = loss.detach().clone()
    dist.all_reduce(total)
    out[rank] = {"loss": total / world, "grads": [p.grad.clone() for p in params],
                 "shapes": shapes}
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_processes_match_one_process(tmp_path, world):
    model = _model()
    x_img, x_txt = _data(world * B)
    ref = siglip.siglip_loss(*_features(model, x_img, x_txt))["contrastive_loss"]
    ref.backward()
    torch.testing.assert_close(ref, _reference(*_features(_model(), x_img, x_txt)))
    ref_grads = [p.grad for p in _params(model)]

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), out), nprocs=world, join=True)
    for rank in range(world):
        # float32 sums in another order: agreement to 1e-6 (relative 1e-5 for gradients)
        torch.testing.assert_close(out[rank]["loss"], ref.detach(), rtol=1e-6, atol=1e-6)
        for got, want in zip(out[rank]["grads"], ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # one B x B block per process of the ring, never B x (world * B)
        assert out[rank]["shapes"] == [(B, B)] * world


def test_config_derives_the_bias_and_the_init(tmp_path):
    cfg = load_config(None, ["objectives.loss=siglip"])
    assert cfg.model.logit_bias is True
    assert cfg.model.init_logit_scale == pytest.approx(math.log(10.0))
    assert cfg.model.init_logit_bias == -10.0
    assert load_config(None, ["objectives.loss=siglip", "model.init_logit_scale=1.5"]) \
        .model.init_logit_scale == 1.5  # given: kept
    clip = load_config(None, [])
    assert clip.model.logit_bias is False and clip.model.init_logit_scale == \
        pytest.approx(math.log(1 / 0.07))
    with pytest.raises(ConfigError, match="objectives.loss=siglip trains .* model.logit_bias="
                                          "False"):
        load_config(None, ["objectives.loss=siglip", "model.logit_bias=false"])
    with pytest.raises(ConfigError, match="model.logit_bias=True .* with objectives.loss=clip"):
        load_config(None, ["model.logit_bias=true"])
    with pytest.raises(ConfigError, match="objectives.loss=siglip is the dual tower's"):
        load_config(None, ["objectives.loss=siglip", "recipe=combined",
                           "model.text.mask=bidirectional"])
    # a resumed run's saved config (every key given) is taken as it is
    saved = load_config(None, ["objectives.loss=siglip", "model.init_logit_scale=2.0"])
    from vlp.config import to_dict

    assert load_config(None, [], base=to_dict(saved)).model.init_logit_scale == 2.0


def test_dual_tower_has_the_bias_only_with_siglip():
    plain = DualTower(ModelConfig(), vocab_size=50)
    assert "logit_bias" not in plain.state_dict()
    assert len(plain(torch.zeros(2, 3, 64, 64), torch.ones(2, 8, dtype=torch.long),
                     torch.ones(2, 8, dtype=torch.long))) == 3
    cfg = PretrainConfig()
    cfg.model.logit_bias = True
    model = DualTower(cfg.model, vocab_size=50)
    assert model.logit_bias.tolist() == [-10.0]
    *_, bias = model(torch.zeros(2, 3, 64, 64), torch.ones(2, 8, dtype=torch.long),
                     torch.ones(2, 8, dtype=torch.long))
    assert bias.item() == -10.0
    # 0-dim logit_bias tensors (OpenCLIP's) load into the (1,)-shaped parameter
    state = {k: v for k, v in model.state_dict().items()}
    state["logit_bias"] = torch.tensor(-3.0)
    model.load_state_dict(state)
    assert model.logit_bias.tolist() == [-3.0]


# ------------------------------------------------------------------ OpenCLIP SigLIP-style
def _open_clip_checkpoint(tmp_path, vocab: int, bias: float | None):
    """A random OpenCLIP `CLIP` state dict (OpenCLIP's names and shapes, written here) and its
    model config; with `bias`, SigLIP-style: `init_logit_bias` and a 0-dim `logit_bias`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    W, T, D, P, S, L = 16, 12, 8, 8, 16, 8  # widths, embed dim, patch, image size, context

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def blocks(prefix, w, n):
        out = {}
        for i in range(n):
            b = f"{prefix}resblocks.{i}."
            out.update({b + "ln_1.weight": 1 + r(w), b + "ln_1.bias": r(w),
                        b + "attn.in_proj_weight": r(3 * w, w), b + "attn.in_proj_bias": r(3 * w),
                        b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                        b + "ln_2.weight": 1 + r(w), b + "ln_2.bias": r(w),
                        b + "mlp.c_fc.weight": r(4 * w, w), b + "mlp.c_fc.bias": r(4 * w),
                        b + "mlp.c_proj.weight": r(w, 4 * w), b + "mlp.c_proj.bias": r(w)})
        return out

    sd = {"visual.conv1.weight": r(W, 3, P, P), "visual.class_embedding": r(W),
          "visual.positional_embedding": r((S // P) ** 2 + 1, W),
          "visual.ln_pre.weight": 1 + r(W), "visual.ln_pre.bias": r(W),
          "visual.ln_post.weight": 1 + r(W), "visual.ln_post.bias": r(W),
          "visual.proj": r(W, D), "token_embedding.weight": r(vocab, T),
          "positional_embedding": r(L, T), "ln_final.weight": 1 + r(T), "ln_final.bias": r(T),
          "text_projection": r(T, D), "logit_scale": torch.tensor(math.log(10.0)),
          **blocks("visual.transformer.", W, 1), **blocks("transformer.", T, 1)}
    config = {"embed_dim": D, "vision_cfg": {"image_size": S, "patch_size": P, "layers": 1,
                                             "width": W, "head_width": 8},
              "text_cfg": {"context_length": L, "vocab_size": vocab, "width": T, "heads": 2,
                           "layers": 1}}
    if bias is not None:
        sd["logit_bias"] = torch.tensor(bias)
        config["init_logit_bias"] = -10.0
    name = "plain" if bias is None else "siglip"
    save_file(sd, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    return tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"


def test_open_clip_logit_bias_is_converted(tmp_path):
    import warnings

    import vlp
    from vlp.cli import main
    from vlp.tokenizer import train_tokenizer

    tok = train_tokenizer(["a red circle", "a blue square left of a green star"] * 5,
                          vocab_size=60)
    tok.save(tmp_path / "tokenizer.json")
    plain = _open_clip_checkpoint(tmp_path, tok.vocab_size, None)
    sig = _open_clip_checkpoint(tmp_path, tok.vocab_size, -7.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy tokenizer's end-of-text is not its last id
        for (state, config), out in ((plain, "plain_dir"), (sig, "siglip_dir")):
            assert main(["convert", "open-clip", str(state), str(tmp_path / out), "--config",
                         str(config), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    saved = json.loads((tmp_path / "siglip_dir" / "config.json").read_text())
    assert saved["model"]["logit_bias"] is True  # the model directory records it
    assert json.loads((tmp_path / "plain_dir" / "config.json").read_text())["model"][
        "logit_bias"] is False
    a, b = vlp.load(tmp_path / "plain_dir"), vlp.load(tmp_path / "siglip_dir")
    assert "logit_bias" not in a.model.state_dict()
    assert b.model.logit_bias.tolist() == [-7.5]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sb) - set(sa) == {"logit_bias"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # embeddings, hence zero-shot and retrieval rankings, do not involve the bias
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(a.encode_image(images), b.encode_image(images))
    assert torch.equal(a.encode_text(["a red circle"]), b.encode_text(["a red circle"]))
    # the weights decide: a bias in the checkpoint is kept even if the config omits it
    config = json.loads(sig[1].read_text())
    del config["init_logit_bias"]
    (tmp_path / "no_init.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vlp.convert.open_clip import from_open_clip

        from_open_clip(sig[0], tmp_path / "kept", tmp_path / "no_init.json",
                       tmp_path / "tokenizer.json")
    assert vlp.load(tmp_path / "kept").model.logit_bias.tolist() == [-7.5]
    # a config that promises a bias the checkpoint lacks is refused by name
    with warnings.catch_warnings(), \
            pytest.raises(ValueError, match="init_logit_bias=-10.0 but .*no 'logit_bias'"):
        warnings.simplefilter("ignore")
        from_open_clip(plain[0], tmp_path / "x", sig[1], tmp_path / "tokenizer.json")


def test_pretrain_with_siglip_trains_and_saves_the_bias(tmp_path):
    """A real `vlp pretrain objectives.loss=siglip` (one process, ZeRO-2, bf16): the log
    carries the bias, the model directory records and holds it, vlp.load reads it."""
    import vlp
    from launch import train_log

    from vlp.cli import main
    from vlp.data.synth import generate

    generate(tmp_path / "data", images=64, val_images=8, benchmark_images=0, shard_size=32,
             progress=False)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", "objectives.loss=siglip",
                 f"data.train={tmp_path / 'data'}/train", "data.num_workers=1",
                 "model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
                 "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
                 "model.text.heads=2", "tokenizer.vocab_size=200", "eval.at_end=false",
                 "train.steps=3", "train.batch_size=16", "train.log_every=1",
                 "train.warmup_steps=1", "train.lr=0.01", "train.save_every=0"]) == 0
    log = train_log(out)
    assert log[0]["logit_bias"] == pytest.approx(-10.0)  # the paper's init
    assert log[0]["logit_scale"] == pytest.approx(10.0)  # exp(log 10)
    saved = json.loads((out / "model" / "config.json").read_text())["model"]
    assert saved["logit_bias"] is True and saved["init_logit_scale"] == pytest.approx(
        math.log(10.0))
    bias = vlp.load(out / "model").model.logit_bias.item()
    assert bias != -10.0 and bias == pytest.approx(-10.0, abs=0.1)  # trained, a few lr steps
