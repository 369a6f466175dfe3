"""Issue 18: multi-node start-up. Nodes that share one cache folder each generate the shapes
world (every node's local rank 0 does) without writing into one another's files; the
tokenizer is trained on a bounded sample."""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

from launch import ROOT, env

from vlp.config import TokenizerConfig
from vlp.data.pipeline import iter_captions
from vlp.engine.setup import build_tokenizer, ensure_shapes_world

SMALL = "images=48, val_images=8, benchmark_images=0, shard_size=12"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_nodes_generate_into_one_shared_cache(tmp_path):
    shared = tmp_path / "cache" / "shapes"
    code = ("from pathlib import Path; from vlp.engine.setup import ensure_shapes_world; "
            f"ensure_shapes_world(Path({str(shared)!r}), seed=0, progress=False, {SMALL})")
    nodes = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    for node in nodes:
        out = node.communicate(timeout=300)[0].decode(errors="replace")
        assert node.returncode == 0, out[-2000:]
    assert sorted(p.name for p in shared.parent.iterdir()) == ["shapes"]  # no partial left
    alone = ensure_shapes_world(tmp_path / "alone", seed=0, progress=False,
                                **eval(f"dict({SMALL})"))
    assert _digest(shared) == _digest(alone)  # complete, and the same bytes


def test_tokenizer_trains_on_a_bounded_sample(tmp_path):
    world = ensure_shapes_world(tmp_path / "w", seed=0, progress=False, **eval(f"dict({SMALL})"))
    urls = sorted(str(p) for p in (world / "train").glob("*.tar"))
    first = list(iter_captions(urls))[:30]
    tok = build_tokenizer(TokenizerConfig(vocab_size=500, max_captions=30), urls,
                          tmp_path / "tok.json")
    words = {w for caption in first for w in re.findall(r"[a-z]+", caption.lower())}
    everything = {w for caption in iter_captions(urls)
                  for w in re.findall(r"[a-z]+", caption.lower())}
    vocab = set(tok.hf.get_vocab())
    assert words <= vocab  # every word of the sample is a whole token (the vocabulary is big)
    # Every token is a piece of a sample word. (A later-only word may still be a token when it is
    # a piece of a sample word, as "star" of "stars": WordPiece keeps its intermediate merges, in
    # an order that varies between processes.)
    sample_text = " ".join(first).lower()
    assert all(t.removeprefix("##") in sample_text for t in vocab if not t.startswith("["))
    unseen = {w for w in everything - words if not any(w in seen for seen in words)}
    assert unseen and not unseen & vocab  # words only later captions have were never read
