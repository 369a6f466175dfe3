"""vlp.tokenizer: training, padding/truncation, save/load, foreign tokenizer.json files."""
import pickle

import pytest
import tokenizers
import torch
from tokenizers import models, normalizers, pre_tokenizers, processors

from vlp.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

SENTENCES = [
    "a red circle to the left of a blue square",
    "two green triangles above a yellow star",
    "a small purple cross below a large orange diamond",
    "There is a Red circle.",
] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(iter(SENTENCES), vocab_size=200)


def test_special_ids(tok):
    assert [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 2, 3, 4]
    assert tok.hf.token_to_id("[UNK]") == 1
    assert tok.has_pad_token
    assert 20 < tok.vocab_size <= 200


def test_padding_and_positions(tok):
    ids, mask = tok(["a red circle", "two green triangles above a yellow star"], 16)
    assert ids.shape == mask.shape == (2, 16)
    assert ids.dtype == mask.dtype == torch.long
    assert (ids[:, 0] == tok.cls_id).all()
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # real tokens first, then padding
        assert row[n - 1] == tok.sep_id
        assert (row[n:] == tok.pad_id).all()
    assert int(mask[0].sum()) == 5  # [CLS] a red circle [SEP]


def test_truncation_keeps_sep(tok):
    ids, mask = tok([SENTENCES[0], "a"], 6)
    assert ids.shape == (2, 6)
    assert mask[0].all()
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id
    assert tok.decode(ids[0]) == "a red circle to"
    with pytest.raises(ValueError, match="context_length=2"):
        tok(["a"], 2)


def test_round_trip_and_empty(tok):
    ids, _ = tok(["There is a RED circle to the left of a blue square."], 32)
    assert tok.decode(ids[0]) == "there is a red circle to the left of a blue square."
    ids, _ = tok(["a red circle, left"], 12)  # ',' never seen in training: [UNK]
    assert tok.decode(ids[0]) == "a red circle left"
    assert tok.decode(ids[0], skip_special_tokens=False).startswith("[CLS] a red circle [UNK]")
    ids, mask = tok([], 8)
    assert ids.shape == mask.shape == (0, 8)
    with pytest.raises(TypeError):
        tok("a string, not a list", 8)


def test_save_load_file_folder_pickle(tok, tmp_path):
    texts = ["a red circle", SENTENCES[2], "unknownword zzz"]
    want = tok(texts, 12)
    path = tok.save(tmp_path / "m" / "tokenizer.json")
    assert path.is_file()
    for source in (path, tmp_path / "m", str(tmp_path / "m")):
        got = load_tokenizer(source)(texts, 12)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = pickle.loads(pickle.dumps(tok))(texts, 12)
    assert torch.equal(got[0], want[0])
    # Saving twice (after calls at other lengths) writes the same bytes.
    tok(["x"], 40)
    assert tok.save(tmp_path / "again.json").read_bytes() == path.read_bytes()
    # save() into an existing folder writes folder/tokenizer.json
    assert tok.save(tmp_path).name == "tokenizer.json"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ValueError, match="not a usable BERT vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_load_foreign_bert_tokenizer_json(tmp_path):
    """A BERT-style tokenizer.json built with the tokenizers library alone (as HF folders hold)."""
    vocab = {t: i for i, t in enumerate(
        ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"])}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.post_processor = processors.BertProcessing(("[SEP]", 4), ("[CLS]", 3))
    hf.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))

    tok = load_tokenizer(tmp_path / "hf")
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 3, 4, 5)
    ids, mask = tok(["A red circles", "blue"], 7)
    assert ids.tolist() == [[3, 6, 7, 8, 9, 4, 0], [3, 2, 4, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]]


def test_tokenizer_without_pad_token_pads_with_zero(tmp_path):
    hf = tokenizers.Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "b": 2},
                                               unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert not tok.has_pad_token and tok.pad_id == 0
    assert tok.cls_id is None and tok.sep_id is None and tok.mask_id is None
    ids, mask = tok(["a b", "b b b b b"], 4)
    assert ids.tolist() == [[1, 2, 0, 0], [2, 2, 2, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_train_needs_texts():
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([])
    assert SPECIAL_TOKENS[0] == "[PAD]"


def test_load_bert_vocab_txt_folder(tmp_path):
    """A BERT folder with only the slow tokenizer's vocab.txt (older checkpoints)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = load_tokenizer(tmp_path)
    ids, mask = tok(["A red circles"], 8)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 3, 0, 0] and mask[0].tolist() == [1] * 6 + [0] * 2
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 4, 0)
