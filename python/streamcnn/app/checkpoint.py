"""Checkpoints of the training application: one ``torch.save`` dict per
file, written atomically, and the model rebuilt from one.

A checkpoint is a dict::

    {"format": "streamcnn-checkpoint", "version": 1,
     "config": {...},          # the run's resolved config (plain values; see MODEL_KEYS)
     "model": state_dict,      # of the SlideClassifier (keys "stem.*", "head.*")
     ...}                      # the trainer's own entries: optimizer, scheduler,
                               # scaler, epoch, RNG states, metrics

``config`` holds at least :data:`MODEL_KEYS`, enough to rebuild the model
without the original files (no ``weights`` file is needed: the state_dict
has the trained weights).
"""

import os
from typing import Any, Dict, Tuple

import torch

from .._library import first_line
from ..classifier import SlideClassifier, build_model

FORMAT = "streamcnn-checkpoint"
VERSION = 1
# config entries build_model needs; "task" is "classification" or "regression"
MODEL_KEYS = ("model", "stream_upto", "head", "num_outputs", "tile_size", "memory_budget",
              "mean", "std", "task", "image_size", "mpp")


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` (with format and version added) to ``path``
    atomically (``common.atomic_file``: a temporary file in the same folder,
    fsynced, then renamed over ``path``), so an interrupted or failed write
    (Ctrl-C, a crash, a full disk: ``common.WriteError``) leaves the
    previous file intact."""
    from .common import atomic_file
    payload = dict(payload, format=FORMAT, version=VERSION)
    with atomic_file(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """The checkpoint dict at ``path``. A missing file raises
    FileNotFoundError, anything that is not a streamcnn checkpoint a
    ValueError naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"streamcnn: checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"streamcnn: checkpoint {path} is a directory, not a file")
    if _is_torchscript(path):
        raise ValueError(f"streamcnn: {path} is a TorchScript model (what streamcnn export "
                         "writes), not a checkpoint: give the run's last.pt or best.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"streamcnn: cannot read checkpoint {path}: not a file torch.save "
                         f"wrote ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"streamcnn: {path} is not a streamcnn checkpoint")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"streamcnn: checkpoint {path} has version {ckpt.get('version')}, "
                         f"this streamcnn reads version {VERSION}")
    missing = [k for k in MODEL_KEYS if k not in ckpt.get("config", {})]
    if missing or "model" not in ckpt:
        raise ValueError(f"streamcnn: checkpoint {path} lacks "
                         f"{missing or ['model']} (a damaged or foreign file)")
    return ckpt


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (a zip with the scripted code), which
    torch.load would hand to torch.jit.load with a warning."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def model_from_config(config: Dict[str, Any]) -> SlideClassifier:
    """A freshly initialised model of the shape ``config`` describes."""
    return build_model(config["model"], num_outputs=int(config["num_outputs"]),
                       stream_upto=config["stream_upto"], head=config["head"],
                       tile_size=config["tile_size"], memory_budget=config["memory_budget"],
                       mean=config["mean"], std=config["std"])


def describe(config: Dict[str, Any]) -> str:
    """The model a config describes, in a few words: ``resnet18 streamed to
    layer1, 2 outputs``."""
    return (f"{config.get('model')} streamed to {config.get('stream_upto')}, "
            f"{config.get('num_outputs')} output{'s' if config.get('num_outputs') != 1 else ''}")


def _few(keys, n: int = 2) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def misfit(model: torch.nn.Module, state: Any) -> str:
    """Why the state_dict ``state`` does not fit ``model`` ('' when it
    does), in one short phrase: the counts of missing, unexpected and
    reshaped entries, the first few of each named (``load_state_dict``'s
    message lists every one: kilobytes for another architecture)."""
    if not isinstance(state, dict):
        return f"its model entry is a {type(state).__name__}, not a state_dict"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and isinstance(state[k], torch.Tensor)
              and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} entries missing "
                     f"({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shaped:
        k = shaped[0]
        parts.append(f"{len(shaped)} of another shape ({k}: {list(state[k].shape)} in the "
                     f"file, {list(own[k].shape)} in the model"
                     + (", ..." if len(shaped) > 1 else "") + ")")
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, state: Any, path: str,
                 config: Dict[str, Any]) -> None:
    """``model.load_state_dict(state)``; weights that do not fit raise a
    ValueError of one short line naming ``path``, the model its ``config``
    describes and the first few entries that differ, with their counts."""
    why = misfit(model, state)
    if not why:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as e:           # (what misfit does not look at)
            why = first_line(e, 300)
    raise ValueError(f"streamcnn: checkpoint {path}: its weights do not fit the model its "
                     f"config describes ({describe(config)}): {why}")


def load_model(path: str, device: Any = "cpu") -> Tuple[SlideClassifier, Dict[str, Any]]:
    """``(model, config)`` from a checkpoint: the trained model in eval mode
    on ``device``, and the run's config. Weights that do not fit the model
    of the config raise a ValueError (:func:`load_weights`)."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    model = model_from_config(config)
    load_weights(model, ckpt["model"], path, config)
    return model.to(device).eval(), config
