"""``streamcnn evaluate CHECKPOINT --csv CSV [--out DIR]``: score slides
with a trained model, print the run's validation metric (``--metric``: the
AUC, kappa, accuracy or balanced accuracy of a classifier, Spearman's rho
of a regression) with its bootstrap confidence interval, and write
``DIR/predictions.csv`` (the columns of the run's ``val_predictions.csv``)
and ``DIR/metrics.json``.

The slides are read as the run read its validation set (the checkpoint's
image size, mpp and crop; no augmentation).
"""

import argparse
import json
import math
import os

import torch

from .checkpoint import load_model
from .config import parse_classes
from .common import (AMP_DTYPES, METRIC_WORDS, METRICS, Dist, Slides, UsageError,
                     check_metric, default_metric, metric, metric_interval, predict,
                     read_slide_table, resolve_device, write_atomic, write_predictions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt of a run")
    parser.add_argument("--csv", required=True, metavar="CSV",
                        help="slides to score: CSV with path,label")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for predictions.csv (default: the checkpoint's)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                        help="mixed precision of the forward (default off)")
    parser.add_argument("--slide-mpp", type=float, metavar="UM",
                        help="microns per level-0 pixel of slides whose file carries none "
                             "(default: the run's --slide-mpp); an mpp column of the CSV "
                             "gives it per slide")
    parser.add_argument("--metric", choices=METRICS,
                        help="the metric printed (default: the run's --metric)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="resamples of the slides for the metric's confidence interval "
                             "(default 2000; stratified by label for a classifier; 0: none)")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="C",
                        help="the interval's confidence level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the bootstrap's resampling (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.workers < 0:
        raise UsageError(f"--workers must be non-negative, got {args.workers}")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be non-negative, got {args.bootstrap}")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.slide_mpp is not None and not (math.isfinite(args.slide_mpp) and
                                           args.slide_mpp > 0):
        raise UsageError(f"--slide-mpp must be positive, got {args.slide_mpp}")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            Dist())
    try:
        model, cfg = load_model(args.checkpoint, device)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    task = cfg["task"]
    kind = args.metric or cfg.get("metric") or default_metric(task)
    check_metric(kind, task, f"a {task} model")
    slide_mpp = args.slide_mpp if args.slide_mpp is not None else cfg.get("slide_mpp")
    names = parse_classes(cfg.get("classes"))
    table = read_slide_table(args.csv, task, "--csv", slide_mpp=slide_mpp,
                             num_classes=int(cfg["num_outputs"]) if task == "classification"
                             else 2, classes=names)
    try:
        data = Slides(table, cfg["image_size"], cfg["mpp"], cfg["crop"], slide_mpp=slide_mpp)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    indices, scores, loss = predict(model, data, device, task, args.amp, workers=args.workers,
                                    progress=not args.quiet)
    labels = [table.labels[i] for i in indices]
    value, why = metric(labels, scores, task, kind)
    low = high = math.nan
    no_ci = ""
    want_ci = bool(args.bootstrap) and not math.isnan(value)
    if want_ci:
        low, high, no_ci = metric_interval(labels, scores, task, kind, args.bootstrap,
                                           args.confidence, args.seed)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "predictions.csv")
    write_predictions(path, table, indices, scores, names)
    summary = {"metric": kind, "value": _num(value), "ci_low": _num(low),
               "ci_high": _num(high), "confidence": args.confidence,
               "resamples": args.bootstrap, "stratified": task == "classification",
               "loss": _num(loss), "slides": len(scores), "undefined": why or None,
               "no_interval": no_ci or None,
               "checkpoint": os.path.abspath(args.checkpoint),
               "csv": os.path.abspath(args.csv)}
    write_atomic(os.path.join(out, "metrics.json"),
                 (json.dumps(summary, indent=2) + "\n").encode())
    name = METRIC_WORDS[kind]
    shown = "nan" if math.isnan(value) else f"{value:.4f}"
    ci = ""
    if want_ci:
        level = f"{100 * args.confidence:g}% CI"
        ci = f"no {level}: {no_ci.split(': ')[0]}; " if math.isnan(low) else \
            (f"{level} {low:.4f}-{high:.4f}, {args.bootstrap}"
             f"{' stratified' if task == 'classification' else ''} bootstrap resamples; ")
    print(f"{name} {shown} ({ci}loss {loss:.4f}, {len(scores)} slides)"
          f"{'; ' + why if why else ''}")
    print(f"predictions: {path}")
    return 0


def _num(v: float):
    """A float for JSON (which has no NaN: null)."""
    return None if math.isnan(v) else float(v)
