import pytest

from vlp.config import (ConfigError, ModelConfig, PretrainConfig, from_dict, load_config,
                        parse_overrides, to_dict)


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=10", "train.batch_size=8", "data.train=a/{00000..00003}.tar",
                             "model.vision.width=64", "train.lr=3e-4", "data.resampled=true"])
    assert cfg.train.steps == 10 and cfg.train.batch_size == 8
    assert cfg.data.train == "a/{00000..00003}.tar"  # brace pattern kept as a string
    assert cfg.model.vision.width == 64
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.resampled is True
    assert PretrainConfig().train.steps != 10  # defaults untouched


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=3"])
    assert "train.stepz" in str(e.value) and "train.steps" in str(e.value)


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match="train.steps='ten'.*int"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"\['fp32', 'bf16', 'fp16'\]"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["model.vision.image_size=65"])
    with pytest.raises(ConfigError, match="heads"):
        load_config(None, ["model.text.width=100", "model.text.heads=3"])


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\nmodel:\n  embed_dim: 32\n")
    cfg = load_config(f, ["train.steps=6"])
    assert cfg.train.steps == 6 and cfg.model.embed_dim == 32
    f.write_text("train:\n  nope: 5\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_config(f)


def test_roundtrip_model_config():
    cfg = ModelConfig()
    cfg.text.vocab_size = 123
    assert to_dict(from_dict(ModelConfig, to_dict(cfg))) == to_dict(cfg)


def test_shipped_configs_load():
    from pathlib import Path
    from vlp.config import FinetuneConfig

    root = Path(__file__).parent.parent / "configs"
    for path in sorted(root.glob("pretrain/*.yaml")):
        load_config(path)
    finetune = sorted(root.glob("finetune/*.yaml"))
    assert {p.stem.split("_")[0] for p in finetune} == {"vqa", "caption", "vcr", "retrieval",
                                                           "refcoco"}
    for path in finetune:
        assert load_config(path, cls=FinetuneConfig).task == path.stem.split("_")[0]


def test_overrides_after_options_reach_the_config(tmp_path, capsys):
    """`vlp pretrain --out DIR key=value` and `vlp finetune vqa a=b --out DIR c=d`: overrides
    after an option are overrides (argparse alone rejects them as unrecognized)."""
    from vlp.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "a"), "--no-progress", "nosuch.key=1"]) == 2
    assert "unknown config key 'nosuch'" in capsys.readouterr().err
    assert main(["finetune", "vqa", "train.steps=2", "--out", str(tmp_path / "b"),
                 "train.nosuch=3"]) == 2
    assert "unknown config key 'train.nosuch'" in capsys.readouterr().err


def test_override_values_lists_and_text():
    """A whole `[...]` is a list; brace patterns and text YAML cannot read stay text."""
    got = parse_overrides(["m.depths=[2, 2, 6]", "d.train=shards/{000..009}.tar",
                           "d.val={a,b}.tar", "d.other=x: y: z", "d.ids=[1]x"])
    assert got == {"m": {"depths": [2, 2, 6]},
                   "d": {"train": "shards/{000..009}.tar", "val": "{a,b}.tar",
                         "other": "x: y: z", "ids": "[1]x"}}


def test_a_saved_config_reloads_unchanged():
    """What --resume does: config.yaml back through load_config(base=...) changes nothing,
    list-typed keys included (tuples in the config, lists in the file)."""
    import yaml

    from vlp.config import resume_changes

    cfg = load_config(None, ["model.vision.arch=swin", "model.vision.pool=mean",
                             "model.vision.stage_depths=[2,2]", "model.vision.stage_heads=[4,8]"])
    saved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    assert saved["model"]["vision"]["stage_depths"] == [2, 2]
    again = load_config(None, [], base=saved)
    assert again.model.vision.stage_depths == (2, 2)
    assert resume_changes(saved, to_dict(again), "config.yaml") == []
