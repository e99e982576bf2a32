"""The training options: one table that makes the command-line flags, reads
config files (TOML or YAML) and checks their values.

Precedence: defaults < ``--config FILE`` < flags. The resolved config (the
options, plus what the model needs: ``num_outputs``, ``mean``, ``std``) is
what ``RUN_DIR/config.yaml`` and the checkpoints hold.
"""

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ..classifier import (ARCHITECTURES, COUNTED_LAYERS, DEFAULT_STREAM_UPTO, IMAGENET_MEAN,
                          IMAGENET_STD, LAST_FEATURE, NAMED_STAGES, POOLS)
from .common import METRICS, TASKS, UsageError, check_metric, default_metric, is_number


@dataclass(frozen=True)
class Option:
    name: str                      # the config key; the flag is --name-with-dashes
    kind: type                     # int, float, str or bool
    default: Any
    help: str
    choices: Optional[Sequence[str]] = None
    check: Optional[Callable[[Any], bool]] = None   # a value's constraint
    need: str = ""                                   # ... said in words
    path: bool = False                               # a file name (made absolute)
    metavar: Optional[str] = None


def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


OPTIONS: Tuple[Option, ...] = (
    Option("train", str, None, "training slides: CSV with path,label", path=True,
           metavar="CSV"),
    Option("val", str, None, "validation slides: CSV with path,label", path=True,
           metavar="CSV"),
    Option("out", str, None, "the run folder (created)", path=True, metavar="RUN_DIR"),
    Option("task", str, "classification", "classification (labels 0 .. K-1, cross-entropy, AUC) "
           "or regression (numbers, MSE, Spearman)", choices=TASKS),
    Option("num_classes", int, 2, "classes of --task classification, labels 0 .. K-1 "
           "(K > 2: softmax over K logits, val_auc the macro one-vs-rest AUC)",
           check=lambda v: v >= 2, need="at least 2", metavar="K"),
    Option("classes", str, None, "class names in the order of the logits, comma-separated "
           "(e.g. normal,tumour): labels may be these names; sets --num-classes; the outputs "
           "name each class", metavar="NAMES"),
    Option("metric", str, None, "the validation metric that picks best.pt: auc (the "
           "default of classification), kappa (quadratic weighted Cohen's kappa of the "
           "predicted classes, for ordinal grades), accuracy, balanced_accuracy; spearman "
           "(regression, its default)", choices=METRICS),
    Option("class_weights", str, "none", "weights of the classes in the training loss: "
           "none, balanced (n / (K n_c) of the training labels, as scikit-learn) or K "
           "comma-separated numbers", metavar="W"),
    Option("image_size", int, 1024, "image edge in pixels (one S x S image per slide)",
           check=_pos, need="positive", metavar="PX"),
    Option("mpp", float, 1.0, "microns per pixel the slides are read at", check=_pos,
           need="positive", metavar="UM"),
    Option("slide_mpp", float, None, "microns per level-0 pixel of slides whose file "
           "carries none (PNG, JPEG, a TIFF without a centimetre resolution); an mpp column "
           "of a CSV gives it per slide", check=_pos, need="positive", metavar="UM"),
    Option("crop", str, "tissue", "tissue: the tissue's bounding box centred; center: the "
           "slide's centre", choices=("tissue", "center")),
    Option("model", str, "resnet18", "torchvision backbone", choices=ARCHITECTURES),
    Option("weights", str, None, "a local torchvision state_dict of the backbone (nothing "
           "is downloaded)", path=True, metavar="FILE"),
    Option("stream_upto", str, None, "last streamed layer: maxpool, layer1 .. layer4 "
           "(ResNets), a count 1 .. 7 (ConvNeXt: N streams features[:N]), pool0, "
           "denseblock1, transition1 .. denseblock4 "
           "(DenseNets), maxpool1, Conv2d_3b_1x1 .. Mixed_7c (Inception-v3), a count 1 .. 18 "
           "(MobileNetV2), maxpool, stage2 .. stage4, conv5 (ShuffleNetV2), a count of "
           "features (VGGs: 1 .. 30 for vgg16), stem, block1 .. block4 (RegNetX), a count "
           "1 .. 16 of layers (MNASNet), maxpool1, conv2 .. inception5b (GoogLeNet); "
           "default: the stage before the last (stride 16)",
           metavar="LAYER"),
    Option("head", str, "max", "global pool of the head: max (as in the paper) or avg",
           choices=POOLS),
    Option("bn", str, "frozen", "batch norms of the head: frozen (eval statistics, as the "
           "stem's; the affine parameters train) or train (per-image statistics)",
           choices=("frozen", "train")),
    Option("tile_size", int, None, "streaming tile edge (default 1024, or where the "
           "stem's receptive field leaves fewer than 32 output pixels per side, the tile "
           "that gives 32; unless --memory-budget)", check=_pos,
           need="positive", metavar="T"),
    Option("memory_budget", str, None, "instead of --tile-size: bytes the streamed pass may "
           "hold, e.g. 2GB", metavar="B"),
    Option("freeze_stem", bool, False, "keep the streamed stem's weights as they are "
           "(e.g. --weights): only the head trains, and the stem runs forward only"),
    Option("epochs", int, 10, "epochs to train", check=_pos, need="positive"),
    Option("patience", int, 0, "stop when the validation metric (what picks best.pt) has "
           "not improved for this many epochs (0: train every epoch)", check=_nonneg,
           need="non-negative", metavar="EPOCHS"),
    Option("batch_size", int, 4, "images per optimizer step (gradient accumulation of "
           "per-image steps; over all processes)", check=_pos, need="positive",
           metavar="B"),
    Option("optimizer", str, "adamw", "optimizer", choices=("sgd", "adamw")),
    Option("lr", float, 1e-3, "peak learning rate", check=_pos, need="positive"),
    Option("momentum", float, 0.9, "SGD momentum", check=lambda v: 0 <= v < 1,
           need="in [0, 1)"),
    Option("weight_decay", float, 1e-4, "weight decay", check=_nonneg, need="non-negative"),
    Option("clip_grad", float, 1.0, "clip the gradient norm of each optimizer step at this "
           "value (0: off); keeps a from-scratch backbone from diverging",
           check=_nonneg, need="non-negative", metavar="NORM"),
    Option("schedule", str, "cosine", "learning-rate schedule per optimizer step: constant, "
           "cosine (to 0 at the last step) or step (x gamma every step-epochs)",
           choices=("constant", "cosine", "step")),
    Option("warmup", int, 0, "optimizer steps of linear warm-up", check=_nonneg,
           need="non-negative", metavar="STEPS"),
    Option("step_epochs", int, 10, "schedule step: epochs between decays", check=_pos,
           need="positive", metavar="N"),
    Option("gamma", float, 0.1, "schedule step: decay factor", check=lambda v: 0 < v <= 1,
           need="in (0, 1]"),
    Option("amp", str, "off", "mixed precision (torch.autocast; fp16 with a GradScaler)",
           choices=("off", "bf16", "fp16")),
    Option("augment", bool, False, "flips, 90-degree rotations and colour jitter (uint8)"),
    Option("workers", int, 0, "DataLoader worker processes", check=_nonneg,
           need="non-negative"),
    Option("seed", int, 0, "seed of the weights, data order and augmentation"),
    Option("device", str, None, "cpu or cuda (default: cuda when available)",
           choices=("cpu", "cuda")),
    Option("tile_parallel", int, 1, "processes that share each image: its stem output split "
           "into N row bands (streamcnn.distributed.TileParallel), each process reading only "
           "the image rows its band needs; started by the command itself, or under torchrun "
           "groups of N consecutive ranks (data parallel across the groups)", check=_pos,
           need="a positive number of processes", metavar="N"),
    Option("tensorboard", bool, False, "also log to RUN_DIR/tensorboard (needs the "
           "tensorboard package)"),
)
BY_NAME = {o.name: o for o in OPTIONS}
# derived entries of a resolved config (accepted in a config file when they agree)
DERIVED = ("num_outputs", "mean", "std")
# entries that may change when a run is resumed: they do not change the result
# (epochs: the run goes on longer; with --schedule cosine the curve follows the
# new total; out: the run folder may have moved)
# tile_parallel: how many processes share an image does not change the result
# patience: when to stop, not what an epoch computes
RESUME_FREE = ("epochs", "workers", "device", "tensorboard", "out", "tile_parallel",
               "patience")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are :class:`UsageError` (one line, exit 2).
    With ``intermixed`` set (a subcommand's parser whose positionals are a
    list: ``predict CKPT --out DIR A.svs B.svs``), options may come between
    the positionals, as ``parse_intermixed_args`` reads them. Options are
    given whole (no abbreviations)."""

    intermixed = False
    _mixing = False

    def __init__(self, *args, **kwargs):
        # no prefixes: `--epoch 2` was taken as --epochs, and a typo could
        # become another option without a word
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # the subcommand action calls this; intermixed parsing calls it
        # again (Python < 3.13) for its two passes
        if not self.intermixed or self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False

    def error(self, message):
        if message.endswith(": expected one argument"):
            # argparse reads a value that starts with "-" (-1,1; -5GB) as
            # an option: say how to give it
            flag = message.split()[1].rstrip(":")
            message += f" (a value that starts with '-' is given as {flag}=VALUE)"
        words = self.prog.split()
        raise UsageError(f"{words[-1]}: {message}" if len(words) > 1 else message)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of :data:`OPTIONS` (defaults None: what was not given stays
    unset, so config files and checkpoints can fill it)."""
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        # (not `not in (None, False)`: 0 == False hid the defaults of 0)
        default = f" (default {o.default})" if o.default is not None and \
            o.default is not False else ""
        if o.kind is bool:
            parser.add_argument(flag, dest=o.name, action=argparse.BooleanOptionalAction,
                                default=None, help=o.help)
        else:
            parser.add_argument(flag, dest=o.name, type=o.kind if o.kind is not str else str,
                                default=None, choices=o.choices, metavar=o.metavar,
                                help=o.help + default)


