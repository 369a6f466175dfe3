"""Text tokenizer: a BERT-style WordPiece tokenizer (HF `tokenizers`, never a network call).

Captions -> (input_ids, attention_mask) of exactly `context_length` tokens, `[CLS] ... [SEP]`
then `[PAD]`. Trained on the training captions (`train_tokenizer(iter_captions(urls))`), saved
as `tokenizer.json` in the model directory, loaded back with `load_tokenizer`. Any
`tokenizer.json` written by the `tokenizers` library (or `transformers`' fast tokenizers)
loads too, as do a BERT folder's vocab.txt and a CLIP folder's vocab.json + merges.txt
(OpenAI CLIP's byte-level BPE, built as transformers' CLIPTokenizer builds it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: id 0

# Names looked up, in order, for each special role in a loaded tokenizer.json.
_SPECIAL_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>"),
    "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
    "mask": ("[MASK]", "<mask>"),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` with the calls vlp needs.

    Special ids are found by name (`[PAD]`, `<pad>`, ...; see _SPECIAL_NAMES); `cls_id`,
    `sep_id` and `mask_id` are None when the vocabulary has no such token. A tokenizer without a
    pad token pads with id 0 (as OpenAI CLIP and OpenCLIP do): padded positions are marked by
    `attention_mask == 0`, so the id there never matters; `has_pad_token` tells which case.
    `pad_token` names the pad explicitly (a Hugging Face folder's tokenizer_config.json: CLIP
    pads with `<|endoftext|>`, or `!` = id 0); else a `padding` section in the tokenizer.json
    names it. An explicit pad is kept in the saved tokenizer.json.
    """

    def __init__(self, hf: tokenizers.Tokenizer, pad_token: str | None = None):
        self.hf = hf
        ids = {role: self._find(names) for role, names in _SPECIAL_NAMES.items()}
        if pad_token is not None:
            ids["pad"] = hf.token_to_id(pad_token)
            if ids["pad"] is None:
                raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        elif hf.padding is not None:  # read before _configure sets our own padding
            ids["pad"] = hf.padding["pad_id"]
        # kept in the saved file only where the lookup by name would not find it again
        self._explicit_pad = ids["pad"] is not None and ids["pad"] != self._find(
            _SPECIAL_NAMES["pad"])
        self.has_pad_token = ids["pad"] is not None
        self.pad_id: int = ids["pad"] if ids["pad"] is not None else 0
        self.cls_id: int | None = ids["cls"]
        self.sep_id: int | None = ids["sep"]
        self.mask_id: int | None = ids["mask"]
        self._length: int | None = None  # context_length the padding/truncation is set for
        # CLIP's BPE marks word ends with "</w>"; its tokenizer.json decodes byte-level only and
        # leaves the marks (transformers replaces them in Python), so decode() does the same
        self._word_end = getattr(hf.model, "end_of_word_suffix", None) or None

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            i = self.hf.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def _configure(self, context_length: int) -> None:
        if context_length == self._length:
            return
        n_special = self.hf.num_special_tokens_to_add(is_pair=False)
        if context_length <= n_special:
            raise ValueError(f"context_length={context_length} leaves no room for text: this "
                             f"tokenizer adds {n_special} special tokens per caption")
        # HF truncation runs before the post-processor and reserves room for its specials,
        # so a truncated caption still ends in [SEP].
        self.hf.enable_truncation(max_length=context_length)
        self.hf.enable_padding(length=context_length, pad_id=self.pad_id,
                               pad_token=self.hf.id_to_token(self.pad_id) or "[PAD]")
        self._length = context_length

    def __call__(self, texts: Sequence[str], context_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both LongTensor (B, context_length)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of captions, not one string")
        self._configure(context_length)
        if len(texts) == 0:
            empty = torch.zeros(0, context_length, dtype=torch.long)
            return empty, empty.clone()
        encodings = self.hf.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask (1 = real token) of right-padded ids (B, L) this tokenizer wrote -> LongTensor.

        With a dedicated pad token (`[PAD]`, `<pad>`) that is `ids != pad_id`. CLIP pads with a
        token that also stands for text or for the end of text (`<|endoftext|>`, or `!` / id 0
        in OpenCLIP), so there the mask runs up to and including the first end-of-text token:
        what the tokenizer's own mask marks and the token HF CLIP pools at (a row without one,
        cut short by the caller, is all real).
        """
        pad_token = self.hf.id_to_token(self.pad_id) if self.has_pad_token else None
        if pad_token in _SPECIAL_NAMES["pad"] or self.sep_id is None:
            return (input_ids != self.pad_id).long()
        is_eos = (input_ids == self.sep_id).long()
        return (is_eos.cumsum(dim=1) - is_eos == 0).long()  # no eos strictly before

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (special tokens, padding included, dropped by default)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._word_end and self._word_end in text:
            text = " ".join(text.replace(self._word_end, " ").split())
        return text

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json to `path` (a file, or a folder that exists); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Save without the call-time padding/truncation so the same vocabulary gives the same
        # file whatever context length was used last.
        clean = tokenizers.Tokenizer.from_str(self.hf.to_str())
        clean.no_padding()
        clean.no_truncation()
        if self._explicit_pad:  # e.g. CLIP's <|endoftext|>: not findable by name on loading
            clean.enable_padding(pad_id=self.pad_id, pad_token=self.hf.id_to_token(self.pad_id))
        clean.save(str(path))
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"cls_id={self.cls_id}, sep_id={self.sep_id}, mask_id={self.mask_id})")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000,
                    min_frequency: int = 1) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer (lowercase, BERT pre-tokenizer, `##` pieces,
    `[CLS] $A [SEP]`) on `texts`. Special ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
    hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    n_texts = 0

    def counted():
        nonlocal n_texts
        for text in texts:
            n_texts += 1
            yield text

    hf.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise ValueError("train_tokenizer got no texts (are the shards empty or all captions "
                         "missing?)")
    cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    hf.decoder = decoders.WordPiece(prefix="##")
    return Tokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` file, or a folder holding one (a vlp model directory or a
    Hugging Face tokenizer folder; there a BERT vocab.txt or a CLIP vocab.json + merges.txt
    also do, and tokenizer_config.json's pad_token is honoured)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if path.is_dir() and not file.is_file() and (path / "vocab.txt").is_file():
        return _from_bert_vocab(path)
    if path.is_dir() and not file.is_file() and (path / "merges.txt").is_file():
        return _from_clip_bpe(path)
    if not file.is_file():
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FileNotFoundError(
                f"folder {str(path)!r} has no tokenizer.json or vocab.txt, nor a CLIP "
                f"vocab.json + merges.txt (it holds {found}); expected a tokenizer.json file or "
                "a folder containing one (or a BERT vocab.txt, or CLIP's two files)")
        raise FileNotFoundError(
            f"no tokenizer at {str(path)!r}: expected a tokenizer.json file or a folder "
            "containing tokenizer.json (a model directory or a Hugging Face tokenizer folder)")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exn:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{str(file)!r} is not a valid tokenizer.json: {exn}") from exn
    pad = _hf_pad_token(path) if path.is_dir() else None
    if pad is None or hf.token_to_id(pad) is None:  # none, or a stale config: the default
        return Tokenizer(hf)
    return _with_hf_pad(hf, pad)


def _with_hf_pad(hf: tokenizers.Tokenizer, pad: str) -> Tokenizer:
    """transformers registers a folder's pad token as a special token: a pad of "!" (LAION's
    CLIP folders) then turns a "!" in text into id 0 rather than "!</w>". We follow it, so
    the folder gives the same ids as in transformers."""
    hf.add_special_tokens([pad])
    return Tokenizer(hf, pad)


def _hf_pad_token(folder: Path) -> str | None:
    """The pad token a Hugging Face tokenizer folder configures (tokenizer_config.json, then
    special_tokens_map.json); CLIPTokenizer's default `<|endoftext|>` when its class is named
    without one; None when neither file says."""
    tok_class = ""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        cfg = json.loads(file.read_text())
        tok_class = tok_class or str(cfg.get("tokenizer_class") or "")
        pad = cfg.get("pad_token")
        if isinstance(pad, dict):  # a serialised AddedToken
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return "<|endoftext|>" if tok_class.startswith("CLIPTokenizer") else None


# OpenAI CLIP's pre-tokenizer split (clip/simple_tokenizer.py; transformers' CLIPTokenizer)
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
               r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def clip_bpe(model: models.BPE) -> tokenizers.Tokenizer:
    """OpenAI CLIP's tokenizer around a byte-level BPE `model` whose words end in `</w>`
    (unk `<|endoftext|>`), built step for step as transformers' CLIPTokenizer builds it:
    NFC, whitespace runs -> one space, lowercase; CLIP's split regex then byte-level; ids
    `<|startoftext|> $A <|endoftext|>`. Ids then equal CLIPTokenizerFast's."""
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.Sequence([normalizers.NFC(),
                                          normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    missing = [t for t in (bos, eos) if hf.token_to_id(t) is None]
    if missing:
        raise ValueError(f"a CLIP BPE vocabulary needs {bos} and {eos}; missing {missing}")
    hf.add_special_tokens([bos, eos])  # matched whole in raw text, skipped when decoding
    hf.post_processor = processors.RobertaProcessing((eos, hf.token_to_id(eos)),
                                                     (bos, hf.token_to_id(bos)),
                                                     trim_offsets=False, add_prefix_space=False)
    return hf


def _from_clip_bpe(folder: Path) -> Tokenizer:
    """A CLIP folder with the slow tokenizer's vocab.json + merges.txt only."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"folder {str(folder)!r} has merges.txt but no vocab.json; a "
                                "CLIP BPE tokenizer needs both")
    try:
        model = models.BPE(str(vocab), str(merges), dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>")
    except Exception as exn:  # noqa: BLE001 - tokenizers raises a bare Exception here
        raise ValueError(f"{str(vocab)!r} + {str(merges)!r} are not a usable BPE vocabulary: "
                         f"{exn}") from None
    return _with_hf_pad(clip_bpe(model), _hf_pad_token(folder) or "<|endoftext|>")


def _from_bert_vocab(folder: Path) -> Tokenizer:
    """A BERT folder with only the slow tokenizer's vocab.txt: the same WordPiece vocabulary
    as a fast tokenizer (lowercasing per tokenizer_config.json's do_lower_case, default True)."""
    lowercase = True
    config = folder / "tokenizer_config.json"
    if config.is_file():
        lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
    try:
        wordpiece = tokenizers.BertWordPieceTokenizer(str(folder / "vocab.txt"),
                                                      lowercase=lowercase)
    except Exception as exn:  # noqa: BLE001 - tokenizers raises TypeError/Exception here
        raise ValueError(f"{str(folder / 'vocab.txt')!r} is not a usable BERT vocab.txt (it "
                         f"needs [UNK], [CLS], [SEP], [PAD], [MASK]): {exn}") from None
    return Tokenizer(wordpiece._tokenizer)


__all__ = ["Tokenizer", "train_tokenizer", "load_tokenizer", "clip_bpe",
           "SPECIAL_TOKENS"]
