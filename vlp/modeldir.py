"""The model directory: the one place that writes and reads it.

    config.json         {"format_version", "architecture", "transform", ...the kind's own keys}
    model.safetensors   the weights (never a pickle)
    tokenizer.json      the tokenizer
    (kind-specific)     e.g. combined.safetensors (a combined model's fusion layers and heads),
                        answers.json (a fine-tuned VQA model's answer vocabulary)

Kinds (`architecture`) and their own config keys:
    dual_tower     "model" (ModelConfig); model.safetensors holds the DualTower
    combined       "model"; model.safetensors holds the towers only (so it loads as a dual
                   tower), combined.safetensors every weight of the Combined model
    single_stream  "model", "region_feature_dim", "region_labels", "heads"
    finetuned      "task", "backbone" (the joint encoder's spec), "head" (the task's settings)
    vision_tower   "vision" (VisionConfig), "source" (what it was converted from); one image
                   encoder on its own (`vlp convert hf-vit` / `hf-swin`), without its
                   projection; no tokenizer.json

`vlp.load`, fine-tuning's joint encoder, the towers' `init_from` and the conversions all go
through `read` / `write`; foreign checkpoints (Hugging Face folders, timm state dicts) are read
through `read_checkpoint`, which never unpickles anything but plain tensors.
The module only moves files and dicts; building models from them is the caller's business.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlp.config import ConfigError, ModelConfig, VisionConfig, from_dict
from vlp.data.transforms import ImageTransform
from vlp.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
# the kinds that are whole models (what `read` accepts unless told otherwise), and every kind
MODELS = ("dual_tower", "combined", "single_stream", "finetuned")
ARCHITECTURES = MODELS + ("vision_tower",)
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
COMBINED_WEIGHTS = "combined.safetensors"


class ModelDirError(ConfigError):
    """A model directory (init_from=, --model) that exists but cannot be used; the message
    names the file. A ConfigError: the command line stops with that one line."""


@dataclass(frozen=True)
class ModelDir:
    """A model directory on disk, its config.json read and checked."""

    path: Path
    config: dict

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    def model_config(self) -> ModelConfig:
        """The "model" block as a ModelConfig (dual_tower, combined, single_stream)."""
        try:
            return from_dict(ModelConfig, self.config["model"])
        except (KeyError, ConfigError) as e:
            raise ModelDirError(f"{self.path / CONFIG}: bad \"model\" block: {e}") from None

    def vision_config(self) -> VisionConfig:
        """The image encoder's VisionConfig: a vision_tower's "vision" block, or the "model"
        block's vision part (dual_tower, combined, single_stream)."""
        if self.architecture != "vision_tower":
            return self.model_config().vision
        try:
            return from_dict(VisionConfig, self.config["vision"])
        except (KeyError, ConfigError) as e:
            raise ModelDirError(f"{self.path / CONFIG}: bad \"vision\" block: {e}") from None

    def transform(self) -> ImageTransform:
        """The eval image transform the model was trained with."""
        if "transform" in self.config:
            return ImageTransform.from_dict(self.config["transform"])
        return ImageTransform(self.vision_config().image_size)  # written before v0.1

    def tokenizer(self) -> Tokenizer:
        if self.architecture == "vision_tower":
            raise ModelDirError(f"{self.path / CONFIG}: a vision_tower directory has no "
                                "tokenizer (it is an image encoder on its own)")
        return load_tokenizer(self.path / TOKENIZER)

    def weights(self, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
        """A safetensors file of the directory as a state dict (CPU tensors)."""
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the {self.architecture} model directory "
                                    f"needs it")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelDirError(f"{path}: unreadable safetensors file, truncated or not "
                                f"safetensors ({e})") from None

    def read_json(self, name: str):
        """A kind-specific JSON file (e.g. answers.json)."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: the {self.architecture} model directory "
                                    f"needs it") from None
        except ValueError as e:
            raise ModelDirError(f"{path}: not valid JSON ({e})") from None


def read(path: str | Path, architectures: tuple[str, ...] = MODELS) -> ModelDir:
    """The model directory at `path`, refusing (one line naming the file) a missing folder or
    file, unreadable JSON, a newer format_version or an architecture outside `architectures`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory (a run writes one to "
                                "OUT/model: vlp pretrain --out OUT ...)")
    # a vision tower has no tokenizer; every other kind needs one
    needed = (CONFIG, WEIGHTS) if (path / CONFIG).is_file() and _declares_vision_tower(path) \
        else (CONFIG, WEIGHTS, TOKENIZER)
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a vlp model directory: missing "
                                f"{', '.join(missing)} (a run writes one to OUT/model; "
                                "`vlp convert` writes converted ones)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path / CONFIG}: expected a JSON object, got "
                            f"{type(config).__name__}")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ModelDirError(f"{path / CONFIG}: format_version={version!r} is not one this vlp "
                            f"reads (up to {FORMAT_VERSION}); upgrade vlp")
    arch = config.get("architecture")
    if arch not in architectures:
        raise ModelDirError(f"{path / CONFIG}: architecture {arch!r} is not usable here; "
                            f"expected one of {list(architectures)}")
    return ModelDir(path, config)


