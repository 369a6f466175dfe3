"""vlp: vision-language pretraining on one unified Transformer.

    shards (webdataset, img2dataset layout)   vlp.data: shards -> decode -> transform -> tokenize
        -> Batch                              vlp.models: PatchEmbed / TextEmbed -> Transformer
        -> DualTower (image + text towers)    vlp.objectives: contrastive (InfoNCE) loss
        -> vlp.engine (train loop, checkpoints) -> model directory -> vlp.load -> vlp.eval

Public API: `vlp.load(path)` returns a model with `encode_image` and `encode_text`.
"""
__version__ = "0.1.0"


def load(path, device=None, *, image_size: int = 0):
    """Load a model directory (config.json + model.safetensors + tokenizer.json) onto `device`
    (None: the GPU when there is one, else the CPU); `image_size` > 0: at that image size
    (learned patch positions resampled), else at the size it was trained at."""
    from vlp.api import load as _load

    return _load(path, device, image_size=image_size)


__all__ = ["load", "__version__"]
