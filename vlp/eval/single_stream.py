"""Evaluation of a single-stream model on held-out shards: what the visual tokens add.

Every metric is computed twice on the same masks and pairs: with the visual tokens, and with
them blanked (hidden from attention: the same weights as a text-only model).

- mlm_acc: BERT masking (15%, fixed seed) of the captions, accuracy on the masked tokens;
- attr_mlm_acc: every colour and shape word of the caption masked (the words only the image
  can tell: "a [MASK] [MASK] on the left"), accuracy on them;
- itm_acc: each image with its own caption and with the next sample's caption (a negative unless
  the two captions are identical), accuracy of the matching head over both;
- mrc_acc: 15% of the regions masked, accuracy of the region-label head (regions/roi_align
  with labels; no text-only variant: there are no regions to mask without visual tokens).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from vlp.data.pipeline import make_loader
from vlp.data.synth import COLORS, SHAPES
from vlp.data.transforms import ImageTransform
from vlp.objectives.masking import IGNORE, mask_regions, mask_tokens, mask_words

ATTRIBUTE_WORDS = sorted(set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} |
                         {"crosses"})


def attribute_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the colour/shape words that are one token in this vocabulary."""
    ids = []
    for word in ATTRIBUTE_WORDS:
        enc = tokenizer.hf.encode(word, add_special_tokens=False)
        # the tokenizer may be set to pad every encoding (Tokenizer.__call__ does): drop pads
        pieces = [i for i, real in zip(enc.ids, enc.attention_mask) if real]
        if len(pieces) == 1:
            ids.append(pieces[0])
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


class Accuracy:
    """Argmax accuracy (percent) accumulated over batches; targets equal to IGNORE are left out."""

    def __init__(self):
        self.right, self.total = 0, 0

    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE
        self.right += int((logits.argmax(-1)[valid] == target[valid]).sum())
        self.total += int(valid.sum())

    def value(self) -> float:
        return 100.0 * self.right / self.total if self.total else float("nan")


@torch.no_grad()
def evaluate_single_stream(model, recipe, data: str, *, batch_size: int = 128,
                           progress: bool = True, max_samples: int = 0) -> dict:
    """MLM / attribute-word MLM / ITM / MRC accuracy of `model` (a SingleStream, on its
    device) on the shards `data`, each also with the visual tokens blanked; `recipe` supplies
    the tokenizer, the visual token settings and the heads."""
    tok, cfg = recipe.tokenizer, recipe.cfg
    device = next(model.parameters()).device
    loader = make_loader(data, tokenizer=tok,
                         transform=ImageTransform(cfg.model.vision.image_size, train=False),
                         batch_size=batch_size, context_length=cfg.model.text.context_length,
                         num_workers=0, shuffle_buffer=0, seed=0, caption="first",
                         drop_last=False, **recipe.loader_kwargs())
    attr_ids = attribute_token_ids(tok)
    acc = {name: Accuracy() for name in ("mlm", "attr_mlm", "itm", "mrc")}
    acc.update({f"{name}_text_only": Accuracy() for name in ("mlm", "attr_mlm", "itm")})
    n = 0
    for i, batch in enumerate(tqdm(loader, desc="eval single-stream", unit="batch",
                                   disable=not progress)):
        if max_samples and n >= max_samples:
            break
        if not len(batch):
            continue
        n += len(batch)
        batch = batch.to(device)
        ids, mask = batch.input_ids, batch.attention_mask
        visual = batch.visual(device, torch.float32)
        g = torch.Generator(device).manual_seed(i)
        masked, labels = mask_tokens(ids, mask, prob=0.15, special_ids=recipe.special_ids,
                                     mask_id=tok.mask_id, vocab_size=tok.vocab_size, generator=g)
        attr_in, attr_labels, is_attr = mask_words(ids, mask, attr_ids.to(device), tok.mask_id)
        shifted = torch.roll(torch.arange(len(batch), device=device), 1)
        itm_ids = torch.cat([ids, ids[shifted]])
        itm_mask = torch.cat([mask, mask[shifted]])
        itm_target = torch.cat([torch.ones(len(batch), dtype=torch.long, device=device),
                                (ids[shifted] == ids).all(1).long()])
        itm_visual = {k: torch.cat([v, v]) for k, v in visual.items()}
        for blank, suffix in ((False, ""), (True, "_text_only")):
            if "mlm" in recipe.heads:
                out = model(masked, mask, task="masked", mlm_labels=labels, blank_visual=blank,
                            **visual)
                acc["mlm" + suffix].add(out["mlm_logits"], labels[labels != IGNORE])
                out = model(attr_in, mask, task="masked", mlm_labels=attr_labels,
                            blank_visual=blank, **visual)
                acc["attr_mlm" + suffix].add(out["mlm_logits"], attr_labels[is_attr])
            if "itm" in recipe.heads:
                out = model(itm_ids, itm_mask, task="itm", blank_visual=blank, **itm_visual)
                acc["itm" + suffix].add(out["itm_logits"], itm_target)
        if "mrc" in recipe.heads:
            regions = mask_regions(visual["region_mask"], 0.15, generator=g)
            out = model(ids, mask, task="masked", masked_regions=regions, **visual)
            acc["mrc"].add(out["mrc_logits"], batch.region_labels[regions])
    metrics = {f"{name}_acc": a.value() for name, a in acc.items() if a.total}
    metrics["num_samples"] = n
    return metrics


def format_table(metrics: dict) -> str:
    lines = [f"{'metric':<12}{'with image':>12}{'text only':>12}"]
    for name in ("mlm", "attr_mlm", "itm", "mrc"):
        if f"{name}_acc" not in metrics:
            continue
        text_only = metrics.get(f"{name}_text_only_acc")
        lines.append(f"{name + '_acc':<12}{metrics[f'{name}_acc']:>12.2f}"
                     f"{'' if text_only is None else f'{text_only:.2f}':>12}")
    lines.append(f"samples={metrics['num_samples']}")
    return "\n".join(lines)
