"""The one loop's evaluation hook (`eval.every`) and its data sources' positions."""
import json

import numpy as np
import pytest
import torch

from vlp.cli import main
from vlp.data.batch import Batch
from vlp.data.sources import MapSource, epoch_order
from vlp.data.synth import generate

TINY = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
        "model.text.heads=2", "tokenizer.vocab_size=200", "train.batch_size=16",
        "data.shuffle_buffer=64", "eval.batch_size=64", "data.num_workers=1",
        "train.precision=fp32", "train.log_every=1"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=96, val_images=32, benchmark_images=0, shard_size=24, progress=False)
    return root


def test_eval_every_scores_the_live_weights(shapes, tmp_path):
    """`eval.every=2` logs, at step 2, the retrieval metrics of the weights at step 2: the same
    numbers the end-of-run evaluation gives for the step-2 checkpoint (resumed with
    train.steps=2, so the run ends right there and evaluates its consolidated weights)."""
    out = tmp_path / "run"
    data = [f"data.train={shapes}/train", f"data.val={shapes}/val"]
    assert main(["pretrain", "--out", str(out), "--no-progress", *data, *TINY,
                 "train.steps=4", "train.save_every=2", "eval.every=2",
                 "train.keep_checkpoints=3"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2]  # not at step 4: the end-of-run evaluation is
    at_two = tmp_path / "at_two"
    assert main(["pretrain", "--out", str(at_two), "--no-progress", *data, *TINY,
                 "--resume", str(out / "checkpoints" / "step_00000002"),
                 "train.steps=2", "train.save_every=2"]) == 0
    final = json.loads((at_two / "metrics.json").read_text())
    assert final["train_steps"] == 2
    for key in ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10", "zeroshot_color_top1"):
        assert evals[0][key] == pytest.approx(final[key]), key
    # and they differ from the end of the 4-step run (the hook did not score the final model)
    end = json.loads((out / "metrics.json").read_text())
    assert any(end[k] != evals[0][k] for k in ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10"))


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return i


def _collate(items):
    return Batch([str(i) for i in items], fields={"i": torch.tensor(items)})


def test_map_source_resumes_mid_epoch():
    """A MapSource restored from its state yields exactly the batches the first one would
    have yielded next, across an epoch boundary; two ranks read disjoint samples."""
    def drain(source, n):
        out = []
        while len(out) < n:
            batch = source.next()
            if batch is None:
                source.new_epoch()
                continue
            out.append(batch.keys)
        return out

    a = MapSource(_Numbers(), _collate, batch_size=4, seed=3)
    first = drain(a, 4)
    state = a.state()
    rest = drain(a, 6)
    b = MapSource(_Numbers(), _collate, batch_size=4, seed=3)
    b.restore(json.loads(json.dumps(state)))
    assert drain(b, 6) == rest
    assert first[0] == [str(i) for i in epoch_order(23, 3, 0, 0, 1)[:4]]
    # 2 ranks: each gets 11 of 23 per epoch, disjoint
    ranks = [MapSource(_Numbers(), _collate, batch_size=4, seed=3, rank=r, world_size=2)
             for r in range(2)]
    seen = [sum(drain(s, 3), []) for s in ranks]
    assert len(seen[0]) == len(seen[1]) == 11 and not set(seen[0]) & set(seen[1])
    assert sorted(map(int, seen[0] + seen[1])) == sorted(
        np.random.default_rng([3, 0]).permutation(23)[:22].tolist())


def test_batch_first_cuts_every_field():
    batch = Batch(["a", "b", "c"], input_ids=torch.arange(6).view(3, 2),
                  pixel_values=torch.zeros(3, 3, 4, 4), fields={"ids": [1, 2, 3],
                                                                "t": torch.ones(3, 5)},
                  skipped={"corrupt_image": 1})
    cut = batch.first(2)
    assert cut.keys == ["a", "b"] and cut.input_ids.tolist() == [[0, 1], [2, 3]]
    assert cut.pixel_values.shape[0] == 2 and cut.fields["ids"] == [1, 2]
    assert cut.fields["t"].shape == (2, 5) and cut.skipped == {"corrupt_image": 1}
    assert set(batch.visual()) == {"pixel_values"}


def test_forty_steps_with_eval_every_twenty_log_two_evaluations(shapes, tmp_path):
    """Issue 14: a 40-step run with eval.every=20 logs two evaluation records (step 20, and
    the end-of-run one at 40), on at most eval.max_samples validation samples during training."""
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--no-progress", f"data.train={shapes}/train",
                 f"data.val={shapes}/val", *TINY, "train.steps=40", "train.save_every=0",
                 "eval.every=20", "eval.max_samples=16", "train.log_every=10"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in log if r.get("event") in ("eval", "end")]
    assert [r["step"] for r in evaluations] == [20, 40]
    assert evaluations[0]["num_images"] == 16 and evaluations[1]["num_images"] == 32
    assert all("i2t_R@1" in r and "zeroshot_shape_top1" in r for r in evaluations)


FT = ["train.batch_size=8", "train.log_every=1", "eval.batch_size=32", "data.num_workers=0",
      "eval.split=val", "train.save_every=0"]


def test_finetuning_keeps_the_best_weights(ft_world, pretrained, tmp_path, capsys):
    """eval.best_metric: OUT/model is the best evaluated weights (the first of equals),
    OUT/model-last the last; a constant huge learning rate makes the later steps no better.
    `vlp eval vqa --model` on each gives the logged score of its step back."""
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress",
                 f"init_from={pretrained('regions')}", f"data.synth_dir={ft_world}", *FT,
                 "train.steps=4", "eval.every=1", "eval.best_metric=vqa_acc", "train.lr=3",
                 "train.min_lr=3", "train.warmup_steps=0"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["vqa_acc"] for r in log if r.get("event") in ("eval", "end")}
    assert sorted(scores) == [1, 2, 3, 4]
    best_step = min(s for s in scores if scores[s] == max(scores.values()))  # the first best
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] == best_step and metrics["best_vqa_acc"] == max(scores.values())
    assert metrics["vqa_acc"] == scores[4] <= metrics["best_vqa_acc"]
    if best_step < 4:  # an earlier step was (first) best: OUT/model holds its weights
        from safetensors.torch import load_file

        best_w = load_file(out / "model" / "model.safetensors")
        last_w = load_file(out / "model-last" / "model.safetensors")
        assert any(not torch.equal(best_w[k], last_w[k]) for k in best_w)
    again = tmp_path / "again" / "eval.json"
    assert main(["eval", "vqa", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--out", str(again), "--no-progress"]) == 0
    assert json.loads(again.read_text())["vqa_acc"] == pytest.approx(scores[best_step])
    last = tmp_path / "last" / "eval.json"
    assert main(["eval", "vqa", "--model", str(out / "model-last"), "--data",
                 str(ft_world / "benchmarks"), "--out", str(last), "--no-progress"]) == 0
    assert json.loads(last.read_text())["vqa_acc"] == pytest.approx(scores[4])
    # a metric the task does not report is refused before any work
    capsys.readouterr()
    assert main(["finetune", "vqa", "--out", str(tmp_path / "bad"), "--no-progress",
                 f"init_from={pretrained('regions')}", f"data.synth_dir={ft_world}", *FT,
                 "train.steps=2", "eval.best_metric=CIDEr"]) == 2
    assert "eval.best_metric='CIDEr'" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_resumed_run_remembers_the_best(ft_world, pretrained, tmp_path):
    """The best so far is in every checkpoint: a run stopped at step 2 and resumed to 4 keeps
    the same best step (and OUT/model) as one that ran 4 steps straight."""
    args = ["--no-progress", f"init_from={pretrained('regions')}", f"data.synth_dir={ft_world}",
            *FT, "eval.every=1", "eval.best_metric=vqa_acc", "train.lr=3", "train.min_lr=3",
            "train.warmup_steps=0", "train.save_every=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["finetune", "vqa", "--out", str(whole), "train.steps=4", *args]) == 0
    assert main(["finetune", "vqa", "--out", str(part), "train.steps=2", *args]) == 0
    assert main(["finetune", "vqa", "--out", str(part), "--resume", "latest",
                 "train.steps=4"]) == 0
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((part / "metrics.json").read_text())
    assert (a["best_step"], a["best_vqa_acc"]) == (b["best_step"], b["best_vqa_acc"])
    from safetensors.torch import load_file

    wa, wb = load_file(whole / "model" / "model.safetensors"), \
        load_file(part / "model" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=key)
