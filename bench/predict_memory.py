"""Peak memory of `streamcnn predict --full-slide` on a large region (CPU).

    nice python bench/predict_memory.py [--size 16384] [--tile 1024]
        [--heatmap both|cam|saliency|none]

Writes a size x size synthetic slide (tissue everywhere, so the tissue box
is the whole slide; streamed to disk by streamcnn.tiff.PyramidWriter, never
held whole), a checkpoint of a ResNet-18 classifier streamed up to layer3
(max-pool head, random weights: memory does not depend on them), and runs
`predict --full-slide` in a fresh process, which reports its resident
memory before predicting (imports, matplotlib included, the model loaded
once and dropped: the baseline), its peak resident memory (VmHWM of
/proc/self/status) and the peak of each phase (VmHWM reset at the phase
boundaries through /proc/self/clear_refs). Prints a table of the stated
bound, term by term, and one of the phases:

    bound = baseline
          + model        parameters and buffers (predict loads its own copy)
          + image        uint8, 3 H W
          + stem out     float32, the stem output
          + head         HEAD x stem out: the head body's activations on it
                         (ResNet-18's layer4, eval: measured 2.03-2.14 x
                         on 256 x 512^2 and 256 x 256^2 stem outputs;
                         HEAD = 2.25)
          + maps         the class map and the max-pool winners at the
                         feature map's resolution (float32)
          + tile         the stem's largest tile (the C core's memory
                         model, forward without gradient)
          + fixed        0.1 GB: tissue mask and thumbnails (2048 px and
                         --png-size), the PNG figure, the TIFF writer's
                         bands and rows of tiles, allocator slack

          + saliency     (--heatmap saliency or both) the larger of its two
                         phases: the head's gradient, HEAD_GRAD x stem out
                         (the head body's activations, their gradients and
                         d score / d stem output; measured 5.7 x at 4096²),
                         and the image gradient's bands: d score / d stem
                         out, the pooled map, a float32 band of the image
                         (and its halo) three times (the band, its gradient,
                         the rows carried to the next band), the band's
                         stem output twice (and its gradient) and the
                         stem's backward tile of the band with its strips
                         (the memory model, image gradient alone)

The phases do not all overlap (the image is dropped before the head when
no saliency is drawn; the head's activations of the class map are freed
before the saliency's head gradient; the pictures come after the stem
output is dropped), so the sum is an upper bound, not the peak itself.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

FIXED = 0.1e9       # the bound's fixed term (see the docstring), bytes
HEAD = 2.25         # the head body's activations per byte of stem output
HEAD_GRAD = 6.5     # the head's gradient: its activations, their gradients and
                    # d score / d stem output, per byte of stem output

CHILD = r"""
import argparse, functools, json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
phases = []                 # (phase, peak RSS while it ran, RSS at its end)
def mark(name):
    phases.append((name, status("VmHWM"), status("VmRSS")))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")        # reset VmHWM: the next phase's peak is its own
def phase(obj, attr, name):
    fn = getattr(obj, attr)
    @functools.wraps(fn)
    def wrapped(*a, **k):
        mark("between")
        try:
            return fn(*a, **k)
        finally:
            mark(name)
    setattr(obj, attr, wrapped)
from streamcnn.app import predict
from streamcnn.app.checkpoint import load_model
from streamcnn import heatmaps
p = argparse.ArgumentParser(); predict.add_arguments(p)
args = p.parse_args(sys.argv[1:])
load_model(args.checkpoint)          # warm the imports and the model once
import matplotlib.figure, matplotlib.backends.backend_agg, scipy.ndimage, tqdm  # noqa
phase(predict, "_read_region", "read (tissue box, region)")
phase(heatmaps, "class_maps", "head (class map)")
phase(heatmaps, "_output_gradient", "saliency: head gradient")
phase(heatmaps, "_band_gradients", "saliency: image gradient bands")
phase(predict, "_overlay_png", "PNG")
phase(predict, "_cam_tiff", "TIFF")
base = status("VmRSS")
mark("start")
t0 = time.perf_counter()
rc = predict.run(args)
seconds = time.perf_counter() - t0
mark("end")
# a "between" segment before the head is the stem's forward
out, prev = [], None
for name, peak, rss in phases[1:]:
    if name == "between":
        name = {None: "setup (checkpoint, model)",
                "read (tissue box, region)": "stem forward"}.get(prev, "other")
    out.append((name, peak, rss))
    prev = name
print(json.dumps({"rc": rc, "baseline": base, "peak": max(pk for _, pk, _ in phases),
                  "seconds": seconds, "phases": out}))
"""


def saliency_term(stem, h: int, w: int, tile: int, stem_out: float) -> float:
    """The saliency's own memory (see the docstring): the larger of its two
    phases, the head's gradient and the image gradient's bands."""
    from streamcnn._library import memory_info, program_info
    from streamcnn.heatmaps import _default_band_rows, stem_cone
    cone = stem_cone(stem)
    rows = _default_band_rows(cone, w, 3) + cone.receptive_field[0]   # a band and its halo
    band = 4 * 3 * rows * w                   # float32 image band
    band_out = 4 * stem.out_channels * -(-rows // cone.stride[0]) * -(-w // cone.stride[1])
    pool = max(1, math.ceil(max(h, w) / 1024))            # predict's --png-size 1024
    mask = [True] + [False] * program_info(stem.program)[6]  # the image's gradient alone
    bwd, _, strips = memory_info(stem.program, rows, w, (tile, tile), True, mask, 4, True)
    bands = stem_out + 4 * -(-h // pool) * -(-w // pool) + 3 * band + 2 * band_out + \
        bwd + strips
    return max(HEAD_GRAD * stem_out, bands)


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
    ap.add_argument("--heatmap", default="both", choices=["cam", "saliency", "both", "none"],
                    help="predict's --heatmap (default both, as predict's for a classifier)")
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
    gb = 1e9
    terms = {
        "baseline": res["baseline"],
        "model": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "image": 3 * h * w,
        "stem out": 4 * stem.out_channels * oh * ow,
    }
    terms["head"] = HEAD * terms["stem out"]
    from streamcnn.heatmaps import map_cone
    ms = map_cone(stem, model.head).stride
    terms["maps"] = 2 * 4 * -(-h // ms[0]) * -(-w // ms[1])
    terms["tile"] = memory_info(stem.program, h, w, (a.tile, a.tile), True, None, 4, True)[1]
    if a.heatmap in ("saliency", "both"):
        terms["saliency"] = saliency_term(stem, h, w, a.tile, terms["stem out"])
    terms["fixed"] = FIXED
    bound = sum(terms.values())
    print("| region | heatmap | tile px | time s | " + " | ".join(f"{k} GB" for k in terms) +
          " | bound GB | peak RSS GB | peak / bound |")
    print("|---" * (len(terms) + 7) + "|")
    print(f"| {w}x{h} | {a.heatmap} | {a.tile} | {res['seconds']:.0f} | " +
          " | ".join(f"{v / gb:.3f}" for v in terms.values()) +
          f" | {bound / gb:.3f} | {res['peak'] / gb:.3f} | {res['peak'] / bound:.2f} |")
    print()
    print("| phase | peak RSS GB | above baseline GB | RSS at its end GB |")
    print("|---|---|---|---|")
    for name, peak, rss in res["phases"]:
        print(f"| {name} | {peak / gb:.3f} | {(peak - res['baseline']) / gb:.3f} | "
              f"{rss / gb:.3f} |")
    print(f"(slide written in {t_slide:.0f} s; outputs in {out}; rc {res['rc']})")
    sys.exit(0 if res["peak"] <= bound and res["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
