"""COCO captioning on Karpathy's split: dataset_coco.json in, COCO caption results JSON out,
scored with the COCO caption metrics (vlp/eval/caption_metric.py: BLEU, METEOR, ROUGE-L, CIDEr).

Training: every caption of the `train` and `restval` images is a sample (Karpathy's 113k-image
training set on real COCO), learnt as a language model over the image (vlp/models/heads/
caption.py). Evaluation: one caption per image of eval.split (`val` or `test`), by beam search
(caption.beam_size; 1 = greedy), written as [{"image_id": cocoid, "caption"}] to
OUT/caption_<split>_results.json. References: caption.annotations (a COCO captions file, e.g.
captions_val2014.json) when set, else the split's own sentences in dataset_coco.json. The
baseline beside the scores (`caption_constant_*`): the most frequent training caption given to
every image, scored the same way.

Self-critical sequence training (`caption.scst=true`, Rennie et al. 2017), usually from a
cross-entropy model (`caption.init_caption=OUT/model` of a caption run): a training sample is
an image; per step each image gets its greedy caption and `caption.scst_samples` sampled ones
(no gradients, the key/value cache), each scored by CIDEr-D against the image's training
references (vlp/eval/cider.py, document frequencies counted once over every training image's
references: no Java in the loop); the loss is -(CIDEr-D(sample) - CIDEr-D(greedy)) times the
sample's log-probability, recomputed with gradients in one teacher-forced pass through the
engine, divided by the samples' tokens. `caption.scst_baseline=mean` takes the mean of the
image's other samples' CIDEr-D instead of the greedy caption's (Luo 2020). Each process scores
its own images' samples. ZeRO-3 is refused: decoding runs the model outside the engine's
forward, where ZeRO-3's weights are partitioned.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from vlp import modeldir
from vlp.config import ConfigError, FinetuneConfig
from vlp.data.batch import Batch
from vlp.data.jsonfiles import read_json
from vlp.data.karpathy import read_karpathy
from vlp.data.visual import collate_visual
from vlp.engine import deepspeed_config
from vlp.eval.caption_metric import evaluate_captions, format_table, karpathy_references
from vlp.eval.cider import CiderD, simple_tokenize
from vlp.models.heads.caption import CachedStep, CaptionHead, beam_search, caption_loss, \
    greedy_search, lm_sequences, sample_search, scst_loss, sequence_logprobs
from vlp.models.device import resolve_device
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.common import FinetuneTask, RecordDataset, collate_items, load_finetuned_parts, \
    reader_for

TRAIN_SPLITS = ("train", "restval")
EVAL_SPLITS = ("val", "test")


def most_frequent_caption(captions: list[str]) -> str:
    """The most frequent caption (whitespace-normalised; ties: alphabetical first)."""
    counts = Counter(" ".join(c.split()) for c in captions)
    if not counts:
        raise ValueError("no training captions")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def special_ids(tokenizer) -> tuple[int, int, list[int]]:
    """([CLS] id, [SEP] id, ids never generated): every special token but [SEP] (decoding drops
    them, so [PAD]/[UNK]/[CLS]/[MASK] would be invisible words)."""
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise ValueError(f"captioning needs a tokenizer with a start and an end token ([CLS] / "
                         f"[SEP] or <s> / </s>); this one has cls_id={tokenizer.cls_id}, "
                         f"sep_id={tokenizer.sep_id}")
    special = {i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special}
    special |= {i for i in (tokenizer.pad_id, tokenizer.mask_id) if i is not None}
    return tokenizer.cls_id, tokenizer.sep_id, sorted(special - {tokenizer.sep_id})


def check_max_length(encoder, max_length: int, key: str = "caption.max_length") -> None:
    # decoding feeds [CLS] + up to max_length - 1 tokens; training the same length
    if max_length > encoder.text_positions:
        raise ConfigError(f"{key}={max_length} exceeds the backbone's {encoder.text_positions} "
                          "text positions; lower it")


def lm_inputs(tokenizer, captions: list[str], max_length: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, max_length): the tokenizer's
    `[CLS] w1 .. wn [SEP] <pad>` without its last position as input, without its first as
    targets, pads -100. A caption cut at max_length still ends in [SEP] (the tokenizer
    truncates before adding it)."""
    ids, mask = tokenizer(captions, max_length + 1)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return ids[:, :-1], mask[:, :-1], labels


