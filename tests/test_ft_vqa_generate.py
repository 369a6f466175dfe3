"""Generative VQA (vqa.head=generate | rank): the training rows and weights, the run end to end
(official results file scored by `vlp eval vqa`), an answer outside the training vocabulary,
and the cached decoder and the ranking checked against plain forward passes."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import vlp
from vlp.cli import main
from vlp.config import ConfigError, FinetuneConfig, load_config
from vlp.engine.setup import benchmark_root
from vlp.models.heads.caption import beam_search
from vlp.models.heads.vqa import answer_lm_loss
from vlp.models.joint import JointEncoder
from vlp.eval.vqa_metric import evaluate_vqa, normalize_answer
from vlp.tasks import build_task
from vlp.tasks.vqa import answer_tokens, answer_weights, generate_answers, \
    join_question_answer, rank_scores

FT = ["train.batch_size=8", "train.save_every=0", "train.log_every=1", "eval.batch_size=32",
      "data.num_workers=0", "eval.split=val"]


def make_task(ft_world, pretrained, family, *overrides):
    cfg = load_config(None, ["task=vqa", f"init_from={pretrained(family)}",
                             f"data.synth_dir={ft_world}", "data.num_workers=0",
                             "eval.batch_size=16", *overrides], cls=FinetuneConfig)
    encoder, tokenizer, transform = JointEncoder.from_pretrained(cfg.init_from)
    task = build_task(cfg, encoder, tokenizer, transform, benchmark_root(cfg.data, False))
    return task, task.build_model().eval()


def first_batch(task, n):
    return next(iter(task.eval_loader("val"))).first(n)


# ------------------------------------------------------------------ pieces
def test_answer_weights_are_annotator_shares():
    # 6 "yes", 3 "no", 1 "maybe": shares of the creditable answers; "Yes" normalises to "yes"
    got = answer_weights(["yes"] * 5 + ["Yes"] + ["no"] * 3 + ["maybe"])
    assert [a for a, _ in got] == ["yes", "no", "maybe"]
    assert [w for _, w in got] == pytest.approx([0.6, 0.3, 0.1])
    # a lone human "two" is never credited by the official scorer (predictions become "2"):
    # left out, the others renormalised
    assert answer_weights(["2"] * 9 + ["two"]) == [("2", 1.0)]


def test_training_answers_in_spellings_the_tokenizer_writes(ft_world, pretrained):
    """A tokenizer without digit tokens (the shapes world's) learns numbers as words the
    official scorer reads as the digits; an answer with no writable spelling is left out."""
    task, _ = make_task(ft_world, pretrained, "regions", "vqa.head=generate")
    tok = task.tokenizer
    assert tok.decode(answer_tokens(tok, ["2"], 8)[0][0]) == ""  # "2" is an unknown piece
    assert tok.decode(answer_tokens(tok, ["two"], 8)[0][0]) == "two"
    assert normalize_answer("two") == "2"
    rows = task.training_answers(["2"] * 6 + ["two"] + ["yes"] * 3)
    # "2" and "two" are one normalised answer: 7 of 10 annotators
    assert rows == [("two", pytest.approx(0.7)), ("yes", pytest.approx(0.3))]
    assert task.training_answers(["@@@"] * 10) == []


def test_join_question_answer_by_hand():
    pad = 0
    q = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    qm = (q != 0).long()
    a = torch.tensor([[5, 102, 0], [6, 4, 102]])
    am = (a != 0).long()
    ids, mask, labels = join_question_answer(q, qm, a, am, pad)
    # row 0: [CLS] 7 8 [SEP] 5 [SEP] -> input drops the last token, labels the next tokens
    assert ids.tolist() == [[101, 7, 8, 102, 5, 102], [101, 9, 102, 6, 4, 102]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 5, 102, -100], [-100, -100, 6, 4, 102, -100]]
    # the loss: each row's summed answer NLL times its weight, over the questions
    logits = torch.randn(int((labels != -100).sum()), 200)
    w = torch.tensor([0.25, 0.75])
    nll = F.cross_entropy(logits, labels[labels != -100], reduction="none")
    expected = (0.25 * nll[:2].sum() + 0.75 * nll[2:].sum()) / 1
    assert answer_lm_loss(logits, labels, w, 1) == pytest.approx(float(expected), rel=1e-6)


def test_config_errors_name_key_and_values(ft_world, pretrained):
    with pytest.raises(ConfigError, match=r"vqa.head.*'classify', 'generate', 'rank'"):
        load_config(None, ["task=vqa", "vqa.head=beam"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="vqa.max_answer_length=0 must be > 0"):
        load_config(None, ["task=vqa", "vqa.max_answer_length=0"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="vqa.max_question_length.*text positions"):
        make_task(ft_world, pretrained, "regions", "vqa.head=generate",
                  "vqa.max_question_length=300")


# ------------------------------------------------------------------ the run
@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_generate_finetune_results_scored_by_eval(ft_world, pretrained, tmp_path, family,
                                                  capsys):
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress", "train.steps=3",
                 f"init_from={pretrained(family)}", f"data.synth_dir={ft_world}", *FT,
                 "vqa.head=generate"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and 0.0 <= metrics["vqa_acc"] <= 100.0
    assert "train_answer_token_acc" in json.loads(
        (out / "train_log.jsonl").read_text().splitlines()[0])
    vqa = ft_world / "benchmarks" / "vqa"
    results_file = out / "vqa_val_results.json"
    results = json.loads(results_file.read_text())
    questions = json.loads((vqa / "v2_OpenEnded_mscoco_val_questions.json").read_text())
    assert sorted(r["question_id"] for r in results) == sorted(
        q["question_id"] for q in questions["questions"])
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str)
               for r in results)
    scored = tmp_path / "scored.json"
    assert main(["eval", "vqa", "--predictions", str(results_file),
                 "--questions", str(vqa / "v2_OpenEnded_mscoco_val_questions.json"),
                 "--annotations", str(vqa / "v2_mscoco_val_annotations.json"),
                 "--out", str(scored)]) == 0
    assert json.loads(scored.read_text())["vqa_acc"] == pytest.approx(metrics["vqa_acc"])
    # the model directory remembers the head: `vlp eval vqa --model` decodes the same answers
    assert json.loads((out / "model" / "config.json").read_text())["head"]["head"] == "generate"
    again = tmp_path / "again" / "eval.json"
    assert main(["eval", "vqa", "--model", str(out / "model"), "--data",
                 str(ft_world / "benchmarks"), "--out", str(again), "--no-progress"]) == 0
    assert json.loads(again.read_text())["vqa_acc"] == pytest.approx(metrics["vqa_acc"])
    # and vlp.load(...).answer gives a results-file answer
    model = vlp.load(out / "model")
    q = questions["questions"][0]
    img = ft_world / "benchmarks" / "images" / f"{q['image_id']:012d}.jpg"
    reg = ft_world / "benchmarks" / "regions" / f"{q['image_id']:012d}.npz"
    got = model.answer(img, q["question"], regions=reg if family == "regions" else None)
    assert got == next(r["answer"] for r in results if r["question_id"] == q["question_id"])
    # rank mode on the same trained weights, chosen on the command line: every answer comes
    # from the answer list
    ranked = tmp_path / "ranked"
    model_args = ["eval", "vqa", "--model", str(out / "model"), "--data",
                  str(ft_world / "benchmarks"), "--no-progress"]
    assert main([*model_args, "--out", str(ranked / "eval.json"), "vqa.head=rank"]) == 0
    vocab = json.loads((out / "model" / "answers.json").read_text())
    assert {r["answer"] for r in json.loads(
        (ranked / "vqa_val_results.json").read_text())} <= set(vocab)
    assert json.loads((ranked / "eval.json").read_text())["vqa_acc"] == pytest.approx(
        evaluate_vqa(ranked / "vqa_val_results.json",
                     vqa / "v2_OpenEnded_mscoco_val_questions.json",
                     vqa / "v2_mscoco_val_annotations.json")["vqa_acc"])
    # a classifier needs other weights; a training key would change nothing: one line each
    capsys.readouterr()
    for bad, says in (("vqa.head=classify", r"fine-tuned with vqa.head=generate, whose weights "
                       r"serve vqa.head=generate or rank only"),
                      ("train.steps=5", r"'train.steps=5': with --model, settings are key=value "
                       r"with a key under vqa.\*, eval.\*, data.\*")):
        assert main([*model_args, bad]) == 2
        assert re.search(says, capsys.readouterr().err)


# ------------------------------------------------------------------ open vocabulary
def test_generate_produces_an_answer_outside_the_training_vocabulary(ft_world, pretrained):
    """Teach one val question an answer no training annotation holds (a word the tokenizer
    writes, from the captions), through the head's own loss; the task's decoding then answers
    it, which a decoder restricted to the training answers could not."""
    task, model = make_task(ft_world, pretrained, "regions", "vqa.head=generate",
                            "vqa.num_answers=1000")
    training = {a for r in task.records("train") for a in r["answers"]}
    training |= {normalize_answer(a) for a in training}
    unseen = next(w for w in ("left", "right", "above", "below", "small", "large", "big")
                  if w not in training and task.tokenizer.decode(
                      answer_tokens(task.tokenizer, [w], 8)[0][0].tolist()) == w)
    assert unseen not in task.answers
    batch = first_batch(task, 1)
    ids, mask = batch.input_ids, batch.attention_mask
    a_ids, a_mask = answer_tokens(task.tokenizer, [unseen], task.cfg.vqa.max_answer_length)
    x, m, labels = join_question_answer(ids, mask, a_ids, a_mask, task.tokenizer.pad_id)
    visual = batch.visual(None, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        out = model(input_ids=x, attention_mask=m, visual=visual, labels=labels)
        loss = answer_lm_loss(out["logits"], labels, torch.ones(1), 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    got = generate_answers(model, visual, ids, mask, task.tokenizer, max_length=8)
    assert got == [unseen]
    # the task's own evaluation path gives it too, in the official results file
    results = task.predict(model, "val", progress=False)
    assert next(r["answer"] for r in results
                if r["question_id"] == batch.fields["question_id"][0]) == unseen


# ------------------------------------------------------------------ against plain forwards
@torch.no_grad()
def plain_log_likelihood(model, visual_row, question_ids, answer_ids):
    """Summed log-probability of answer_ids after [CLS] q [SEP], one uncached forward."""
    seq = torch.cat([question_ids, answer_ids])[None]
    hidden = model.backbone(seq[:, :-1], torch.ones_like(seq[:, :-1]), visual_row,
                            causal_text=True)
    logp = F.log_softmax(model.backbone.mlm_head(hidden[0]).float(), dim=-1)
    lq = len(question_ids)
    return sum(float(logp[lq - 1 + j, t]) for j, t in enumerate(answer_ids.tolist()))


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_rank_and_generate_match_plain_forwards(ft_world, pretrained, family):
    task, model = make_task(ft_world, pretrained, family, "vqa.head=rank")
    torch.manual_seed(0)
    with torch.no_grad():  # away from the pretrained weights' ties
        for p in model.backbone.mlm_head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = first_batch(task, 6)
    ids, mask = batch.input_ids, batch.attention_mask
    assert len(set(mask.sum(1).tolist())) > 1  # questions of several lengths, one batch
    visual = batch.visual(None, torch.float32)
    candidates = task.candidates
    c_ids, c_mask = answer_tokens(task.tokenizer, task.candidate_texts,
                                  task.cfg.vqa.max_answer_length)
    assert c_mask.sum(1).min() < c_mask.shape[1]  # candidates of several lengths (padding)
    scores = rank_scores(model, visual, ids, mask, c_ids, c_mask)
    for i in range(len(batch)):
        row = {k: v[i:i + 1] for k, v in visual.items()}
        q = ids[i, :int(mask[i].sum())]
        ref = torch.tensor([plain_log_likelihood(model, row, q, c_ids[c, :int(c_mask[c].sum())])
                            for c in range(len(candidates))])
        assert torch.allclose(scores[i], ref, atol=1e-4)
        assert int(scores[i].argmax()) == int(ref.argmax())
    # the task's predictions are the argmax candidates
    results = {r["question_id"]: r["answer"] for r in task.predict(model, "val", False)}
    for qid, k in zip(batch.fields["question_id"], scores.argmax(1).tolist()):
        assert results[qid] == candidates[k]
    # cached greedy decoding == a greedy loop of plain forwards (argmax of the full logits,
    # special tokens but [SEP] never chosen)
    got = generate_answers(model, visual, ids, mask, task.tokenizer, max_length=4)
    special = {task.tokenizer.cls_id, task.tokenizer.pad_id, task.tokenizer.mask_id}
    special |= {i for i, t in task.tokenizer.hf.get_added_tokens_decoder().items()
                if t.special}
    special.discard(task.tokenizer.sep_id)
    for i in range(len(batch)):
        row = {k: v[i:i + 1] for k, v in visual.items()}
        seq = ids[i, :int(mask[i].sum())].tolist()
        answer = []
        for t in range(4):
            x = torch.tensor([seq + answer])
            with torch.no_grad():
                logits = model.backbone.mlm_head(model.backbone(
                    x, torch.ones_like(x), row, causal_text=True)[0, -1]).float()
            logits[sorted(special - {None})] = float("-inf")
            if t == 0:
                logits[task.tokenizer.sep_id] = float("-inf")  # at least one word
            nxt = int(logits.argmax())
            if nxt == task.tokenizer.sep_id:
                break
            answer.append(nxt)
        assert got[i] == task.tokenizer.decode(answer).strip()
    # cached beam search == the same search over uncached steps (plain forwards), per question
    beams = generate_answers(model, visual, ids, mask, task.tokenizer, max_length=4,
                             beam_size=3)
    for i in range(len(batch)):
        row = {k: v[i:i + 1] for k, v in visual.items()}
        q = ids[i:i + 1, :int(mask[i].sum())]

        def step(tokens, images):
            x = torch.cat([q.expand(len(tokens), -1), tokens[:, 1:]], dim=1)
            rows = {k: v.expand(len(tokens), *v.shape[1:]) for k, v in row.items()}
            with torch.no_grad():
                hidden = model.backbone(x, torch.ones_like(x), rows, causal_text=True)
            return model.backbone.mlm_head(hidden[:, -1])

        seq = beam_search(step, 1, bos_id=task.tokenizer.sep_id, eos_id=task.tokenizer.sep_id,
                          beam_size=3, max_length=4, length_penalty=0.0,
                          banned_ids=sorted(special - {None}))[0]
        assert beams[i] == task.tokenizer.decode(seq).strip()
