"""``streamcnn train --tile-parallel N``: wall time of a short training run
with N = 1, 2, ... processes sharing each image, on `streamcnn synth` slides.

For each N: the whole command's wall time (process start, data checks,
training, validation, checkpoints), the epochs' own seconds (metrics.csv)
and the largest difference of the final weights from the N = 1 run (float32
rounding: the stem's sums run in another order). On the CPU each process
gets cores / N torch threads (the command's default).

    PYTHONPATH=python STREAMCNN_LIBRARY=build/dev/libstreamcnn.so \\
        python bench/train_tile_parallel.py [--slides 4] [--size 2048] [--image-size 1024] \\
        [--tile 512] [--epochs 2] [--ranks 1 2]
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time


def _cli(*args):
    cmd = [sys.executable, "-m", "streamcnn", *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=4, help="synth slides (a quarter validate)")
    ap.add_argument("--size", type=int, default=2048, help="synth slide edge (level 0)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--stream-upto", default="layer2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    from streamcnn.app.checkpoint import load_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        _cli("synth", data, "--slides", a.slides, "--size", a.size, "--seed", 1, "--quiet")
        with open(os.path.join(data, "train.csv")) as f:
            n_train = sum(1 for _ in f) - 1
        rows, ref = [], None
        for n in a.ranks:
            out = os.path.join(tmp, f"run{n}")
            wall = _cli("train", "--train", os.path.join(data, "train.csv"), "--val",
                        os.path.join(data, "val.csv"), "--out", out, "--image-size",
                        a.image_size, "--mpp", 0.5 * a.size / a.image_size, "--model", a.model,
                        "--stream-upto", a.stream_upto, "--tile-size", a.tile, "--epochs",
                        a.epochs, "--batch-size", 2, "--optimizer", "sgd", "--lr", 0.01,
                        "--device", a.device, "--quiet", "--tile-parallel", n)
            with open(os.path.join(out, "metrics.csv"), newline="") as f:
                secs = [float(r["seconds"]) for r in csv.DictReader(f)]
            w = load_checkpoint(os.path.join(out, "last.pt"))["model"]
            diff = 0.0 if ref is None else max(
                float((w[k].double() - ref[k].double()).abs().max()) for k in ref
                if ref[k].is_floating_point())
            ref = w if ref is None else ref
            rows.append((n, wall, secs, diff))
    print(f"streamcnn train --tile-parallel N: {a.model} streamed to {a.stream_upto}, "
          f"{n_train} training images of {a.image_size}², tile {a.tile}, batch 2, "
          f"{a.epochs} epochs, {a.device}, {os.cpu_count()} cores")
    print("|  N | command wall (s) | epoch seconds (metrics.csv) | max abs weight diff vs N=1 |")
    print("|---:|-----------------:|:----------------------------|---------------------------:|")
    for n, wall, secs, diff in rows:
        print(f"| {n:2d} | {wall:16.1f} | {', '.join(f'{s:.1f}' for s in secs):27s} | "
              f"{diff:26.2e} |")


if __name__ == "__main__":
    main()
