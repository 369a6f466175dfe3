"""Self-critical sequence training for captioning: sampling (the rules, its log-probabilities
equal to the teacher-forced pass the loss takes, the KV cache), the gradient's sign on a tiny
model, and `vlp finetune caption caption.scst=true` end to end from a cross-entropy model."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlp.cli import main
from vlp.config import ModelConfig, to_dict
from vlp.models.heads.caption import CachedStep, CaptionHead, lm_sequences, sample_search, \
    scst_loss, sequence_logprobs
from vlp.models.joint import FinetunedModel, JointEncoder

PAD, BOS, EOS, MASK = 0, 1, 2, 3
BANNED = (PAD, BOS, MASK)
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="the COCO caption metrics need Java")


def tiny_model(seed: int = 0) -> tuple[FinetunedModel, dict]:
    """A random single-stream (region tokens) caption model and 2 images' visual inputs."""
    cfg = ModelConfig()
    for tower in (cfg.vision, cfg.text, cfg.fusion):
        tower.width, tower.layers, tower.heads = 32, 2, 2
    cfg.visual_tokens, cfg.max_regions = "regions", 5
    spec = {"architecture": "single_stream", "region_feature_dim": 12, "model": to_dict(cfg)}
    torch.manual_seed(seed)
    model = FinetunedModel(JointEncoder(spec, vocab_size=12), CaptionHead())
    g = torch.Generator().manual_seed(seed + 1)
    xy = torch.rand(2, 5, 2, generator=g) * 0.5
    visual = {"region_features": torch.randn(2, 5, 12, generator=g),
              "region_boxes": torch.cat([xy, xy + 0.4], -1),
              "region_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()}
    return model, visual


def teacher_forced(model, visual, seqs, k, max_length):
    """Summed log-probabilities of `seqs` (k rows per image) with gradients, as the task's loss
    takes them: one pass, the visual inputs repeated per sample."""
    ids, mask, labels = lm_sequences(seqs, bos_id=BOS, eos_id=EOS, max_length=max_length)
    rep = {name: v.repeat_interleave(k, 0) for name, v in visual.items()}
    out = model(input_ids=ids, attention_mask=mask, visual=rep, labels=labels)
    return sequence_logprobs(out["logits"], labels, eos_id=EOS, banned_ids=BANNED), labels


def test_samples_follow_the_rules_and_their_logprobs_are_the_teacher_forced_ones():
    model, visual = tiny_model()
    model.eval()
    k, max_length = 6, 7
    with torch.no_grad():
        encoded = model.backbone.encode_visual(visual)
        step = CachedStep(model.backbone, encoded)
        torch.manual_seed(5)
        seqs, logp = sample_search(step, 2, num_samples=k, bos_id=BOS, eos_id=EOS,
                                   max_length=max_length, banned_ids=BANNED, reorder=step.reorder)
        # the same draws without the cache (the whole prefix re-encoded at each step)
        def uncached(tokens, images):
            rows = {name: v[images] for name, v in encoded.items()}
            return model.head.next_token_logits(model.backbone, tokens, rows)
        torch.manual_seed(5)
        again, logp2 = sample_search(uncached, 2, num_samples=k, bos_id=BOS, eos_id=EOS,
                                     max_length=max_length, banned_ids=BANNED)
    assert seqs == again and torch.allclose(logp, logp2, atol=1e-4)
    assert len(seqs) == 2 * k and all(1 <= len(s) <= max_length for s in seqs)
    assert all(not set(s) & {PAD, BOS, MASK, EOS} for s in seqs)
    assert len({tuple(s) for s in seqs}) > 2  # sampled, not one argmax sequence
    with torch.no_grad():
        forced, _ = teacher_forced(model, visual, seqs, k, max_length)
    assert torch.allclose(forced, logp, atol=1e-4)
    # and those are the log-probabilities of the distribution with the bans, by hand
    with torch.no_grad():
        s = seqs[k]  # image 1's first sample
        full = [BOS, *s] + ([EOS] if len(s) < max_length else [])
        rows = {name: v[1:2] for name, v in visual.items()}
        total = 0.0
        for t in range(1, len(full)):
            logits = model.head.next_token_logits(model.backbone, torch.tensor([full[:t]]), rows)[0]
            logits[list(BANNED)] = float("-inf")
            if t == 1:
                logits[EOS] = float("-inf")  # min_length=1
            total += float(F.log_softmax(logits, -1)[full[t]])
    assert logp[k].item() == pytest.approx(total, abs=1e-4)


def test_sampling_matches_the_distribution():
    """One step from a fixed distribution: the frequencies of 4000 draws are its
    probabilities (a wrong bans/renormalisation or argmax would not be)."""
    probs = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.5, 0.3, 0.1])  # EOS=2 and words 4..6

    def step(tokens, images):
        logits = probs.clamp_min(1e-30).log() + 3.0  # any shift: softmax is the same
        logits[PAD] = 5.0  # banned: must never come out, and not count in the normalisation
        return logits.expand(len(tokens), -1).clone()

    torch.manual_seed(0)
    seqs, logp = sample_search(step, 1, num_samples=4000, bos_id=BOS, eos_id=EOS,
                               max_length=1, min_length=0, banned_ids=BANNED)
    first = torch.tensor([s[0] if s else EOS for s in seqs])
    freq = torch.bincount(first, minlength=7).float() / 4000
    assert freq[PAD] == 0 and freq[BOS] == 0 and freq[MASK] == 0
    assert torch.allclose(freq, probs, atol=0.03)
    assert torch.allclose(logp, probs.log()[first], atol=1e-5)