# options given as comma-separated text that a config file may give as a list
LISTS = ("classes", "class_weights")


def check_value(o: Option, v: Any, where: str) -> Any:
    """``v`` as option ``o``'s type, or a UsageError naming ``where``."""
    if v is None:
        return None
    if o.kind is bool:
        ok = isinstance(v, bool)
    elif o.kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif o.kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    else:
        if o.name == "stream_upto" and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if o.name in LISTS and isinstance(v, list) and v and all(
                isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
            v = ",".join(map(str, v))       # a config file's list, as the flag writes it
        ok = isinstance(v, str)
    if not ok and o.kind is float and isinstance(v, float):
        raise UsageError(f"{where}: {o.name} must be a finite number, got {v!r}")
    if not ok:
        raise UsageError(f"{where}: {o.name} must be {o.kind.__name__}, got {v!r}")
    if o.choices is not None and v not in o.choices:
        raise UsageError(f"{where}: {o.name} must be one of {list(o.choices)}, got {v!r}")
    if o.check is not None and not o.check(v):
        raise UsageError(f"{where}: {o.name} must be {o.need}, got {v!r}")
    return v


def read_config_file(path: str) -> Dict[str, Any]:
    """The options set in a TOML (``.toml``) or YAML file (flat keys as in
    :data:`OPTIONS`, dashes or underscores)."""
    if os.path.isdir(path):
        raise UsageError(f"config {path} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"config {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:                               # Python 3.10
            raise UsageError(f"config {path}: TOML needs Python 3.11 (tomllib); use "
                             "YAML") from None
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"config {path} is not valid TOML: {e}") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            raise UsageError(f"config {path} is not valid YAML: {msg}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of option: value")
    out = {}
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name in DERIVED:
            out[name] = v
            continue
        if name not in BY_NAME:
            raise UsageError(f"config {path}: unknown option {key!r}")
        o = BY_NAME[name]
        v = check_value(o, v, f"config {path}")
        if o.path and v is not None:        # relative to the config file's folder
            v = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), v))
        out[name] = v
    return out


