"""Issue 17: bad input gets one clear line naming the file, key or value, never a traceback,
and is caught before any work (no checkpoint, no log)."""
import json

import pytest
import torch

import vlp
from vlp.cli import main
from vlp.config import ModelConfig, TextConfig, VisionConfig
from vlp.data.synth import generate
from vlp.data.transforms import ImageTransform
from vlp.models import DualTower
from vlp.models.pretrained import Pretrained
from vlp.modeldir import ModelDirError
from vlp.tokenizer import train_tokenizer

TINY = ["model.embed_dim=16", "model.vision.width=16", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=16", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=100", "data.num_workers=0",
        "train.steps=2", "eval.at_end=false"]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"vlp {command}")]
    assert len(lines) == 1 and "error" in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=24, val_images=8, benchmark_images=0, shard_size=12, progress=False)
    return root


@pytest.mark.parametrize("override, words", [
    ("train.lr=-1", "train.lr=-1.0"), ("train.lr=.nan", "train.lr=nan"),
    ("train.save_every=-5", "train.save_every=-5"), ("train.beta2=1", "train.beta2=1.0")])
def test_bad_train_values(override, words, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), override]) == 2
    assert words in _one_error_line(capsys, "pretrain")
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  lr: [1e-3\nmodel: {}\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys, "pretrain")
    assert str(bad) in line and "line 4" in line


@pytest.mark.parametrize("content", [b"", b"\x9a" * 3000], ids=["zero-byte", "random-bytes"])
def test_unreadable_tars(content, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "00000.tar").write_bytes(content)
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--no-progress",
                 f"data.train={data}", *TINY]) == 2
    line = _one_error_line(capsys, "pretrain")
    assert str(data / "00000.tar") in line and "1 shard error" in line
    # with a tokenizer given, the loop finds no batch: the same kind of line
    tok = tmp_path / "tok.json"
    train_tokenizer(["a red circle on the left"] * 20, vocab_size=100).save(tok)
    assert main(["pretrain", "--out", str(tmp_path / "run2"), "--no-progress",
                 f"data.train={data}", f"tokenizer.path={tok}", *TINY]) == 2
    line = _one_error_line(capsys, "pretrain")
    assert str(data / "00000.tar") in line and "1 shard error" in line


def test_empty_folder_and_batch_larger_than_the_data(shapes, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--no-progress",
                 f"data.train={tmp_path / 'empty'}", *TINY]) == 2
    assert str(tmp_path / "empty") in _one_error_line(capsys, "pretrain")
    assert main(["pretrain", "--out", str(tmp_path / "run2"), "--no-progress",
                 f"data.train={shapes}/train", "train.batch_size=100", *TINY]) == 2
    line = _one_error_line(capsys, "pretrain")
    assert "train.batch_size=100" in line and "24 samples" in line


def test_missing_val_data_is_caught_before_training(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 f"data.val={tmp_path / 'nowhere'}", *TINY[:-1]]) == 2
    assert str(tmp_path / "nowhere") in _one_error_line(capsys, "pretrain")
    assert not (out / "checkpoints").exists() and not (out / "train_log.jsonl").exists()


@pytest.fixture()
def model_dir(tmp_path):
    cfg = ModelConfig(embed_dim=16, vision=VisionConfig(width=16, layers=1, heads=2,
                                                        image_size=32),
                      text=TextConfig(width=16, layers=1, heads=2))
    tok = train_tokenizer(["a red circle on the left"] * 20, vocab_size=100)
    return Pretrained(DualTower(cfg, tok.vocab_size), tok, ImageTransform(32)).save(
        tmp_path / "model")


def test_broken_model_directories(model_dir, tmp_path, capsys):
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(ModelDirError, match="model.safetensors.*truncated"):
        vlp.load(model_dir)
    assert main(["eval", "retrieval", "--model", str(model_dir), "--data", str(tmp_path)]) == 2
    assert str(weights) in _one_error_line(capsys, "eval")
    weights.write_bytes(good)
    config = model_dir / "config.json"
    original = json.loads(config.read_text())
    config.write_text(json.dumps({**original, "format_version": 99}))
    with pytest.raises(ModelDirError, match="format_version=99"):
        vlp.load(model_dir)
    config.write_text("{not json")
    with pytest.raises(ModelDirError, match="config.json: not valid JSON"):
        vlp.load(model_dir)
    config.write_text(json.dumps(original))
    assert vlp.load(model_dir).encode_text(["a red circle"]).shape == (1, 16)


def test_bad_hf_clip_config(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path / "hf"
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=99),
                     vision_config=dict(hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=16), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_config"]["hidden_size"] = "sixteen"
    (folder / "config.json").write_text(json.dumps(raw))
    assert main(["convert", "hf-clip", str(folder), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, "convert")
    assert "vision_config.hidden_size='sixteen' must be an integer" in line
    (folder / "config.json").write_text('{"model_type": "clip",')
    assert main(["convert", "hf-clip", str(folder), str(tmp_path / "out")]) == 2
    assert f"{folder / 'config.json'}: not valid JSON" in _one_error_line(capsys, "convert")


def test_one_device_rule(model_dir, tmp_path, capsys):
    """Issue 18: every command takes --device; the default is the GPU when there is one, else
    the CPU; a CUDA device on a machine without one is one line."""
    from vlp.models.device import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert vlp.load(model_dir).device.type == expected
    assert vlp.load(model_dir, device="cpu").device.type == "cpu"
    if not torch.cuda.is_available():
        assert main(["eval", "retrieval", "--model", str(model_dir), "--data", str(tmp_path),
                     "--device", "cuda"]) == 2
        assert "no CUDA device" in _one_error_line(capsys, "eval")
