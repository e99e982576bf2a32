"""``streamcnn export CHECKPOINT OUT.pt``: the trained stem + head as one
TorchScript file.

The scripted model takes ``N x 3 x H x W`` images in 0..255 units (uint8,
or float32 with the value range of uint8; normalised inside the stem) of any
size and returns ``N x num_outputs`` (two logits, or the regression output).
It runs in any process that loads the operator library first -- no
``import streamcnn``::

    torch.ops.load_library(path_to_libstreamcnn)   # streamcnn.library_path()
    model = torch.jit.load("model.pt")

or from C++ (``examples/cpp_infer``).
"""

import argparse
import io
import os

import torch

from .checkpoint import load_model
from .common import UsageError, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt of a run")
    parser.add_argument("output", metavar="OUT.pt", help="the TorchScript file to write")


def run(args) -> int:
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise UsageError(f"{args.output} is a directory; give a file name such as model.pt")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of {args.output} "
                         + ("is a file" if os.path.exists(folder) else "does not exist"))
    if os.path.exists(out) and os.path.exists(args.checkpoint) and \
            os.path.samefile(out, args.checkpoint):
        raise UsageError(f"{args.output} is the checkpoint {args.checkpoint} itself: "
                         "exporting over it would lose the checkpoint; give another "
                         "file name such as model.pt")
    try:
        model, cfg = load_model(args.checkpoint, "cpu")
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    picked = ""
    if model.stem.memory_budget:
        # the scripted model streams a fixed tile: the one the run's budget
        # gives an inference of its image size, on the device it trained on
        size = int(cfg["image_size"])
        tile = model.stem.fix_tile(size, size, training=False,
                                   device="cuda" if cfg.get("device") == "cuda" else "cpu")
        picked = (f"; tile {tile['tile_size'][0]} x {tile['tile_size'][1]}, the run's "
                  f"memory budget for {size}^2 images")
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    write_atomic(out, buf.getvalue())
    print(f"wrote {args.output}: TorchScript of {cfg['model']} (streamed up to "
          f"{cfg['stream_upto']}, {cfg['head']} pool, {cfg['num_outputs']} output"
          f"{'s' if cfg['num_outputs'] > 1 else ''}); input N x 3 x H x W in 0..255 "
          f"({cfg['image_size']}^2 at {cfg['mpp']} um/px in training){picked}")
    return 0
