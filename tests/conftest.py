"""Shared fixtures for the fine-tuning tests: one small shapes world with benchmark files, and
tiny pretrained model directories of each family made by real (2-step) `vlp pretrain` runs."""
import os

import pytest

from vlp.cli import main
from vlp.data.synth import generate
from vlp.engine.dist import without_launcher_vars

# The suite's in-process runs are one-process worlds wherever pytest runs: inside an `srun` step
# or an MPI job, the inherited SLURM_*/PMI_*/OMPI_* variables would make each of them wait for
# ranks that never come (vlp.engine.dist reads them, as issue 18 asks).
_launcher_env = set(os.environ) - set(without_launcher_vars(os.environ))
for _name in _launcher_env:
    del os.environ[_name]

_TOWERS = ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
           "model.vision.heads=2", "model.text.width=32", "model.text.layers=1",
           "model.text.heads=2"]
_FUSION = ["model.fusion.width=32", "model.fusion.layers=1", "model.fusion.heads=2",
           "model.max_regions=8"]
FAMILIES = {
    "regions": ["recipe=single_stream", "model.visual_tokens=regions", *_TOWERS, *_FUSION],
    "patches": ["recipe=single_stream", "model.visual_tokens=patches", *_TOWERS, *_FUSION],
    "dual_tower": [*_TOWERS],
    "combined": ["recipe=combined", "model.text.mask=bidirectional", "model.text.pool=cls",
                 *_TOWERS, *_FUSION],
}


@pytest.fixture(scope="session")
def ft_world(tmp_path_factory):
    """A shapes world with 80 benchmark images (44 train / 4 restval / 16 val / 16 test)."""
    root = tmp_path_factory.mktemp("ft_shapes")
    generate(root, images=96, val_images=16, benchmark_images=80, shard_size=12,
             progress=False)
    return root


@pytest.fixture(scope="session")
def pretrained(ft_world, tmp_path_factory):
    """pretrained(family) -> a model directory from a 2-step pretraining run (made once)."""
    made = {}
    tok = tmp_path_factory.mktemp("ft_tok") / "tokenizer.json"

    def get(family: str):
        if family not in made:
            out = tmp_path_factory.mktemp(f"pre_{family}")
            args = ["pretrain", "--out", str(out), "--no-progress",
                    f"data.train={ft_world}/train", "data.val=", "eval.at_end=false",
                    "train.steps=2", "train.batch_size=16", "train.save_every=0",
                    "tokenizer.vocab_size=200", *FAMILIES[family]]
            if tok.is_file():  # one vocabulary for every family (WordPiece training varies)
                args.append(f"tokenizer.path={tok}")
            assert main(args) == 0
            if not tok.is_file():
                import shutil

                shutil.copy(out / "tokenizer.json", tok)
            made[family] = out / "model"
        return made[family]

    return get
