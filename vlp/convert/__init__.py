"""Converting other projects' checkpoints to and from vlp model directories (`vlp convert`).

    hf_clip:   Hugging Face CLIPModel folder <-> vlp dual tower (both directions)
    open_clip: OpenCLIP state dict (safetensors) + its model config JSON -> vlp dual tower

Everything reads local files only; no hub, no transformers or open_clip import.
"""
from vlp.convert.hf_clip import from_hf_clip, to_hf_clip
from vlp.convert.open_clip import from_open_clip

__all__ = ["from_hf_clip", "to_hf_clip", "from_open_clip"]
