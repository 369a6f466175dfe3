"""A model directory read at another image size than it was trained at.

`at_image_size(folder, size)` returns the directory as it reads at `size`: its config says the
new size (the model block's `vision.image_size` and the image transform's), and its weights come
with every learned patch-position table resampled (vlp.models.embed.resize_image_state). Every
reader of model directories (vlp.load's dual towers and fine-tuned task models, fine-tuning's
joint encoder) then builds the model at the new size without knowing it was resized.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from vlp import modeldir
from vlp.config import ConfigError, VisionConfig, from_dict
from vlp.models.embed import resize_image_state


def model_block(config: dict) -> dict:
    """The ModelConfig dict inside a model directory's config.json: "model" (pretraining
    kinds) or the fine-tuned backbone's "model"."""
    if config.get("architecture") == "finetuned":
        return config["backbone"]["model"]
    return config["model"]


def trained_image_size(folder: modeldir.ModelDir) -> int:
    return int(model_block(folder.config)["vision"]["image_size"])


@dataclass(frozen=True)
class ResizedModelDir(modeldir.ModelDir):
    """`folder` read at another image size (see the module docstring); `trained` is the vision
    config the weights were trained with."""

    trained: VisionConfig

    def weights(self, name: str = modeldir.WEIGHTS) -> dict[str, torch.Tensor]:
        image_size = int(model_block(self.config)["vision"]["image_size"])
        try:
            return resize_image_state(super().weights(name), self.trained, image_size)
        except ValueError as e:  # a table that is not the grid its config says
            raise modeldir.ModelDirError(f"{self.path / name}: {e}") from None


def at_image_size(folder: modeldir.ModelDir, image_size: int) -> modeldir.ModelDir:
    """`folder` as read at `image_size` (0 or the trained size: `folder` itself). A ViT's image
    size must be a multiple of its patch size (ConfigError naming model.vision.image_size)."""
    if not image_size or image_size == trained_image_size(folder):
        return folder
    try:
        trained = from_dict(VisionConfig, model_block(folder.config)["vision"])
    except (KeyError, ConfigError) as e:
        raise modeldir.ModelDirError(f"{folder.path / modeldir.CONFIG}: bad \"vision\" block: "
                                     f"{e}") from None
    resize_image_state({}, trained, image_size)  # the size checks, before any weight is read
    config = copy.deepcopy(folder.config)
    model_block(config)["vision"]["image_size"] = int(image_size)
    if "transform" in config:
        config["transform"]["image_size"] = int(image_size)
    else:  # written before v0.1: the transform follows the model's size
        config["transform"] = {"image_size": int(image_size)}
    return ResizedModelDir(folder.path, config, trained)
