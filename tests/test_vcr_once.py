"""VCR encodes each image once per question: the head's scores (evaluation: 4 answers + 16
rationales a question) and training gradients equal those of the former path, which repeated
the raw visual inputs for every sequence and encoded them 20 times; the image's encoder now sees
one row per question."""
import pytest
import torch

from vlp.config import FinetuneConfig
from vlp.models.heads.vcr import VCRHead, vcr_loss
from vlp.models.joint import JointEncoder
from vlp.tasks.vcr import VCRTask, model_inputs


def former_forward(self, backbone, *, input_ids, attention_mask, token_objects, visual):
    """VCRHead.forward before issue 16: every sequence got its item's raw visual inputs, so
    the backbone encoded the image once per sequence."""
    b, g, c, length = input_ids.shape
    visual = dict(visual)
    boxes, box_mask = visual.pop("object_boxes", None), visual.pop("object_mask", None)

    def per_sequence(t):
        return None if t is None else t.repeat_interleave(g * c, dim=0)

    hidden = backbone(input_ids.reshape(-1, length), attention_mask.reshape(-1, length),
                      {k: per_sequence(v) for k, v in visual.items()},
                      token_objects=None if token_objects is None
                      else token_objects.reshape(-1, length),
                      object_boxes=per_sequence(boxes), object_mask=per_sequence(box_mask))
    return {"logits": self.scorer(hidden[:, 0]).view(b, g, c)}


def _image_encoder(backbone: JointEncoder):
    """The module that turns an image into visual tokens (its rows = images encoded)."""
    if backbone.architecture != "single_stream":
        return backbone.core.towers.visual.transformer
    return backbone.core.patch_embed if backbone.visual_tokens == "patches" \
        else backbone.core.region_embed


def _task(ft_world, pretrained, family, batch_size=6) -> VCRTask:
    cfg = FinetuneConfig(task="vcr")
    cfg.data.num_workers, cfg.eval.batch_size = 0, batch_size
    backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained(family))
    return VCRTask(cfg, backbone, tokenizer, transform, ft_world / "benchmarks")


@pytest.mark.parametrize("family", ["regions", "patches", "dual_tower", "combined"])
def test_eval_scores_unchanged_and_one_encoding_per_question(ft_world, pretrained, family,
                                                             monkeypatch):
    task = _task(ft_world, pretrained, family)
    model = task.build_model().eval()
    data = task.dataset("val")
    batch = task.collate([data[i] for i in range(6)])
    assert batch.input_ids.shape[:3] == (6, 5, 4)  # 4 answers + 4 rationales x 4 answers
    assert (batch.fields["token_objects"] >= 0).any()  # grounded words are in play
    rows: list[int] = []
    hook = _image_encoder(model.backbone).register_forward_hook(
        lambda m, args, out: rows.append(out.shape[0]))
    with torch.no_grad():
        new = model(**model_inputs(batch, "cpu", torch.float32))["logits"]
        once = list(rows)
        rows.clear()
        with monkeypatch.context() as m:
            m.setattr(VCRHead, "forward", former_forward)
            old = model(**model_inputs(batch, "cpu", torch.float32))["logits"]
    hook.remove()
    assert new.shape == old.shape == (6, 5, 4)
    assert torch.allclose(new, old, atol=1e-5, rtol=0), (new - old).abs().max()
    assert (new.argmax(-1) == old.argmax(-1)).all()
    # the image encoder saw each question's image once (regions: the visual tokens and the
    # grounded objects' embeddings, one row per question each), formerly 20 times
    assert once and all(n == 6 for n in once), once
    assert all(n == 6 * 20 for n in rows), rows

    # the whole evaluation: the same probabilities for every question, both ways
    got = task.predict(model, "val", progress=False)
    with monkeypatch.context() as m:
        m.setattr(VCRHead, "forward", former_forward)
        want = task.predict(model, "val", progress=False)
    assert [r["annot_id"] for r in got] == [r["annot_id"] for r in want] and len(got) >= 16
    for a, b in zip(got, want):
        assert a["answer_probs"] == pytest.approx(b["answer_probs"], abs=1e-6)
        assert torch.allclose(torch.tensor(a["rationale_probs"]),
                              torch.tensor(b["rationale_probs"]), atol=1e-6)


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_training_gradients_unchanged(ft_world, pretrained, family, monkeypatch):
    """Training (one group of 4 choices per item) shares the encoding too: the loss and every
    parameter's gradient, the image encoder's included, are the former path's."""
    task = _task(ft_world, pretrained, family)
    model = task.build_model().train()
    data = task.dataset("train")
    batch = task.collate([data[i] for i in range(8)])
    assert batch.input_ids.shape[:3] == (8, 1, 4)

    def grads():
        model.zero_grad()
        out = model(**model_inputs(batch, "cpu", torch.float32))
        loss = vcr_loss(out["logits"], batch.fields["labels"])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    loss, new = grads()
    with monkeypatch.context() as m:
        m.setattr(VCRHead, "forward", former_forward)
        old_loss, old = grads()
    assert loss == pytest.approx(old_loss, abs=1e-6)
    assert new.keys() == old.keys()
    encoder = [n for n in new if n.startswith(("backbone.core.towers.visual.",
                                               "backbone.core.region_embed."))]
    assert encoder  # the image encoder is trained, and its gradient is the same
    for name in new:
        assert torch.allclose(new[name], old[name], atol=1e-6, rtol=1e-4), name