def explicit_options(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(from_file, from_flags)``: the options the config file and the
    flags set, checked, file names made absolute."""
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {}
    for o in OPTIONS:
        v = getattr(args, o.name, None)
        if v is None:
            continue
        v = check_value(o, v, "--" + o.name.replace("_", "-"))
        if o.path:
            v = os.path.abspath(v)
        flags[o.name] = v
    return from_file, flags


def resolve(given: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The full config: ``base`` (defaults, or a checkpoint's config)
    updated with ``given``, with the derived entries filled in."""
    cfg = {o.name: o.default for o in OPTIONS} if base is None else dict(base)
    for o in OPTIONS:               # a checkpoint from before an option existed
        cfg.setdefault(o.name, o.default)
    derived = {k: given[k] for k in DERIVED if k in given}
    cfg.update({k: v for k, v in given.items() if k not in DERIVED})
    for name in ("train", "val", "out"):
        if not cfg.get(name):
            raise UsageError(f"train: --{name} is required")
    if cfg["tile_size"] is not None and cfg["memory_budget"] is not None:
        raise UsageError("give --tile-size or --memory-budget, not both")
    if cfg["stream_upto"] is None:
        cfg["stream_upto"] = DEFAULT_STREAM_UPTO[cfg["model"]]
    if cfg["model"] not in NAMED_STAGES:        # ConvNeXts, MobileNetV2, VGGs, MNASNets
        try:
            cfg["stream_upto"] = int(cfg["stream_upto"])
        except ValueError:
            raise UsageError(f"--stream-upto for {cfg['model']} is a number 1 .. "
                             f"{LAST_FEATURE[cfg['model']]} of its "
                             f"{COUNTED_LAYERS[cfg['model']]}, got "
                             f"{cfg['stream_upto']!r}") from None
    else:
        cfg["stream_upto"] = str(cfg["stream_upto"])
    if cfg["tile_size"] is None and cfg["memory_budget"] is None:
        from ..classifier import default_tile_size
        cfg["tile_size"] = default_tile_size(cfg["model"], cfg["stream_upto"])
    if cfg["device"] is None:
        import torch
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["classes"] is not None:
        names = parse_classes(cfg["classes"])
        if given.get("num_classes") not in (None, len(names)):
            raise UsageError(f"--num-classes {given['num_classes']} and --classes "
                             f"{cfg['classes']!r} ({len(names)} names) disagree")
        if cfg["task"] != "classification":
            raise UsageError(f"--classes is for --task classification (the task is "
                             f"{cfg['task']})")
        cfg["num_classes"] = len(names)
    if cfg["metric"] is None:
        cfg["metric"] = default_metric(cfg["task"])
    check_metric(cfg["metric"], cfg["task"], f"--task {cfg['task']}")
    if cfg["task"] != "classification" and cfg["num_classes"] != 2:
        raise UsageError(f"--num-classes {cfg['num_classes']} is for --task classification "
                         f"(the task is {cfg['task']})")
    if cfg["task"] != "classification" and cfg["class_weights"] != "none":
        raise UsageError(f"--class-weights is for --task classification (the task is "
                         f"{cfg['task']})")
    parse_class_weights(cfg["class_weights"], cfg["num_classes"])
    want = {"num_outputs": cfg["num_classes"] if cfg["task"] == "classification" else 1,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for k, v in derived.items():
        if v != want[k]:
            raise UsageError(f"config: {k} is {want[k]!r} for this config, got {v!r} "
                             "(derived; leave it out)")
    cfg.update(want)
    return cfg


def parse_classes(text: Optional[str]) -> Optional[list]:
    """``--classes``: the class names (at least 2, distinct, non-empty, not
    numbers: a label that is a number is an index), or None."""
    if text is None:
        return None
    names = [v.strip() for v in text.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names) or \
            any(is_number(v) for v in names):
        raise UsageError(f"--classes {text!r} is not 2 or more distinct, non-empty, "
                         "non-numeric names separated by commas")
    return names


def parse_class_weights(text: str, num_classes: int) -> Optional[list]:
    """``--class-weights``: None for ``none`` and ``balanced`` (worked out
    from the training labels), else the K weights (finite, non-negative,
    not all zero)."""
    if text in ("none", "balanced"):
        return None
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        w = []
    if len(w) != num_classes or not all(math.isfinite(v) and v >= 0 for v in w) or \
            not any(w):
        raise UsageError(f"--class-weights {text!r} is not none, balanced or {num_classes} "
                         "comma-separated non-negative numbers (not all 0)")
    return w


def _before_option(ckpt: Dict[str, Any], name: str) -> Any:
    """What a checkpoint written before option ``name`` existed ran with."""
    if name == "metric":
        return default_metric(ckpt.get("task", "classification"))
    o = BY_NAME.get(name)
    return o.default if o is not None else None


def differences(ckpt: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """``{name: (checkpoint's value, given value)}`` for the given options
    that differ from a checkpoint's config and may not change on resume."""
    out = {}
    for k, v in given.items():
        if k in RESUME_FREE or k in DERIVED:
            continue
        a = ckpt.get(k, _before_option(ckpt, k))
        if (str(a) != str(v)) if k == "stream_upto" else (a != v):
            out[k] = (a, v)
    return out
