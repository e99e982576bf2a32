#!/usr/bin/env python
"""The paper's experiment on a synthetic set: does resolution help when the
evidence is small?  (Pinckaers et al., TPAMI 2020: CAMELYON17 AUC 0.580 at
4 MP -> 0.706 at 66 MP.)

One synthetic CAMELYON-like set (``streamcnn synth``: tumour clusters of
``--tumour-size`` microns whose texture is invisible 4x coarser and half
visible 2x coarser), then the same model trained from scratch on the same
slides' same tissue area at three pixel sizes (1x, 2x, 4x the slide's
``--mpp``, i.e. ``--size``, ``--size``/2 and ``--size``/4 pixels a side),
for several seeds. Prints, per resolution, the validation AUC (last epoch,
mean and standard deviation over the seeds), seconds per training epoch and
the peak memory of the run (each run in its own process: VmHWM).

    nice python bench/resolution.py [--size 1024] [--slides 40] [--epochs 3]
                                    [--seeds 0 1 2] [--out RESULTS_DIR]

The training loop is the library's API in plain PyTorch: ``SlideDataset``
reads each slide once at the run's pixel size, a streamed stem
(``StreamingModule``) + ``classifier.Head`` (global max pool, as in the
paper), AdamW, cross-entropy, per-image steps; AUC from scikit-learn.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def build(tile: int):
    """The compact model, the same at every resolution: a streamed stem of
    three stride-2 3 x 3 convolutions (8, 16, 32 channels; output stride 8),
    then one 3 x 3 convolution, a global max pool and a linear layer."""
    import torch.nn as nn
    from streamcnn import StreamingModule
    from streamcnn.classifier import GlobalPool, Head, SlideClassifier

    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                         nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
    body = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
    streamed = StreamingModule(stem, tile_size=tile, mean=(200.0, 140.0, 190.0),
                               std=(40.0, 40.0, 40.0))
    return SlideClassifier(streamed, Head(body, GlobalPool("max"), nn.Linear(32, 2)))


def train_one(args) -> dict:
    """One run (in this process): returns its metrics."""
    import torch
    from sklearn.metrics import roc_auc_score
    from streamcnn.app.common import peak_rss_mb
    from streamcnn.data import Augment, SlideDataset

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    size = args.run_size
    read = dict(size=size, mpp=args.run_mpp, crop="tissue")
    t0 = time.time()
    train = SlideDataset(os.path.join(args.data, "train.csv"), **read)
    val = SlideDataset(os.path.join(args.data, "val.csv"), **read)
    # each slide is read once; the epochs reuse the uint8 images
    train_x = [train[i] for i in range(len(train))]
    val_x = [val[i] for i in range(len(val))]
    read_s = time.time() - t0
    model = build(min(size, args.tile))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    aug = Augment(flip=True, rot90=True, brightness=0, contrast=0, saturation=0)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for epoch in range(args.epochs):
        model.train()
        t = time.time()
        total = 0.0
        for k in torch.randperm(len(train_x), generator=g).tolist():
            img, label = train_x[k]
            logits = model(aug(img, g)[None])
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        seconds = time.time() - t
        model.eval()
        with torch.no_grad():
            scores = [torch.softmax(model(img[None]), 1)[0, 1].item() for img, _ in val_x]
        labels = [lab for _, lab in val_x]
        auc = roc_auc_score(labels, scores)
        rows.append({"epoch": epoch + 1, "train_loss": total / len(train_x),
                     "val_auc": auc, "seconds": seconds})
        print(f"  size {size} seed {args.seed} epoch {epoch + 1}: train loss "
              f"{total / len(train_x):.4f}, val AUC {auc:.3f}, {seconds:.1f} s", flush=True)
    return {"size": size, "mpp": args.run_mpp, "seed": args.seed, "epochs": rows,
            "read_seconds": read_s, "peak_rss_mb": peak_rss_mb()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="slide side in level-0 pixels")
    p.add_argument("--mpp", type=float, default=0.5, help="level-0 microns per pixel")
    p.add_argument("--slides", type=int, default=40)
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--tumour-size", type=float, default=80.0)
    p.add_argument("--tissue-fraction", type=float, default=0.5)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--fine", type=float, default=40.0)
    p.add_argument("--coarse", type=float, default=6.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: on a shared 2-core machine one "
                   "thread beats two)")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 2, 1],
                   help="pixel sizes as multiples of --mpp")
    p.add_argument("--data", default=None, help="an existing data set (else one is made)")
    p.add_argument("--out", default="/tmp/streamcnn_resolution", help="folder for data and results")
    # internal: one run
    p.add_argument("--run-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-mpp", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_size is not None:
        print("RESULT " + json.dumps(train_one(args)), flush=True)
        return

    os.makedirs(args.out, exist_ok=True)
    data = args.data or os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "train.csv")):
        t = time.time()
        subprocess.run([sys.executable, "-c", "import sys; from streamcnn.app import synth; "
                        "import argparse; p = argparse.ArgumentParser(); "
                        "synth.add_arguments(p); sys.exit(synth.run(p.parse_args(sys.argv[1:])))",
                        data, "--slides", str(args.slides), "--size", str(args.size),
                        "--mpp", str(args.mpp), "--val-fraction", str(args.val_fraction),
                        "--tumour-size", str(args.tumour_size), "--clusters",
                        str(args.clusters), "--tissue-fraction", str(args.tissue_fraction),
                        "--fine", str(args.fine), "--coarse",
                        str(args.coarse), "--quiet"], check=True)
        print(f"# data set: {args.slides} slides {args.size}x{args.size} at {args.mpp} um/px "
              f"in {time.time() - t:.0f} s -> {data}", flush=True)
    results = []
    for factor in args.factors:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--data", data, "--run-size",
                   str(args.size // factor), "--run-mpp", str(args.mpp * factor), "--seed",
                   str(seed), "--epochs", str(args.epochs), "--lr", str(args.lr), "--tile",
                   str(args.tile), "--threads", str(args.threads)]
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
                for line in proc.stdout:
                    if line.startswith("RESULT "):
                        results.append(json.loads(line[7:]))
                    else:
                        print(line, end="", flush=True)
            if proc.returncode:
                raise SystemExit(f"run {cmd} failed with exit code {proc.returncode}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": results}, f, indent=1)
    import statistics as st
    print(f"\n# resolution experiment: {args.slides} synthetic slides ({args.size}x{args.size} "
          f"px at {args.mpp} um/px), {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'pixels':>10} {'um/px':>6} {'val AUC mean':>12} {'sd':>6} {'per seed':>22} "
          f"{'s/epoch':>8} {'peak MB':>8}")
    for factor in args.factors:
        rs = [r for r in results if r["mpp"] == args.mpp * factor]
        aucs = [r["epochs"][-1]["val_auc"] for r in rs]
        secs = [e["seconds"] for r in rs for e in r["epochs"]]
        sd = st.stdev(aucs) if len(aucs) > 1 else 0.0
        size = args.size // factor
        print(f"{size:>4}x{size:<5} {args.mpp * factor:>6.2f} {st.mean(aucs):>12.3f} "
              f"{sd:>6.3f} {' '.join(f'{a:.3f}' for a in aucs):>22} {st.mean(secs):>8.1f} "
              f"{max(r['peak_rss_mb'] for r in rs):>8.0f}")


if __name__ == "__main__":
    main()