def write(path: str | Path, architecture: str, config: dict, weights: dict[str, torch.Tensor],
          tokenizer: Tokenizer | None, transform: ImageTransform, *,
          extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
          files: dict[str, object] | None = None) -> Path:
    """Write a model directory: config.json ({format_version, architecture, transform} plus
    `config`), `weights` as model.safetensors, the tokenizer (None for a vision_tower, which
    has none), `extra_weights` (file name -> state dict) and `files` (file name -> JSON-able
    value). It is written into a temporary sibling and renamed into place, so a run killed
    mid-write leaves no half directory."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {list(ARCHITECTURES)}")
    if (tokenizer is None) != (architecture == "vision_tower"):
        raise ValueError(f"a {architecture} directory "
                         f"{'has no' if tokenizer is not None else 'needs a'} tokenizer")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    full = {"format_version": FORMAT_VERSION, "architecture": architecture, **config,
            "transform": transform.to_dict()}
    (tmp / CONFIG).write_text(json.dumps(full, indent=2) + "\n")
    save_file(_contiguous(weights), str(tmp / WEIGHTS))
    for name, state in (extra_weights or {}).items():
        save_file(_contiguous(state), str(tmp / name))
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
    for name, value in (files or {}).items():
        (tmp / name).write_text(json.dumps(value, indent=0) + "\n")
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def _declares_vision_tower(path: Path) -> bool:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return False  # read() reports the file
    return isinstance(config, dict) and config.get("architecture") == "vision_tower"


# ------------------------------------------------------------------ foreign checkpoints
def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of a foreign checkpoint (CPU): a folder as `save_pretrained` writes it
    (model.safetensors, its sharded model.safetensors.index.json, or pytorch_model.bin) or one
    file (.safetensors; .bin / .pt / .pth). A pickle is read with
    `torch.load(weights_only=True)`, which builds tensors and plain containers only and refuses
    any other object before creating it: a file that asks for one (a pickled `os.system`, a
    training checkpoint's optimizer class) stops with one line naming the file and what it
    asked for, and nothing in it runs. Every value must be a tensor (the first that is not is
    named). `what` names the checkpoint's kind in the errors ("Hugging Face ViT folder")."""
    path = Path(path)
    if path.is_dir():
        single, index = path / WEIGHTS, path / "model.safetensors.index.json"
        if single.is_file():
            return _read_safetensors(single)
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelDirError(f"{index}: not a safetensors index (no weight_map: {e})") \
                    from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_safetensors(path / shard))
            return state
        if (path / "pytorch_model.bin").is_file():
            return _read_pickle(path / "pytorch_model.bin")
        raise FileNotFoundError(f"{what} {str(path)!r} has no weights: expected "
                                "model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (named by the folder's index)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelDirError(f"{path}: unreadable safetensors file, truncated or not "
                            f"safetensors ({e})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError,
            ImportError, TypeError) as e:
        # torch's message is a paragraph; the line that says what the file asked for is enough
        lines = [ln.strip() for ln in str(e).splitlines()
                 if "GLOBAL" in ln or "Unsupported" in ln or "Unpickler" in ln.split(":")[0]]
        detail = (lines[-1] if lines else str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ModelDirError(f"{path}: refused: not a plain tensor checkpoint ({detail}); vlp "
                            "reads pickles with torch.load(weights_only=True) and ran nothing "
                            "from it. Save the weights as safetensors") from None
    if not isinstance(state, dict):
        raise ModelDirError(f"{path}: expected a state dict (name -> tensor), got "
                            f"{type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ModelDirError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor (a "
                                "training checkpoint? give the model's state dict)")
    return state


def untied_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with each tied tensor kept once (safetensors refuses tensors that
    share memory): a weight shared by two modules (an MLM decoder tied to the word embeddings)
    is stored under its first name; `load_weights` ties it again."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` exactly: every key must fit and every parameter be given,
    except the second names of tied weights. A mismatch raises one line naming `source` and the
    first offending keys."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that does not fit: torch lists every one
        detail = str(e).split("\n\t")[1:2] or [str(e)]
        raise ModelDirError(f"{source}: the weights do not fit the model: {detail[0]}") from None
    given = {id(p) for n, p in module.state_dict(keep_vars=True).items() if n in state}
    params = module.state_dict(keep_vars=True)
    missing = [k for k in missing if id(params[k]) not in given]
    if missing or unexpected:
        raise ModelDirError(f"{source}: the weights do not fit the model: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
