"""Peak memory of `streamcnn predict --full-slide` on a large region (CPU).

    nice python bench/predict_memory.py [--size 16384] [--tile 1024] [--heatmap cam]

Writes a size x size synthetic slide (tissue everywhere, so the tissue box
is the whole slide; streamed to disk by streamcnn.tiff.PyramidWriter, never
held whole), a checkpoint of a ResNet-18 classifier streamed up to layer3
(max-pool head, random weights: memory does not depend on them), and runs
`predict --full-slide` in a fresh process, which reports its peak resident
memory (VmHWM of /proc/self/status) and its resident memory just before
predicting (imports, matplotlib included, and model loaded). Prints a table with the parts of the
stated bound:

    bound = baseline + image (uint8, 3 H W) + 3 x stem output (float32; the
            output and the head body's activations, at most twice its size,
            on it) + the stem's largest tile (the C core's memory model,
            forward without gradient) + 5% of the image (maps, thumbnails,
            TIFF rows)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

CHILD = r"""
import argparse, json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from streamcnn.app import predict
from streamcnn.app.checkpoint import load_model
p = argparse.ArgumentParser(); predict.add_arguments(p)
args = p.parse_args(sys.argv[1:])
load_model(args.checkpoint)          # warm the imports and the model once
import matplotlib.figure, matplotlib.backends.backend_agg, scipy.ndimage, tqdm  # noqa
base = status("VmRSS")
t0 = time.perf_counter()
rc = predict.run(args)
print(json.dumps({"rc": rc, "baseline": base, "peak": status("VmHWM"),
                  "seconds": time.perf_counter() - t0}))
"""


def make_slide(path: str, size: int, mpp: float) -> None:
    """size x size tissue: a 2048-px synthetic tissue tile repeated with
    mirror flips, written row band by row band."""
    from streamcnn.data import synthetic
    from streamcnn.tiff import PyramidWriter
    t = min(2048, size)
    tile = synthetic.tissue_image(t, t, seed=7, tissue_fraction=0.9)
    row = torch.cat([tile if k % 2 == 0 else tile.flip(1) for k in range(-(-size // t))],
                    dim=1)[:, :size]
    with PyramidWriter(path, size, size, mpp=mpp, tile=512) as w:
        for k in range(-(-size // t)):
            band = row if k % 2 == 0 else row.flip(0)
            w.write(band[:min(t, size - k * t)].contiguous())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--heatmap", default="cam", choices=["cam", "saliency", "both", "none"])
    ap.add_argument("--work", default=None, help="folder for the slide and outputs")
    a = ap.parse_args()
    from streamcnn.app.checkpoint import save_checkpoint
    from streamcnn.classifier import build_model
    from streamcnn._library import memory_info
    work = a.work or tempfile.mkdtemp(prefix="predict_memory_")
    os.makedirs(work, exist_ok=True)
    slide = os.path.join(work, f"slide_{a.size}.tif")
    mpp = 0.5
    t0 = time.perf_counter()
    if not os.path.exists(slide):
        make_slide(slide, a.size, mpp)
    t_slide = time.perf_counter() - t0
    cfg = dict(model="resnet18", stream_upto="layer3", head="max", num_outputs=2,
               tile_size=a.tile, memory_budget=None, mean=[124, 116, 104], std=[58, 57, 57],
               task="classification", image_size=1024, mpp=mpp)
    torch.manual_seed(0)
    model = build_model("resnet18", num_outputs=2, stream_upto="layer3", head="max",
                        tile_size=a.tile, mean=cfg["mean"], std=cfg["std"])
    ckpt = os.path.join(work, "model.pt")
    save_checkpoint(ckpt, {"config": cfg, "model": model.state_dict()})
    out = os.path.join(work, "out")
    cmd = [sys.executable, "-c", CHILD, ckpt, slide, "--out", out, "--full-slide",
           "--heatmap", a.heatmap, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        print(r.stdout, r.stderr, file=sys.stderr)
        sys.exit(1)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    import csv
    with open(os.path.join(out, "predictions.csv")) as f:
        row = next(csv.DictReader(f))
    w, h = (int(v) for v in row["region"].split("x"))
    stem = model.stem
    oh, ow = -(-h // stem.output_stride[0]), -(-w // stem.output_stride[1])
    image = 3 * h * w
    stem_out = 4 * stem.out_channels * oh * ow
    tile_fwd = memory_info(stem.program, h, w, (a.tile, a.tile), True, None, 4, True)[1]
    bound = res["baseline"] + image + 3 * stem_out + tile_fwd + 0.05 * image
    gb = 1e9
    print(f"| region | heatmap | tile | time s | baseline GB | image GB | stem out GB | "
          f"tile GB | bound GB | peak RSS GB | peak / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {w}x{h} | {a.heatmap} | {a.tile} | {res['seconds']:.0f} | "
          f"{res['baseline'] / gb:.2f} | {image / gb:.2f} | {stem_out / gb:.2f} | "
          f"{tile_fwd / gb:.2f} | {bound / gb:.2f} | {res['peak'] / gb:.2f} | "
          f"{res['peak'] / bound:.2f} |")
    print(f"(slide written in {t_slide:.0f} s; outputs in {out}; rc {res['rc']})")
    sys.exit(0 if res["peak"] <= bound and res["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