def test_gradient_raises_the_better_sample():
    """One SGD step on the self-critical loss: the sample whose reward beats the greedy
    caption's gets likelier, the one below it less likely."""
    model, visual = tiny_model(seed=3)
    visual = {name: v[:1] for name, v in visual.items()}  # one image
    better, worse = [4, 5, 6], [7, 8]
    rewards, baseline = torch.tensor([1.5, 0.2]), torch.tensor([0.8, 0.8])
    before, labels = teacher_forced(model, visual, [better, worse], 2, 8)
    loss = scst_loss(before, rewards, baseline, (labels != -100).sum())
    assert loss.item() == pytest.approx(
        -float((rewards - baseline) @ before.detach()) / 7)  # 4 + 3 tokens with [SEP]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = teacher_forced(model, visual, [better, worse], 2, 8)
    assert after[0] > before[0].detach() + 1e-3
    assert after[1] < before[1].detach() - 1e-3
    # equal rewards: no gradient at all (the greedy caption is the baseline)
    model.zero_grad()
    again, labels = teacher_forced(model, visual, [better, worse], 2, 8)
    scst_loss(again, baseline, baseline, (labels != -100).sum()).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_leave_one_out_baseline():
    from vlp.tasks.caption import leave_one_out_mean

    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.5, 0.5])  # 2 images x 3 samples
    assert leave_one_out_mean(r, 3).tolist() == [4.0, 3.5, 1.5, 0.5, 0.25, 0.25]


def test_rewards_score_each_sample_against_its_own_image():
    from types import SimpleNamespace

    from vlp.eval.cider import CiderD, simple_tokenize
    from vlp.tasks.caption import CaptionTask
    from vlp.tokenizer import train_tokenizer

    refs = {7: ["a red circle", "one red circle on the left", "a circle that is red"],
            9: ["two blue squares", "blue squares at the top", "a pair of blue squares"]}
    tokenizer = train_tokenizer([c for cs in refs.values() for c in cs] * 20, vocab_size=80)
    words = {i: [simple_tokenize(c) for c in cs] for i, cs in refs.items()}
    task = SimpleNamespace(tokenizer=tokenizer, train_refs=words, cider=CiderD(words.values()))

    def ids(text):
        return [i for i in tokenizer.hf.encode(text, add_special_tokens=False).ids
                if i != tokenizer.pad_id]

    greedy = [ids("a red circle"), ids("a red circle")]  # image 9's greedy caption is wrong
    samples = [ids("a circle"), ids("red circle on the left"),  # image 7
               ids("two blue squares"), ids("blue circle")]  # image 9
    sample_cider, greedy_cider = CaptionTask.rewards(task, [7, 9], greedy, samples)
    expect = [task.cider.score(simple_tokenize(t), words[i]) for t, i in
              [("a circle", 7), ("red circle on the left", 7), ("two blue squares", 9),
               ("blue circle", 9)]]
    assert sample_cider.tolist() == pytest.approx(expect, rel=1e-6)
    g7, g9 = (task.cider.score(["a", "red", "circle"], words[i]) for i in (7, 9))
    assert greedy_cider.tolist() == pytest.approx([g7, g7, g9, g9], rel=1e-6)
    assert sample_cider[2] > greedy_cider[2] and g7 > g9