def caption_step(model: FinetunedModel, visual: dict, *, cached: bool = False):
    """(step function for the searches, number of images, device) for a collated batch of
    images; the visual tokens are computed here once per image and reused by every step and
    beam (rows pick their image's). `cached`: a CachedStep (give the search its `reorder`),
    which encodes one word a step; else each step encodes the whole word prefix."""
    backbone, head = model.backbone, model.head
    encoded = backbone.encode_visual(visual)
    first = next(iter(encoded.values()))
    if cached:
        return CachedStep(backbone, encoded), first.shape[0], first.device

    def step(tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        rows = {k: v[images] for k, v in encoded.items()}
        return head.next_token_logits(backbone, tokens, rows)

    return step, first.shape[0], first.device


@torch.no_grad()
def generate(model: FinetunedModel, visual: dict, tokenizer, *, beam_size: int,
             max_length: int, length_penalty: float = 1.0, cached: bool = True) -> list[str]:
    """Captions of a collated batch of images (`visual`, on the model's device and dtype).
    `cached=False` re-encodes the word prefix at every step (the same captions, slower)."""
    step, num_images, device = caption_step(model, visual, cached=cached)
    bos, eos, banned = special_ids(tokenizer)
    common = dict(bos_id=bos, eos_id=eos, max_length=max_length, banned_ids=banned,
                  device=device, reorder=step.reorder if cached else None)
    if beam_size == 1:
        seqs = greedy_search(step, num_images, **common)
    else:
        seqs = beam_search(step, num_images, beam_size=beam_size,
                           length_penalty=length_penalty, **common)
    return [tokenizer.decode(s).strip() for s in seqs]


@torch.no_grad()
def scst_decode(model: FinetunedModel, visual: dict, tokenizer, *, num_samples: int,
                max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(each image's greedy tokens, `num_samples` sampled token rows per image, image-major)
    for a collated batch of images, both decoded with the key/value cache from visual tokens
    encoded once."""
    backbone = model.backbone
    encoded = backbone.encode_visual(visual)
    first = next(iter(encoded.values()))
    n, device = first.shape[0], first.device
    bos, eos, banned = special_ids(tokenizer)
    common = dict(bos_id=bos, eos_id=eos, max_length=max_length, banned_ids=banned,
                  device=device)
    step = CachedStep(backbone, encoded)
    greedy = greedy_search(step, n, reorder=step.reorder, **common)
    step = CachedStep(backbone, encoded)
    samples, _ = sample_search(step, n, num_samples=num_samples, reorder=step.reorder, **common)
    return greedy, samples


def leave_one_out_mean(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N * K,) image-major rewards -> each one's baseline: the mean of its image's other K - 1
    samples' rewards."""
    per_image = rewards.view(-1, k)
    return ((per_image.sum(1, keepdim=True) - per_image) / (k - 1)).view(-1)


def _sampling_precision(engine):
    """The autocast the engine's forward runs under (DeepSpeed's torch_autocast for
    train.precision=bf16), for decoding outside it: samples drawn at the precision they are
    scored at."""
    autocast = (getattr(engine, "config", None) or {}).get("torch_autocast") or {}
    if autocast.get("enabled") is True:
        return torch.autocast(torch.device(engine.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CaptionTask(FinetuneTask):
    name = "caption"
    metric_names = ("train_token_acc",)
    eval_metrics = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

    def __init__(self, cfg: FinetuneConfig, encoder: JointEncoder, tokenizer, transform,
                 root: Path, world_size: int = 1):
        super().__init__(cfg, encoder, tokenizer, transform, root, world_size)
        c = cfg.caption
        self.karpathy = Path(c.karpathy) if c.karpathy else root / "coco" / "dataset_coco.json"
        # images: <data.images or ROOT>/<filepath>/<filename>, as retrieval reads the same file
        # (COCO: the folder holding train2014/ and val2014/; the shapes world: ROOT/images/...)
        self.images_dir = Path(cfg.data.images) if cfg.data.images else root
        self.reader = reader_for(encoder, transform, cfg.data.regions or (root / "regions"))
        check_max_length(encoder, c.max_length)
        special_ids(tokenizer)  # fail early on a tokenizer without start/end tokens
        # every image, in file order (image_id: cocoid, else imgid)
        self.images = [{**im, "captions": [text for _, text in im["captions"]]}
                       for im in read_karpathy(self.karpathy)]
        train = [im for im in self.images if im["split"] in TRAIN_SPLITS]
        if not train:
            raise ValueError(f"{self.karpathy}: no images in the training splits "
                             f"{list(TRAIN_SPLITS)}")
        self.constant = most_frequent_caption([c for im in train for c in im["captions"]])
        self.cider: CiderD | None = None
        if c.scst and cfg.train.deepspeed and \
                deepspeed_config.zero_stage(deepspeed_config.load(cfg.train.deepspeed)) == 3:
            raise ConfigError(f"caption.scst=true with ZeRO-3 ({cfg.train.deepspeed}): SCST "
                              "decodes with the model outside the engine's forward, where "
                              "ZeRO-3's weights are partitioned; use ZeRO stage 0-2")
        if c.scst:
            # the reward's references and document frequencies: every training image's
            # captions, tokenized once (one document per image)
            self.train_refs = {im["image_id"]: [simple_tokenize(t) for t in im["captions"]]
                               for im in train}
            self.cider = CiderD(self.train_refs.values())
            # logged per step (x100, as the CIDEr the evaluation reports)
            self.metric_names = ("train_scst_reward", "train_sample_cider",
                                 "train_greedy_cider")

    # ------------------------------------------------------------------ data
    def image_path(self, record: dict) -> Path:
        return self.images_dir / record["filepath"] / record["filename"]

    def records(self, split: str) -> list[dict]:
        """train: one record per caption of train + restval (SCST: one per image); val/test:
        one per image."""
        if split == "train" and self.cfg.caption.scst:  # SCST: one sample per image
            return [im for im in self.images if im["split"] in TRAIN_SPLITS]
        if split == "train":
            return [{**im, "caption": c} for im in self.images if im["split"] in TRAIN_SPLITS
                    for c in im["captions"]]
        if split not in EVAL_SPLITS:
            raise ValueError(f"caption split {split!r}: expected train, val or test")
        records = [im for im in self.images if im["split"] == split]
        if not records:
            raise ValueError(f"{self.karpathy}: no images in split {split!r}")
        return records

    def dataset(self, split: str) -> RecordDataset:
        records = self.records(split)
        self.reader.check_files(sorted({self.image_path(r) for r in records}),
                                f"caption {split} images ({self.images_dir}/<filepath>/"
                                f"<filename>)")
        if split == "train" and not self.cfg.caption.scst:
            def item(record, visual):
                return {"visual": visual, "image_id": record["image_id"],
                        "caption": record["caption"]}
        else:
            def item(record, visual):
                return {"visual": visual, "image_id": record["image_id"]}
        return RecordDataset(records, self.image_path, self.reader, item)

    def collate(self, items: list) -> Batch:
        batch = collate_items(items, "image_id")
        if len(batch) and "caption" in batch.fields:
            batch.input_ids, batch.attention_mask, batch.fields["labels"] = lm_inputs(
                self.tokenizer, batch.fields.pop("caption"), self.cfg.caption.max_length)
        return batch

    # ------------------------------------------------------------------ model
    def make_head(self, encoder: JointEncoder) -> CaptionHead:
        return CaptionHead()

    def describe(self) -> str:
        c = self.cfg.caption
        text = super().describe()
        if c.init_caption:
            text += f", weights of {c.init_caption}"
        if c.scst:
            text += (f", self-critical (CIDEr-D, {c.scst_samples} samples per image, "
                     f"{c.scst_baseline} baseline)")
        return text

    def build_model(self, pretrained: bool = True) -> FinetunedModel:
        """caption.init_caption: the starting weights are that caption model's (checked to
        have this run's backbone and vocabulary)."""
        model = super().build_model(pretrained)
        path = self.cfg.caption.init_caption
        if not (pretrained and path):
            return model
        folder = modeldir.read(path, ("finetuned",))
        task = folder.config.get("task")
        if task != "caption":
            raise ConfigError(f"caption.init_caption={path}: a fine-tuned {task!r} model; "
                              "name the OUT/model of a caption run")
        if json.dumps(folder.config.get("backbone"), sort_keys=True) != \
                json.dumps(self.spec, sort_keys=True):
            raise ConfigError(f"caption.init_caption={path}: its backbone differs from "
                              f"init_from={self.cfg.init_from}'s; set init_from to the "
                              "pretrained directory that caption model was fine-tuned from")
        if folder.tokenizer().hf.get_vocab() != self.tokenizer.hf.get_vocab():
            raise ConfigError(f"caption.init_caption={path}: its vocabulary differs from "
                              f"init_from={self.cfg.init_from}'s")
        modeldir.load_weights(model, folder.weights(), str(folder.path / modeldir.WEIGHTS))
        return model

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        if self.cfg.caption.scst:
            return self.scst_loss(engine, batch)
        dev, dtype = engine.device, engine.input_dtype
        labels = batch.fields["labels"].to(dev)
        out = engine(input_ids=batch.input_ids.to(dev),
                     attention_mask=batch.attention_mask.to(dev),
                     visual=batch.visual(dev, dtype), labels=labels)
        targets = labels[labels != -100]
        loss = caption_loss(out["logits"], targets, self.cfg.caption.label_smoothing)
        with torch.no_grad():
            acc = (out["logits"].argmax(-1) == targets).float().mean().item()
        return loss, [100.0 * acc]

    def rewards(self, image_ids: list, greedy: list[list[int]], samples: list[list[int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CIDEr-D of each sample, of its image's greedy caption), (N * K,) each, 0..10
        scale, against the image's training references."""
        k = len(samples) // len(greedy)
        sample_cider, greedy_cider = [], []
        for n, image_id in enumerate(image_ids):
            captions = [greedy[n], *samples[n * k:(n + 1) * k]]
            scores = self.cider.scores([simple_tokenize(self.tokenizer.decode(c))
                                        for c in captions], self.train_refs[image_id])
            greedy_cider += [scores[0]] * k
            sample_cider += scores[1:]
        return (torch.tensor(sample_cider, dtype=torch.float32),
                torch.tensor(greedy_cider, dtype=torch.float32))

    def scst_loss(self, engine, batch: Batch) -> tuple[torch.Tensor, list[float]]:
        """Self-critical loss of one micro-batch of images (see the module docstring)."""
        c = self.cfg.caption
        dev, dtype = engine.device, engine.input_dtype
        visual = batch.visual(dev, dtype)
        model = engine.module
        model.eval()  # decoding as evaluation does (the model has no dropout: same weights)
        try:
            with _sampling_precision(engine):
                greedy, samples = scst_decode(model, visual, self.tokenizer,
                                              num_samples=c.scst_samples,
                                              max_length=c.max_length)
        finally:
            model.train()
        image_ids = batch.fields["image_id"]
        sample_cider, greedy_cider = self.rewards(image_ids, greedy, samples)
        baseline = greedy_cider if c.scst_baseline == "greedy" else \
            leave_one_out_mean(sample_cider, c.scst_samples)
        bos, eos, banned = special_ids(self.tokenizer)
        ids, mask, labels = lm_sequences(samples, bos_id=bos, eos_id=eos,
                                         max_length=c.max_length, pad_id=self.tokenizer.pad_id
                                         if self.tokenizer.pad_id is not None else 0)
        labels = labels.to(dev)
        repeated = {k: v.repeat_interleave(c.scst_samples, 0) for k, v in visual.items()}
        out = engine(input_ids=ids.to(dev), attention_mask=mask.to(dev), visual=repeated,
                     labels=labels)
        logprobs = sequence_logprobs(out["logits"], labels, eos_id=eos, banned_ids=banned)
        loss = scst_loss(logprobs, sample_cider.to(dev), baseline.to(dev),
                         (labels != -100).sum())
        reward = (sample_cider - baseline).mean().item()
        return loss, [100.0 * reward, 100.0 * sample_cider.mean().item(),
                      100.0 * greedy_cider.mean().item()]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, model: FinetunedModel, split: str, progress: bool) -> list[dict]:
        loader = self.eval_loader(split)
        device = next(model.parameters()).device
        c = self.cfg.caption
        results = []
        for batch in tqdm(loader, desc=f"caption {split}", disable=not progress):
            if not len(batch):
                continue
            captions = generate(model, batch.visual(device, torch.float32),
                                self.tokenizer, beam_size=c.beam_size, max_length=c.max_length,
                                length_penalty=c.length_penalty)
            results += [{"image_id": i, "caption": cap}
                        for i, cap in zip(batch.fields["image_id"], captions)]
        return results

    def references(self, split: str):
        """COCO-format references: caption.annotations, else the split's Karpathy sentences."""
        if self.cfg.caption.annotations:
            return read_json(self.cfg.caption.annotations, "COCO captions (caption.annotations)")
        return karpathy_references(self.karpathy, split)

    def score(self, model: FinetunedModel, split: str, out_dir: Path, progress: bool) -> dict:
        records = self.records(split)
        image_ids = [r["image_id"] for r in records]
        generated = {r["image_id"]: r["caption"] for r in self.predict(model, split, progress)}
        # an image that could not be read (or an empty decoding) still needs a caption: the
        # baseline's, counted
        fallback = [i for i in image_ids if not generated.get(i)]
        results = [{"image_id": i, "caption": generated.get(i) or self.constant}
                   for i in image_ids]
        path = Path(out_dir) / f"caption_{split}_results.json"
        path.write_text(json.dumps(results))
        references = self.references(split)
        metrics = evaluate_captions(results, references, image_ids)
        print(format_table(metrics))
        constant = [{"image_id": i, "caption": self.constant} for i in image_ids]
        baseline = evaluate_captions(constant, references, image_ids)
        for key in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
            metrics[f"caption_constant_{key}"] = baseline[key]
        metrics["caption_fallback_captions"] = len(fallback)
        metrics["caption_distinct_captions"] = len({r["caption"] for r in results})
        metrics["caption_mean_words"] = sum(len(r["caption"].split()) for r in results) / \
            len(results)
        metrics["caption_beam_size"] = self.cfg.caption.beam_size
        print(f"constant caption {self.constant!r}: CIDEr "
              f"{metrics['caption_constant_CIDEr']:.2f}, BLEU_4 "
              f"{metrics['caption_constant_BLEU_4']:.2f}; distinct captions "
              f"{metrics['caption_distinct_captions']}/{len(results)}")
        print(f"results: {path}")
        return metrics

    # ------------------------------------------------------------------ the model directory
    def head_config(self) -> dict:
        c = self.cfg.caption
        return {"max_length": c.max_length, "beam_size": c.beam_size,
                "length_penalty": c.length_penalty}


class CaptionModel:
    """A fine-tuned captioning model: `caption(image)`, `captions([image, ...])`."""

    def __init__(self, folder, device: str | torch.device | None = None):
        """`folder`: a fine-tuned caption model directory (a path or a modeldir.ModelDir)."""
        folder, self.model, self.tokenizer, transform = load_finetuned_parts(
            folder, lambda config, encoder: CaptionHead())
        self.device = resolve_device(device)
        self.model.to(self.device)
        head = folder.config["head"]
        self.max_length, self.beam_size = head["max_length"], head["beam_size"]
        self.length_penalty = head["length_penalty"]
        self.reader = reader_for(self.model.backbone, transform, None)

    def caption(self, image, *, regions: str | Path | None = None, beam_size: int | None = None,
                max_length: int | None = None) -> str:
        """The caption of `image` (a PIL image or a file). Region backbones need the image's
        region file (regions=PATH.npz). Defaults: the fine-tuning run's beam size and length."""
        return self.captions([image], regions=None if regions is None else [regions],
                             beam_size=beam_size, max_length=max_length)[0]

    @torch.no_grad()
    def captions(self, images: list, *, regions: list | None = None,
                 beam_size: int | None = None, max_length: int | None = None,
                 batch_size: int = 32) -> list[str]:
        """Captions of many images, decoded `batch_size` images at a time."""
        from vlp.data.transforms import to_pil_rgb

        if regions is not None and len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} region files")
        beam_size = beam_size or self.beam_size
        max_length = max_length or self.max_length
        if beam_size < 1 or max_length < 1:
            raise ValueError(f"beam_size={beam_size} and max_length={max_length} must be >= 1")
        check_max_length(self.model.backbone, max_length, "max_length")
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            items = []
            for n in range(start, min(start + batch_size, len(images))):
                image = images[n]
                image = Path(image) if isinstance(image, (str, Path)) else to_pil_rgb(image)
                items.append(self.reader.read(image, regions_file=None if regions is None
                                              else regions[n]))
            visual = Batch([""] * len(items), **collate_visual(items)).visual(self.device,
                                                                              torch.float32)
            out += generate(self.model, visual, self.tokenizer, beam_size=beam_size,
                            max_length=max_length, length_penalty=self.length_penalty)
        return out
