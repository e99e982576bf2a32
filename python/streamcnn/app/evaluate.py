"""``streamcnn evaluate CHECKPOINT --csv CSV [--out DIR]``: score slides
with a trained model, print the run's validation metric (``--metric``: the
AUC, kappa, accuracy or balanced accuracy of a classifier, Spearman's rho
of a regression) with its bootstrap confidence interval, and write
``DIR/predictions.csv`` (the columns of the run's ``val_predictions.csv``)
and ``DIR/metrics.json``.

The slides are read as the run read its validation set (the checkpoint's
image size, mpp and crop; no augmentation).

While it runs, ``DIR/predictions.partial.csv`` holds the slides scored so
far (rewritten after each, with exact scores and each slide's loss) and
``DIR/evaluate.json`` the settings that make the scores what they are
(the checkpoint's file, ``--amp``, ``--slide-mpp``). A run stopped (Ctrl-C,
SIGTERM, a slide that cannot be read) keeps it, and the same command with
``--resume`` scores only the rows not in it (a row is the same when its
path, label and mpp cell are: rows may be added to the CSV) and prints
what an uninterrupted run prints; other settings are refused, naming
them. At the end the partial file is removed.
"""

import argparse
import csv
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import load_model
from .config import parse_classes
from .common import (AMP_DTYPES, METRIC_WORDS, METRICS, Dist, Slides, Table, UsageError,
                     check_inputs_kept, check_metric, check_settings, checkpoint_identity,
                     default_metric, lock_folder, metric, metric_interval, predict,
                     prediction_rows, read_slide_table, remove_stale_temps, repeated_slides,
                     resolve_device, stop_status, stopped_by, write_atomic, write_csv,
                     write_predictions)

PARTIAL = "predictions.partial.csv"
SETTINGS = "evaluate.json"
# the files evaluate writes into --out (train --overwrite removes them from
# its run folder), and its lock there (beside train's lock on the folder)
OUTPUTS = ("predictions.csv", "metrics.json", SETTINGS, PARTIAL)
LOCK = ".evaluate.lock"


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
    parser.add_argument("--resume", action="store_true",
                        help="keep the slides a stopped run into --out scored "
                             f"(its {PARTIAL}) and score the rest; the same settings "
                             "are required (a folder without an earlier run: starts)")
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
                             else 2, classes=names, read_mpp=cfg["mpp"],
                             image_size=cfg["image_size"], mpp_flag="the run's --mpp",
                             run=True)
    try:
        data = Slides(table, cfg["image_size"], cfg["mpp"], cfg["crop"], slide_mpp=slide_mpp)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    from .predict import SETTINGS as PREDICT_SETTINGS
    if os.path.exists(os.path.join(out, PREDICT_SETTINGS)):
        raise UsageError(f"--out {out} holds the results of streamcnn predict "
                         f"({PREDICT_SETTINGS}, predictions.csv): give evaluate another --out")
    try:
        check_inputs_kept([os.path.join(out, f) for f in OUTPUTS],
                          [("--csv table", args.csv), ("checkpoint", args.checkpoint)] +
                          [("slide", p) for p in table.paths], "evaluate")
    except ValueError as e:
        raise UsageError(str(e).replace("streamcnn: ", "", 1)) from None
    twice = repeated_slides(table.paths)
    if twice:
        print(f"streamcnn: warning: {args.csv}: {twice}: each row is scored, and the metric "
              "counts each", file=sys.stderr)
    settings = _settings(args, slide_mpp)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it: {e.strerror or e}") from None
    lock = lock_folder(out, "evaluate", file=LOCK)
    if lock is not None:
        remove_stale_temps(out, OUTPUTS.__contains__)
    try:
        return _evaluate(args, out, model, cfg, task, kind, names, table, data, device,
                         settings)
    finally:
        if lock is not None:
            os.close(lock)


