"""``streamcnn synth OUT_DIR``: a synthetic CAMELYON-like data set.

Writes N pyramidal slides (Aperio-style ``.svs``: JPEG tiles, MPP in the
ImageDescription), label balanced (half of them with tumour clusters that
only show at full resolution, see :func:`streamcnn.data.synthetic.camelyon_image`),
and::

    OUT_DIR/slide_000.svs ...       the slides
    OUT_DIR/slide_000.json ...      per slide: label, seed, mpp, size and the
                                    tumour clusters ({"x", "y", "radius", "box"},
                                    level-0 pixels; [] for a normal slide)
    OUT_DIR/train.csv, val.csv      path,label (paths relative to the CSV),
                                    both classes in each (stratified split)
    OUT_DIR/synth.json              the options used

Everything is generated in a hidden temporary folder inside OUT_DIR and moved
into place at the end, so a failure or Ctrl-C leaves no partial data set.
"""

import argparse
import csv
import json
import os
import re
import shutil
import tempfile
from typing import List, Tuple

import torch

from ..data import synthetic

MIN_SIZE = 256
MAX_SIZE = 8192
OUTPUTS = ("train.csv", "val.csv", "synth.json")
_SLIDE_FILE = re.compile(r"slide_\d{3,}\.(svs|json)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the slides and CSVs "
                   "(created; must not hold another data set unless --overwrite)")
    p.add_argument("--slides", type=int, default=16, metavar="N",
                   help="number of slides, half with tumour (default 16, at least 4)")
    p.add_argument("--size", type=int, default=2048, metavar="PX",
                   help=f"slide width and height in level-0 pixels ({MIN_SIZE} .. {MAX_SIZE}, "
                   "default 2048)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--mpp", type=float, default=0.5, metavar="UM",
                   help="level-0 microns per pixel (default 0.5, i.e. 20x)")
    p.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                   help="fraction of each class in val.csv (default 0.25; at least one "
                   "slide of each class on each side)")
    p.add_argument("--clusters", type=int, default=3, metavar="K",
                   help="tumour clusters per tumour slide (default 3)")
    p.add_argument("--tumour-size", type=float, default=60.0, metavar="UM",
                   help="diameter of a tumour cluster in microns (default 60)")
    p.add_argument("--fine", type=float, default=40.0, metavar="GREY",
                   help="amplitude of the 1-pixel chromatin texture (default 40)")
    p.add_argument("--coarse", type=float, default=12.0, metavar="GREY",
                   help="amplitude of the 2-pixel chromatin texture, the part a 2x coarser "
                   "read still sees (default 12)")
    p.add_argument("--tissue-fraction", type=float, default=0.35, metavar="F",
                   help="fraction of the slide covered by tissue (default 0.35)")
    p.add_argument("--quality", type=int, default=90, metavar="Q",
                   help="JPEG quality of the tiles (default 90)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a data set already in OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check(args) -> None:
    if args.slides < 4:
        raise ValueError(f"streamcnn: --slides must be at least 4 (two of each class, so that "
                         f"train.csv and val.csv both hold both classes), got {args.slides}")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise ValueError(f"streamcnn: --size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, "
                         f"got {args.size}")
    if not args.mpp > 0:
        raise ValueError(f"streamcnn: --mpp must be positive, got {args.mpp}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"streamcnn: --val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.clusters < 1:
        raise ValueError(f"streamcnn: --clusters must be at least 1, got {args.clusters}")
    diameter = args.tumour_size / args.mpp
    if not 8 <= diameter <= args.size / 2:
        raise ValueError(f"streamcnn: --tumour-size {args.tumour_size:g} um is "
                         f"{diameter:.0f} px at {args.mpp:g} um/px; it must be 8 px .. "
                         f"half of --size ({args.size // 2} px)")
    if args.fine < 0 or args.coarse < 0 or args.fine + args.coarse == 0:
        raise ValueError("streamcnn: --fine and --coarse must be >= 0 and not both 0")
    if not 0.05 <= args.tissue_fraction <= 0.9:
        raise ValueError(f"streamcnn: --tissue-fraction must be in [0.05, 0.9], got "
                         f"{args.tissue_fraction}")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"streamcnn: --quality must be in [1, 100], got {args.quality}")


def _prepare_out_dir(out: str, overwrite: bool) -> bool:
    """Check OUT_DIR; create it if missing. Returns whether it was created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"streamcnn: OUT_DIR {out!r} exists and is not a folder")
    if os.path.isdir(out):
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"streamcnn: OUT_DIR {out!r} is not writable")
        held = [n for n in OUTPUTS if os.path.exists(os.path.join(out, n))]
        if held and not overwrite:
            raise ValueError(f"streamcnn: OUT_DIR {out!r} already holds a data set "
                             f"({', '.join(held)}); use --overwrite to replace it")
        return False
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"streamcnn: the parent folder of OUT_DIR {out!r} does not exist")
    try:
        os.mkdir(out)
    except OSError as e:
        raise ValueError(f"streamcnn: cannot create OUT_DIR {out!r}: {e.strerror}") from None
    return True


def split(labels: List[int], val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Stratified train/val indices: per class ``round(fraction * n)`` slides
    to val, at least one and leaving at least one for train."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == c]
        idx = [idx[k] for k in torch.randperm(len(idx), generator=g).tolist()]
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def _write_csv(path: str, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)


def generate(out: str, args, progress: bool = False) -> dict:
    """Write the data set into the existing folder ``out`` (no checks, no
    temporary folder). Returns the summary written to ``synth.json``."""
    from tqdm import tqdm
    n = args.slides
    labels = [i % 2 for i in range(n)]                 # alternate: balanced, N//2 tumour
    names = [f"slide_{i:03d}" for i in range(n)]
    for i in tqdm(range(n), desc="synth", unit="slide", disable=not progress):
        seed = args.seed * 100_003 + i
        boxes = synthetic.make_camelyon_slide(
            os.path.join(out, names[i] + ".svs"), args.size, tumour=bool(labels[i]),
            seed=seed, mpp=args.mpp, quality=args.quality, clusters=args.clusters,
            cluster_um=args.tumour_size, fine=args.fine, coarse=args.coarse,
            tissue_fraction=args.tissue_fraction)
        with open(os.path.join(out, names[i] + ".json"), "w") as f:
            json.dump({"slide": names[i] + ".svs", "label": labels[i], "seed": seed,
                       "mpp": args.mpp, "width": args.size, "height": args.size,
                       "clusters": boxes}, f, indent=1)
    train, val = split(labels, args.val_fraction, args.seed)
    _write_csv(os.path.join(out, "train.csv"), [(names[i] + ".svs", labels[i]) for i in train])
    _write_csv(os.path.join(out, "val.csv"), [(names[i] + ".svs", labels[i]) for i in val])
    summary = {k: getattr(args, k) for k in ("slides", "size", "seed", "mpp", "val_fraction",
                                             "clusters", "tumour_size", "fine", "coarse",
                                             "tissue_fraction", "quality")}
    summary.update(train=len(train), val=len(val), tumour=sum(labels))
    with open(os.path.join(out, "synth.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def run(args) -> int:
    _check(args)
    out = args.out_dir
    created = _prepare_out_dir(out, args.overwrite)
    tmp = None
    try:
        try:
            tmp = tempfile.mkdtemp(prefix=".synth-", dir=out)
        except OSError as e:
            raise ValueError(f"streamcnn: cannot write into OUT_DIR {out!r}: {e.strerror}") \
                from None
        summary = generate(tmp, args, progress=not getattr(args, "quiet", False))
        # move into place: slides and sidecars first, the CSVs (the data set's entry) last
        names = sorted(os.listdir(tmp), key=lambda n: (n in OUTPUTS, n))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        if args.overwrite:                 # slides of a larger earlier set
            keep = set(names)
            for name in os.listdir(out):
                if _SLIDE_FILE.fullmatch(name) and name not in keep:
                    os.remove(os.path.join(out, name))
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    os.rmdir(tmp)
    if not getattr(args, "quiet", False):
        print(f"wrote {summary['slides']} slides ({summary['tumour']} with tumour, "
              f"{args.size}x{args.size} px at {args.mpp:g} um/px) to {out}: "
              f"train.csv ({summary['train']}), val.csv ({summary['val']})")
    return 0
