"""`vlp pretrain model.init_from=DIR` (issue 12 part 1): a run starts from a model directory's
weights exactly, with its shape and tokenizer; conflicting settings and unfit weights stop with
one line naming the key or file."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlp
from vlp import modeldir
from vlp.cli import main
from vlp.config import ConfigError, load_config
from vlp.recipes import build_recipe
from vlp.recipes.init_from import adopt_start
from vlp.tokenizer import load_tokenizer

pytest.importorskip("transformers")
from test_published import published_clip  # noqa: E402,F401  (the fixture)

RUN = ["--no-progress", "train.batch_size=8", "train.save_every=0", "train.log_every=1",
       "data.val=", "eval.at_end=false", "data.num_workers=0"]


def _recipe_model(overrides: list[str]):
    cfg, _ = adopt_start(load_config(None, overrides))
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    recipe = build_recipe(cfg, tokenizer, [], world_size=1)
    return cfg, recipe, recipe.build_model().eval()


def _assert_same_state(model: torch.nn.Module, state: dict) -> None:
    ours = model.state_dict()
    assert set(state) <= set(ours)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def test_dual_tower_starts_from_a_converted_clip(published_clip, ft_world, tmp_path):  # noqa: F811
    cfg, recipe, model = _recipe_model([f"model.init_from={published_clip}",
                                        f"data.train={ft_world}/train"])
    # shape and tokenizer from the directory, not the defaults (vision 64 / text 48 / patch 16)
    v, t = cfg.model.vision, cfg.model.text
    assert (v.width, t.width, v.patch_size, t.vocab_size) == (64, 48, 16, 642)
    assert cfg.tokenizer.path == str(published_clip / "tokenizer.json")
    _assert_same_state(model, load_file(str(published_clip / "model.safetensors")))
    saved = json.loads((published_clip / "config.json").read_text())["transform"]
    assert list(recipe.eval_transform.mean) == saved["mean"]

    # step-0 features equal the converted model's
    ref = vlp.load(published_clip, device="cpu")
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    ids, mask = ref.tokenizer(["a red circle", "two blue squares", "a triangle"], 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), ref.model.encode_image(pixels))
        assert torch.equal(model.encode_text(ids, mask), ref.model.encode_text(ids, mask))

    # through the loop and DeepSpeed: two steps at a negligible lr stay at the checkpoint
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), f"model.init_from={published_clip}",
                 f"data.train={ft_world}/train", "train.steps=2", "train.lr=1e-9",
                 "train.min_lr=0", "train.warmup_steps=0", "train.precision=fp32",
                 *RUN]) == 0
    after = vlp.load(out / "model", device="cpu")
    with torch.no_grad():
        diff = (after.model.encode_image(pixels) - ref.model.encode_image(pixels)).abs().max()
    assert diff < 1e-5
    assert (out / "model" / "tokenizer.json").read_text() == \
        (published_clip / "tokenizer.json").read_text()


def test_combined_takes_a_dual_tower_or_a_combined_directory(pretrained, ft_world):
    dual, combined = pretrained("dual_tower"), pretrained("combined")
    data = f"data.train={ft_world}/train"
    # a dual tower into the combined recipe: its towers exactly, fusion layers fresh
    _, _, model = _recipe_model(["recipe=combined", f"model.init_from={combined}", data])
    _assert_same_state(model, load_file(str(combined / modeldir.COMBINED_WEIGHTS)))
    _, _, towers = _recipe_model([f"model.init_from={combined}", data])  # recipe=dual_tower
    _assert_same_state(towers, load_file(str(combined / modeldir.WEIGHTS)))
    with pytest.raises(ConfigError, match="has a causal text tower"):
        # dual_tower's text tower is causal: the combined recipe's MLM cannot use it
        _recipe_model(["recipe=combined", f"model.init_from={dual}", data])


@pytest.mark.parametrize("overrides, message", [
    (["model.vision.width=128"], "model.vision.width=128 conflicts with model.init_from"),
    (["model.text.context_length=16"], "model.text.context_length=16 conflicts"),
    (["tokenizer.path={other}"], "tokenizer.path=.* conflicts with model.init_from"),
    (["recipe=single_stream"], "architecture 'dual_tower' is not usable here"),
    (["model.vision.init_from={clip}"], "both set weights of the same tower"),
])
def test_conflicting_settings_are_refused_by_name(published_clip, ft_world, tmp_path,  # noqa: F811
                                                   capsys, overrides, message):
    other = tmp_path / "other.json"
    shutil.copy(published_clip / "tokenizer.json", other)
    overrides = [o.format(other=other, clip=published_clip) for o in overrides]
    rc = main(["pretrain", "--out", str(tmp_path / "run"), f"model.init_from={published_clip}",
               f"data.train={ft_world}/train", *overrides, *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "model").exists()


def test_unfit_weights_name_the_file_and_key(published_clip, ft_world, tmp_path,  # noqa: F811
                                              capsys):
    broken = tmp_path / "broken"
    shutil.copytree(published_clip, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["visual.proj.weight"]
    state["visual.extra"] = torch.zeros(1)
    save_file(state, str(broken / "model.safetensors"))
    rc = main(["pretrain", "--out", str(tmp_path / "run"), f"model.init_from={broken}",
               f"data.train={ft_world}/train", "train.steps=1", *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(broken / "model.safetensors") in err and "visual.proj.weight" in err, err
    (broken / "model.safetensors").write_bytes(b"\x80\x04not safetensors")  # a pickle header
    rc = main(["pretrain", "--out", str(tmp_path / "run2"), f"model.init_from={broken}",
               f"data.train={ft_world}/train", "train.steps=1", *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.safetensors" in err and "not safetensors" in err, err


def test_a_new_image_size_resamples_the_positions(published_clip, ft_world):  # noqa: F811
    """model.vision.image_size=96 from a 64-px directory: the learned grid resampled (4x4 ->
    6x6, class position kept), every other weight as saved."""
    from vlp.models.embed import resample_pos_embed

    cfg, recipe, model = _recipe_model([f"model.init_from={published_clip}",
                                        f"data.train={ft_world}/train",
                                        "model.vision.image_size=96"])
    assert cfg.model.vision.image_size == 96 and recipe.eval_transform.image_size == 96
    saved = load_file(str(published_clip / "model.safetensors"))
    ours = model.state_dict()
    key = "visual.embed.pos_embed"
    assert ours[key].shape[1] == 1 + 6 * 6
    assert torch.equal(ours[key], resample_pos_embed(saved[key], 6, 1))
    _assert_same_state(model, {k: v for k, v in saved.items() if k != key})