def _evaluate(args, out: str, model, cfg, task: str, kind: str, names, table: Table,
              data: Slides, device, settings: Dict[str, Any]) -> int:
    """Score ``table`` into ``out`` (its lock held), print the metric."""
    kept = _resumable(out, settings, table) if args.resume else {}
    partial = os.path.join(out, PARTIAL)
    if not kept and os.path.exists(partial):
        os.unlink(partial)              # an earlier run's, of other settings maybe
    write_atomic(os.path.join(out, SETTINGS),
                 (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())
    scored = dict(kept)                 # index -> (score, loss)

    def keep(i: int, score: Any, loss: float) -> None:
        scored[i] = (score, loss)
        _write_partial(partial, table, scored, names)

    if kept:
        _write_partial(partial, table, scored, names)   # the kept rows, in this CSV's terms
    todo = [i for i in range(len(table.paths)) if i not in kept]
    try:
        predict(model, data, device, task, args.amp, workers=args.workers,
                progress=not args.quiet, todo=todo, on_score=keep)
    except (KeyboardInterrupt, RuntimeError, UsageError) as e:
        sig = stopped_by(e)             # Ctrl-C, SIGTERM; else a slide that failed
        if sig is None and not isinstance(e, UsageError):
            raise
        fix = "" if sig is not None else "fix or remove that slide's row, then "
        held = (f"{partial} holds their rows; {fix}continue with --resume" if scored else
                "no slide was scored")
        done = f"after {len(scored)} of {len(table.paths)} slides; {held}"
        if sig is None:
            raise UsageError(f"{e}; stopped {done}") from None
        word, code = stop_status(sig)
        print(f"streamcnn: {word} {done}", file=sys.stderr)
        return code
    try:
        _report(args, out, task, kind, names, table, scored, kept)
    except KeyboardInterrupt as e:      # in the metric's bootstrap, say
        word, code = stop_status(stopped_by(e))
        print(f"streamcnn: {word} after {len(scored)} of {len(table.paths)} slides, in the "
              f"metric; {partial} holds their rows; continue with --resume", file=sys.stderr)
        return code
    if os.path.exists(partial):
        os.unlink(partial)
    return 0


def _report(args, out: str, task: str, kind: str, names, table: Table,
            scored: Dict[int, Tuple[Any, float]], kept: Dict) -> None:
    """The metric of the scored slides (``kept``: those of an earlier run)
    into predictions.csv and metrics.json, and printed."""
    indices = sorted(scored)
    scores = [scored[i][0] for i in indices]
    loss = sum(scored[i][1] for i in indices) / max(1, len(indices))
    if kept and not args.quiet:
        print(f"{len(kept)} of {len(indices)} slides kept from the earlier run",
              file=sys.stderr)
    labels = [table.labels[i] for i in indices]
    value, why = metric(labels, scores, task, kind)
    low = high = math.nan
    no_ci = ""
    want_ci = bool(args.bootstrap) and not math.isnan(value)
    if want_ci:
        low, high, no_ci = metric_interval(labels, scores, task, kind, args.bootstrap,
                                           args.confidence, args.seed)
    path = os.path.join(out, "predictions.csv")
    write_predictions(path, table, indices, scores, names)
    summary = {"metric": kind, "value": _num(value), "ci_low": _num(low),
               "ci_high": _num(high), "confidence": args.confidence,
               # (0 where none ran: no interval asked for, or none possible)
               "resamples": args.bootstrap if not math.isnan(low) else 0,
               "stratified": task == "classification",
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
    n = len(scores)
    print(f"{name} {shown} ({ci}loss {loss:.4f}, {n} slide{'' if n == 1 else 's'})"
          f"{'; ' + why if why else ''}")
    print(f"predictions: {path}")


def _settings(args, slide_mpp: Optional[float]) -> Dict[str, Any]:
    """What makes a slide's score what it is, beside the slide and its CSV
    row: the checkpoint (its file: path, size, modification time; it fixes
    the image size, mpp and crop), the mixed precision and the default
    microns per pixel. --resume needs them equal."""
    return {**checkpoint_identity(args.checkpoint), "amp": args.amp, "slide_mpp": slide_mpp}


def _write_partial(path: str, table: Table, scored: Dict[int, Tuple[Any, float]],
                   names: Optional[List[str]]) -> None:
    """The slides scored so far: predictions.csv's columns with exact
    scores, then each row's ``mpp`` cell and the slide's ``loss``."""
    indices = sorted(scored)
    header, rows = prediction_rows(table, indices, [scored[i][0] for i in indices], names,
                                   exact=True)
    for row, i in zip(rows, indices):
        mpp = table.mpps[i]
        row += ["" if mpp is None else repr(mpp), repr(scored[i][1])]
    write_csv(path, header + ["mpp", "loss"], rows)


def _resumable(out: str, settings: Dict[str, Any], table: Table
               ) -> Dict[int, Tuple[Any, float]]:
    """--resume: (score, loss) by index of ``table`` of the rows an earlier
    run into ``out`` scored (the k-th row naming a path is the k-th of the
    earlier run's rows naming it, when its label and mpp cell are the
    same); {} when there was no earlier run or it ended. Other settings
    than the earlier run's are refused (ValueError naming them)."""
    sfile, pfile = os.path.join(out, SETTINGS), os.path.join(out, PARTIAL)
    if not os.path.exists(pfile):
        return {}
    check_settings(sfile, settings, out, "evaluate")
    by_name: Dict[str, List[Dict[str, str]]] = {}
    try:
        with open(pfile, newline="") as f:
            for r in csv.DictReader(f):
                by_name.setdefault(r.get("path") or "", []).append(r)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--resume: cannot read {pfile}: {e}") from None
    kept: Dict[int, Tuple[Any, float]] = {}
    seen: Dict[str, int] = {}
    for i, name in enumerate(table.names):
        k = seen[name] = seen.get(name, -1) + 1
        rows = by_name.get(name, [])
        if k >= len(rows):
            continue
        r = rows[k]
        try:
            mpp = float(r["mpp"]) if r["mpp"] else None
            if float(r["label"]) != table.labels[i] or mpp != table.mpps[i]:
                continue
            probs = sorted((int(c[5:]), c) for c in r if c.startswith("prob_"))
            score = [float(r[c]) for _, c in probs] if probs else float(r["score"])
            kept[i] = (score, float(r["loss"]))
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"--resume: {pfile} is not what evaluate writes (its row of "
                             f"{name})") from None
    return kept


def _num(v: float):
    """A float for JSON (which has no NaN: null)."""
    return None if math.isnan(v) else float(v)