def test_lm_sequences_layout():
    ids, mask, labels = lm_sequences([[5, 6], [7, 8, 9]], bos_id=BOS, eos_id=EOS, max_length=3)
    # a row of max_length tokens was cut: no [SEP] target
    assert ids.tolist() == [[BOS, 5, 6], [BOS, 7, 8]]
    assert labels.tolist() == [[5, 6, EOS], [7, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    ids, mask, labels = lm_sequences([[5], [7, 8]], bos_id=BOS, eos_id=EOS, max_length=5)
    assert ids.tolist() == [[BOS, 5, 0], [BOS, 7, 8]]
    assert labels.tolist() == [[5, EOS, -100], [7, 8, EOS]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]


class _NoMeteor:
    """METEOR's Java start-up (~20 s) is not what these runs test (see test_ft_caption.py)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(res)


FT = ["train.threads=1", "train.batch_size=8", "train.save_every=0", "train.log_every=1",
      "eval.batch_size=8", "data.num_workers=0", "eval.split=test", "caption.max_length=10",
      "caption.beam_size=1"]


@needs_java
def test_scst_finetune_from_a_cross_entropy_model(ft_world, pretrained, tmp_path,
                                                  monkeypatch):
    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", _NoMeteor)
    init = pretrained("regions")
    xe, sc, still = tmp_path / "xe", tmp_path / "scst", tmp_path / "scst_lr0"
    common = ["--no-progress", f"init_from={init}", f"data.synth_dir={ft_world}", *FT]
    assert main(["finetune", "caption", "--out", str(xe), "train.steps=4", *common]) == 0
    # lr ~0 (0 is refused): the run starts from (and keeps) the cross-entropy weights, so
    # it scores the same
    assert main(["finetune", "caption", "--out", str(still), "train.steps=1", "train.lr=1e-30",
                 "caption.scst=true", "caption.scst_samples=3",
                 f"caption.init_caption={xe / 'model'}", *common]) == 0
    a, b = load_file(xe / "model" / "model.safetensors"), \
        load_file(still / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-20, msg=k)
    m_xe = json.loads((xe / "metrics.json").read_text())
    assert json.loads((still / "metrics.json").read_text())["CIDEr"] == m_xe["CIDEr"]

    assert main(["finetune", "caption", "--out", str(sc), "train.steps=3", "train.lr=1e-4",
                 "caption.scst=true", "caption.scst_samples=3",
                 f"caption.init_caption={xe / 'model'}", *common]) == 0
    metrics = json.loads((sc / "metrics.json").read_text())
    # a sample is an image here: 48 training images (train + restval), 8 a step
    assert metrics["train_steps"] == 3 and metrics["train_samples"] == 24
    for key in ("CIDEr", "BLEU_4", "ROUGE_L"):
        assert 0.0 <= metrics[key] <= 1000.0, key
    log = [json.loads(line) for line in (sc / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0 <= r["train_sample_cider"] <= 1000 and 0 <= r["train_greedy_cider"] <= 1000
        assert r["train_scst_reward"] == pytest.approx(r["train_sample_cider"] -
                                                       r["train_greedy_cider"], abs=1e-3)
    results = json.loads((sc / "caption_test_results.json").read_text())
    assert len(results) == metrics["num_images"] and all(r["caption"].strip() for r in results)
    w = load_file(sc / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], w[k]) for k in a)  # it did train


def test_init_caption_must_be_a_caption_model(ft_world, pretrained, tmp_path, capsys):
    init = pretrained("regions")
    code = main(["finetune", "caption", "--out", str(tmp_path / "x"), "--no-progress",
                 f"init_from={init}", f"data.synth_dir={ft_world}", "train.steps=1",
                 "caption.scst=true", f"caption.init_caption={init}", *FT])
    assert code != 0
    err = capsys.readouterr().err
    assert "architecture 'single_stream' is not usable here" in err and "Traceback" not in err
    code = main(["finetune", "caption", "--out", str(tmp_path / "y"), "--no-progress",
                 f"init_from={init}", f"data.synth_dir={ft_world}", "caption.scst_samples=0"])
    assert code != 0 and "caption.scst_samples=0 must be >= 1" in capsys.readouterr().err
    code = main(["finetune", "caption", "--out", str(tmp_path / "z"), "--no-progress",
                 f"init_from={init}", f"data.synth_dir={ft_world}", "caption.scst=true",
                 "caption.scst_baseline=mean", "caption.scst_samples=1"])
    assert code != 0 and "needs caption.scst_samples >= 2" in capsys.readouterr().err
    code = main(["finetune", "caption", "--out", str(tmp_path / "w"), "--no-progress",
                 f"init_from={init}", f"data.synth_dir={ft_world}", "caption.scst=true",
                 "train.deepspeed=configs/deepspeed/zero3.json"])
    err = capsys.readouterr().err
    assert code != 0 and "use ZeRO stage 0-2" in err and "Traceback" not in err


def test_scst_two_processes(ft_world, pretrained, tmp_path):
    """2 processes (torchrun, gloo, ZeRO-2, bf16 autocast): each rank decodes and scores its own
    images; the run trains and logs rewards averaged over the ranks."""
    from launch import ROOT, run, train_log

    out = tmp_path / "scst2"
    run("torchrun", 2, ["finetune", "caption", "--out", str(out), "--no-progress",
                        f"init_from={pretrained('regions')}", f"data.synth_dir={ft_world}",
                        "train.steps=2", "train.batch_size=4", "train.threads=1",
                        "train.save_every=0", "train.log_every=1", "train.precision=bf16",
                        f"train.deepspeed={ROOT}/configs/deepspeed/zero2.json",
                        "data.num_workers=0", "eval.at_end=false", "caption.max_length=8",
                        "caption.scst=true", "caption.scst_samples=2"])
    log = train_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[-1]["samples_seen"] == 2 * 2 * 4  # images: steps x ranks x batch
    for r in log:
        assert r["train_scst_reward"] == pytest.approx(r["train_sample_cider"] -
                                                       r["train_greedy_cider"], abs=1e-3)
    assert (out / "model" / "model.safetensors").is_file()
