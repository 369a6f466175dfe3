"""`vlp pretrain model.init_from=DIR`: a run that starts from a model directory's weights
(continuing a converted CLIP, or a vlp run, on other data).

The model's shape and tokenizer come from DIR: a `model.*` key the run sets to a value other
than DIR's is refused by name, as is a `tokenizer.path` naming another vocabulary (but
model.vision.image_size may differ: DIR's learned position grid is resampled to it). The weights are loaded exactly (every key, every shape) before the first
step. What each recipe takes:

    recipe=dual_tower     a dual_tower directory, or the towers of a combined one
    recipe=combined       a combined directory (everything), or a dual_tower one (the towers;
                          the fusion layers and heads start fresh from model.fusion)
    recipe=single_stream  a single_stream directory
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from vlp import modeldir
from vlp.config import ConfigError, ModelConfig, PretrainConfig, flatten, to_dict
from vlp.data.transforms import ImageTransform
from vlp.models.resize import at_image_size
from vlp.models.towers import VISION_SOURCES

ACCEPTS = {"dual_tower": ("dual_tower", "combined"),
           "combined": ("combined", "dual_tower"),
           "single_stream": ("single_stream",)}
# model.* keys a run may set freely: they do not change the weights' shapes or meaning (a new
# image size resamples the learned position grid: vlp/models/resize.py)
FREE = ("init_from", "init_logit_scale", "max_logit_scale", "vision.image_size",
        "vision.drop_path_rate")


def _read(cfg: PretrainConfig) -> modeldir.ModelDir | None:
    if not cfg.model.init_from:
        return None
    try:
        return modeldir.read(cfg.model.init_from, ACCEPTS[cfg.recipe])
    except modeldir.ModelDirError as e:
        raise ConfigError(f"model.init_from: {e} (recipe={cfg.recipe})") from None


def read_start(cfg: PretrainConfig) -> modeldir.ModelDir | None:
    """The directory model.init_from names, checked against the recipe and read at the run's
    image size (None without one). `cfg`: a resolved config (adopt_start's)."""
    folder = _read(cfg)
    return folder and at_image_size(folder, cfg.model.vision.image_size)


def adopt_start(cfg: PretrainConfig, given: set[str] | None = None
                ) -> tuple[PretrainConfig, list[str]]:
    """With model.init_from, the run's model config and tokenizer become the directory's.
    Returns (the resolved copy of `cfg`, what was taken, for the log); raises ConfigError
    naming the first `model.*` or `tokenizer.path` setting that conflicts with DIR. `given`:
    the dotted keys the user set (None: any value other than the default counts as set)."""
    start = _read(cfg)
    if start is None:
        return cfg, []
    source = cfg.model.init_from
    for key, other in (("model.init_text_from", cfg.model.init_text_from),
                       ("model.vision.init_from", cfg.model.vision.init_from),
                       ("model.text.init_from", cfg.model.text.init_from)):
        if other:
            raise ConfigError(f"model.init_from={source} and {key}={other} both set weights "
                              "of the same tower; drop one")
    saved = start.model_config()
    # fresh fusion layers (a dual tower into the combined recipe) keep the run's settings
    fresh_fusion = cfg.recipe == "combined" and start.architecture == "dual_tower"
    ignored = ("fusion.",) if cfg.recipe == "dual_tower" or fresh_fusion else ()
    run, default, dir_ = (flatten(to_dict(m)) for m in (cfg.model, ModelConfig(), saved))
    for key, value in run.items():
        if key in FREE or key.startswith(ignored) or key not in dir_:
            continue
        explicit = f"model.{key}" in given if given is not None else value != default.get(key)
        if explicit and value != dir_[key]:
            raise ConfigError(
                f"model.{key}={value!r} conflicts with model.init_from={source}, whose "
                f"model.{key} is {dir_[key]!r}: the shape comes from the directory; drop the "
                "override (or start from random weights without model.init_from)")
    model = replace(saved, init_from=source, init_text_from="",
                    init_logit_scale=cfg.model.init_logit_scale,
                    max_logit_scale=cfg.model.max_logit_scale,
                    vision=replace(saved.vision, drop_path_rate=cfg.model.vision.drop_path_rate))
    if fresh_fusion:
        model = replace(model, fusion=cfg.model.fusion)
    size = cfg.model.vision.image_size
    if ("model.vision.image_size" in given if given is not None
            else size != ModelConfig().vision.image_size):
        model = replace(model, vision=replace(model.vision, image_size=size))
    if cfg.recipe == "combined" and model.text.mask != "bidirectional":
        raise ConfigError(f"model.init_from={source} has a {model.text.mask} text tower; "
                          "recipe=combined runs MLM on it and needs a bidirectional one (a "
                          "combined directory, or recipe=dual_tower to continue this one)")
    tokenizer_file = str(Path(source) / modeldir.TOKENIZER)
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).resolve() not in (
            Path(tokenizer_file).resolve(), Path(source).resolve()):
        raise ConfigError(f"tokenizer.path={cfg.tokenizer.path} conflicts with model.init_from="
                          f"{source}: its word embeddings are that directory's vocabulary "
                          f"({tokenizer_file}); drop tokenizer.path")
    resolved = replace(cfg, model=model, tokenizer=replace(cfg.tokenizer, path=tokenizer_file))
    taken = [f"{start.architecture} weights, shape and tokenizer from {source}"]
    return resolved, taken


def start_transform(cfg: PretrainConfig, train: bool) -> ImageTransform:
    """The run's image transform: the normalisation (mean/std) of the checkpoint the image
    weights start from (model.init_from, else model.vision.init_from: an ImageNet ViT's is
    not CLIP's), else the defaults; model.vision.image_size in every case."""
    start = read_start(cfg)
    if start is None and cfg.model.vision.init_from:
        start = modeldir.read(cfg.model.vision.init_from, VISION_SOURCES)
    if start is None:
        return ImageTransform(cfg.model.vision.image_size, train=train)
    t = start.transform()
    return ImageTransform(cfg.model.vision.image_size, t.mean, t.std, train=train,
                          interpolation=t.interpolation)


def load_start(model: torch.nn.Module, cfg: PretrainConfig) -> None:
    """Load model.init_from's weights into the recipe's freshly built `model`, exactly."""
    start = read_start(cfg)
    if start is None:
        return
    if cfg.recipe == "combined" and start.architecture == "combined":
        target, state, name = model, start.weights(modeldir.COMBINED_WEIGHTS), \
            modeldir.COMBINED_WEIGHTS
    elif cfg.recipe == "combined":
        target, state, name = model.towers, start.weights(), modeldir.WEIGHTS
    else:
        target, state, name = model, start.weights(), modeldir.WEIGHTS
    modeldir.load_weights(target, state, str(start.path / name))
