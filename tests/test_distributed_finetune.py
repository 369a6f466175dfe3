"""Fine-tuning inherits pretraining's guarantees (the same loop): a 2-process `vlp finetune`
(torchrun and deepspeed's launcher, CPU/gloo) killed with SIGKILL after a checkpoint and resumed
with `--resume latest` gives the losses, batch digests and final weights of an uninterrupted
run."""
import json

import pytest
import torch
from launch import ROOT, kill_after_checkpoint, run, train_log
from safetensors.torch import load_file


def test_finetune_sigkill_then_resume_matches_uninterrupted(ft_world, pretrained, tmp_path):
    steps = 8
    args = ["--no-progress", f"init_from={pretrained('patches')}",
            f"data.synth_dir={ft_world}", f"train.steps={steps}", "train.batch_size=4",
            "train.save_every=3", "train.keep_checkpoints=5", "train.log_every=1",
            "train.threads=1", "train.precision=fp32", "data.num_workers=1",
            "eval.at_end=false", f"train.deepspeed={ROOT}/configs/deepspeed/zero2.json"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run("torchrun", 2, ["finetune", "vqa", "--out", str(whole), *args])
    kill_after_checkpoint("deepspeed", 2, ["finetune", "vqa", "--out", str(killed), *args],
                          killed, 3)
    assert steps not in [r["step"] for r in train_log(killed)]  # killed before the end
    run("deepspeed", 2, ["finetune", "vqa", "--out", str(killed), "--resume", "latest", *args])
    a, b = train_log(whole), train_log(killed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    # the same questions on every rank at every step, and the same losses
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert b[-1]["samples_seen"] == a[-1]["samples_seen"] == steps * 2 * 4
    state = json.loads((killed / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json")
                       .read_text())
    assert state["step"] == steps and state["world_size"] == 2 and state["task"] == "vqa"
    wa, wb = load_file(whole / "model" / "model.safetensors"), \
        load_file(killed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7, msg=key)
