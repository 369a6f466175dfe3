"""Resuming continues the run that is in OUT: its saved config, not the defaults; a change a
resumed run cannot take is refused by name, a safe one applied and logged."""
import json

import pytest

from vlp.cli import main
from vlp.data.synth import generate

TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=200", "train.batch_size=16",
        "data.num_workers=1", "train.log_every=1", "eval.at_end=false"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=96, val_images=16, benchmark_images=0, shard_size=24, progress=False)
    return root


def test_resume_latest_continues_the_run_in_out(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 "train.steps=4", "train.save_every=2", *TINY]) == 0
    # no data settings given again: the run's own (the defaults would generate the 20,000-image
    # shapes world into the cache); a longer run is a safe change, logged
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--no-progress", "--resume", "latest",
                 "train.steps=6"]) == 0
    printed = capsys.readouterr().out
    assert "resume: train.steps: 4 -> 6" in printed and "generating" not in printed
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r and "event" not in r] == list(range(1, 7))
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 6
    assert f"{shapes}/train" in (out / "config.yaml").read_text()
    # what a resumed run cannot change: refused by name, before any work
    for override, key in (("train.batch_size=8", "train.batch_size"),
                          (f"data.train={shapes}/val", "data.train"),
                          ("model.text.layers=2", "model.text.layers")):
        assert main(["pretrain", "--out", str(out), "--no-progress", "--resume", "latest",
                     "train.steps=8", override]) == 2
        err = capsys.readouterr().err
        assert key in err and "cannot" in err and len(err.strip().splitlines()) == 1, err
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 6  # untouched
