"""What the subcommands share: the user-error type, slide tables checked row
by row, the per-process distributed context, metrics, predictions and the
run folder's small files (written atomically)."""

import collections
import contextlib
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .._library import first_line

class UsageError(Exception):
    """An error the user caused (a bad file, option or value): the command
    line prints ``streamcnn: <message>`` on one line and exits with 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job, ``kill``), raised in the
    main thread while the command line runs: the command ends as on Ctrl-C
    (``train`` says what ``last.pt`` holds), with exit status 143."""


# the signals (SIGINT, SIGTERM) that asked this command to stop, in order
# (the command line's handlers add them; see check_stop)
_STOPS: List[int] = []


def request_stop(signum: int) -> None:
    """Record that ``signum`` asked this process to stop."""
    _STOPS.append(signum)


def stop_signalled(signum: int) -> None:
    """:func:`request_stop` from a handler of SIGINT / SIGTERM. A DataLoader
    worker the same signal killed is then no error of its own (torch's
    SIGCHLD handler would raise one, maybe while this stop is being
    handled): SIGCHLD gets a handler that does nothing (not SIG_DFL: a
    SIGCHLD already pending would be "ignored due to race condition", an
    OSError)."""
    import signal
    request_stop(signum)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)


def clear_stops() -> None:
    """Forget the stops recorded so far: a command that begins (a second
    ``streamcnn.cli.main`` in one process) was asked for none yet."""
    _STOPS.clear()


def stop_requested() -> Optional[int]:
    """The last signal that asked this process to stop, or None."""
    return _STOPS[-1] if _STOPS else None


@contextlib.contextmanager
def stops_deferred():
    """SIGINT and SIGTERM held back while the block runs, then raised as the
    command line's handlers raise them (:class:`Terminated`, KeyboardInterrupt):
    a block that writes several files (train's end of an epoch: last.pt,
    best.pt, the metrics, the plots) writes all of them or, stopped before
    it began, none. A no-op outside the main thread, and for a signal the
    process ignores."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: List[int] = []

    def hold(signum, frame):
        stop_signalled(signum)
        got.append(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(sig)
        if h is not None and h != signal.SIG_IGN:
            old[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if got:
        check_stop()        # the stop, as the handlers would have raised it


def check_stop() -> None:
    """Raise the stop a signal asked for, if any (:class:`Terminated` for
    SIGTERM, KeyboardInterrupt for SIGINT). The handlers raise it at once,
    but Python drops an exception raised where it cannot propagate (an
    at-fork or finalizer callback: "Exception ignored in ..."); the loops
    of the commands call this at each step, so no stop is lost."""
    if _STOPS:
        import signal
        raise Terminated() if _STOPS[-1] == signal.SIGTERM else KeyboardInterrupt()


def stop_status(sig: int) -> Tuple[str, int]:
    """What a command stopped by ``sig`` says and its exit status:
    ("terminated", 143) for SIGTERM, ("interrupted", 130) for SIGINT."""
    import signal
    return ("terminated", 143) if sig == signal.SIGTERM else ("interrupted", 130)


def stopped_by(e: BaseException) -> Optional[int]:
    """The signal ``e`` stands for: SIGTERM for :class:`Terminated` and a
    DataLoader worker :func:`killed_by_sigterm`, SIGINT for Ctrl-C; for an
    error raised out of the code a stop interrupted (torch.save's writer
    turns the exception into a RuntimeError) the signal that asked for it;
    None for an error that is no stop."""
    import signal
    if isinstance(e, Terminated) or killed_by_sigterm(e):
        return signal.SIGTERM
    if isinstance(e, KeyboardInterrupt):
        return stop_requested() or signal.SIGINT
    return stop_requested() if isinstance(e, Exception) else None


class RunFolderBusy(UsageError):
    """Another process trains into the run folder, or predicts into the
    output folder (it holds the folder's lock, :func:`lock_folder`):
    refused before anything is written."""


class SlideError(UsageError):
    """A slide that passed the checks before the run but fails when read
    (a damaged tile, a file removed or truncated since): the run stops with
    this one line and exit 2, its checkpoints kept."""

    def __init__(self, msg: str):
        # a DataLoader worker's exception comes back as SlideError("Caught
        # SlideError in DataLoader worker process 0.\nOriginal Traceback
        # ...\nstreamcnn.app.common.SlideError: <message>"): keep the message
        marker = "SlideError: "
        if msg.startswith("Caught ") and marker in msg:
            msg = msg.rsplit(marker, 1)[1].strip()
        super().__init__(msg)


TASKS = ("classification", "regression")
# validation metrics: classification's, then regression's
# a slide may be read at an mpp finer than its own by this fraction (scanners
# of one magnification differ by a few percent: 0.2525 and 0.25 um/px)
MPP_TOLERANCE = 0.05

METRICS = ("auc", "kappa", "accuracy", "balanced_accuracy", "spearman")
# as evaluate prints them (one word each)
METRIC_WORDS = {"auc": "AUC", "kappa": "kappa", "accuracy": "accuracy",
                "balanced_accuracy": "balanced_accuracy", "spearman": "Spearman"}


# -- slide tables --------------------------------------------------------------------------
@dataclass
class Table:
    """A ``path,label`` CSV checked row by row: ``paths`` resolved (relative
    to the CSV's folder), ``names`` as written in the CSV, ``labels`` as
    numbers (0 .. K-1 for classification, floats for regression), ``mpps`` the
    optional ``mpp`` column (microns per level-0 pixel; None where empty),
    ``lines`` each row's line in the CSV (where it was read from one)."""
    csv: str
    paths: List[str]
    names: List[str]
    labels: List[float]
    mpps: List[Optional[float]]
    lines: Optional[List[int]] = None


def read_slide_table(path: str, task: str, what: str = "CSV", mpp: bool = True,
                     slide_mpp: Optional[float] = None, num_classes: int = 2,
                     classes: Optional[Sequence[str]] = None,
                     read_mpp: Optional[float] = None, image_size: Optional[int] = None,
                     mpp_flag: str = "--mpp", run: bool = False) -> Table:
    """Read and check a slide table: the file, its header, every row's slide
    (exists, opens as a slide or an image, carries microns per pixel when
    ``mpp``: its ``mpp`` column, the file's own, or ``slide_mpp``), its
    ``mpp`` (empty or positive) and label (0 .. num_classes - 1, or one of
    the names ``classes``, for classification, a finite number for
    regression); with ``read_mpp`` (the microns per pixel the slides are
    read at, the option ``mpp_flag``), that each slide read so gives an
    image (:func:`read_scale_problem`, of ``image_size`` x ``image_size``
    images). A slide listed twice with different labels is refused. ``run``:
    the table is scored with a trained run's classes (evaluate). Any
    problem raises :class:`UsageError` naming the file, the line and the
    value."""
    from ..data.dataset import _row_mpp, row_path
    from ..slide import Slide
    base, rows = read_table(path, what, ("path", "label"))
    paths, names, labels, mpps, lines = [], [], [], [], []
    for line, row in rows:
        name, label = row.get("path", ""), row.get("label", "")
        where = f"{what} {path} line {line}"
        full = _usage(row_path, base, row, where)
        if not os.path.exists(full):
            hint = ""
            if not os.path.isabs(name):     # the likeliest mistake: paths from the shell's folder
                hint = (f" (a relative path is read from the table's folder "
                        f"{os.path.abspath(base or '.')}"
                        + (f"; {name} is there from the working directory)"
                           if os.path.exists(name) else ")"))
            raise UsageError(f"{where}: slide {full} does not exist{hint}")
        row_mpp = _usage(_row_mpp, row.get("mpp", ""), where)
        try:
            with Slide(full, mpp=row_mpp, default_mpp=slide_mpp) as s:
                if mpp and s.mpp is None:
                    raise UsageError(f"{where}: slide {full} has no microns-per-pixel "
                                     "metadata (openslide.mpp-x): give it with --slide-mpp "
                                     "or in an mpp column")
                why = (read_scale_problem(s, read_mpp, image_size, row_mpp, mpp_flag)
                       if read_mpp is not None and s.mpp is not None else "")
                if not why and read_mpp is not None and s.mpp is not None:
                    try:
                        s.downsample_for_mpp(read_mpp)  # pixels that are not square
                    except ValueError as e:
                        why = _strip(str(e))
                    fix = (f"the run reads slides at {read_mpp:g} um/px; leave it out"
                           if run else f"use {mpp_flag} {s.mpp[0]:g} or coarser, or leave "
                           "it out")
                    why = why or upsampling_problem(s, read_mpp, fix, row_mpp)
                if why:
                    raise UsageError(f"{where}: {why}")
        except UsageError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"{where}: {full} is not a readable slide: "
                             f"{_strip(str(e))}") from None
        labels.append(_label(label, task, where, num_classes, classes, run))
        paths.append(full)
        names.append(name)
        mpps.append(row_mpp)
        lines.append(line)
    if not paths:
        raise UsageError(f"{what} {path} has no rows")
    table = Table(path, paths, names, labels, mpps, lines)
    check_labels_agree(table, what, classes if task == "classification" else None)
    return table


def check_labels_agree(t: Table, what: str = "",
                       classes: Optional[Sequence[str]] = None) -> None:
    """A slide (by its real path) listed twice with different labels is
    refused: a metric would count it as both. The message names the table
    (``what``: how the command calls it), the two rows' lines where ``t``
    has them, and the labels by their ``classes`` where given."""
    def shown(v: float) -> str:
        return classes[int(v)] if classes else f"{v:g}"
    first: Dict[str, Tuple[float, int]] = {}       # real path -> (label, row)
    for k, (path, label) in enumerate(zip(t.paths, t.labels)):
        was, at = first.setdefault(os.path.realpath(path), (label, k))
        if was != label:
            where = f"{what} {t.csv}".strip() + (f" line {t.lines[k]}" if t.lines else "")
            earlier = f" (line {t.lines[at]})" if t.lines else ""
            raise UsageError(f"{where}: slide {path} is listed with labels {shown(was)}"
                             f"{earlier} and {shown(label)}")


def repeated_slides(paths: Sequence[str]) -> str:
    """'' or what to say of slides ``paths`` names more than once (by the
    file they are: through other paths or links too): the first, its count
    and how many more."""
    counts = collections.Counter(os.path.realpath(p) for p in paths)
    twice = [(p, n) for p, n in counts.items() if n > 1]
    if not twice:
        return ""
    p, n = twice[0]
    more = f" (and {len(twice) - 1} more slides listed more than once)" if len(twice) > 1 else ""
    return f"slide {p} is listed {n} times{more}"


def read_scale_problem(s, mpp: float, size: Optional[int] = None,
                       cell: Optional[float] = None, flag: str = "--mpp",
                       slide_flag: str = "--slide-mpp") -> str:
    """Why the slide ``s`` (a ``streamcnn.slide.Slide`` whose ``s.mpp`` is
    known) cannot be read at ``mpp`` microns per pixel (the option
    ``flag``), or '' when it can: the whole slide would be less than one
    pixel wide or high (a huge ``--mpp``, or a tiny slide mpp: the reader
    would fail on a span of 0 pixels), or, of ``size`` x ``size`` images,
    the whole image would lie within one pixel of the slide (a tiny
    ``--mpp``, or a huge slide mpp: the image would hold no detail of the
    slide, at worst a downsample of 0). Where the slide's mpp comes from is
    said: the table row's mpp ``cell``, the file, or ``slide_flag``."""
    sx, sy = s.mpp
    w0, h0 = s.dimensions
    said = _mpp_source(s, cell, slide_flag)
    um = f"{sx:g}" if sx == sy else f"{sx:g} x {sy:g}"
    ew, eh = w0 * sx / mpp, h0 * sy / mpp
    if ew < 1 or eh < 1:
        return (f"{flag} {mpp:g} would read slide {s.path} as {ew:.3g} x {eh:.3g} pixels, "
                f"less than one ({w0} x {h0} pixels of {um} um, as {said} says)")
    if size is not None:
        fw, fh = size * mpp / sx, size * mpp / sy
        if fw < 1 or fh < 1:
            return (f"{flag} {mpp:g} would make the {size} x {size} image of slide {s.path} "
                    f"from {fw:.3g} x {fh:.3g} of its pixels, less than one (of {um} um, as "
                    f"{said} says)")
    return ""


def _mpp_source(s, cell: Optional[float], slide_flag: str) -> str:
    """Where the slide ``s``'s microns per pixel come from, as a message
    says it: its table row's mpp ``cell``, the file, or ``slide_flag``."""
    return "its mpp cell" if cell is not None else "the file" if s.file_mpp else slide_flag


def upsampling_problem(s, mpp: float, fix: str, cell: Optional[float] = None,
                       slide_flag: str = "--slide-mpp") -> str:
    """Why the slide ``s`` (its ``s.mpp`` known) cannot be read at ``mpp``
    microns per pixel: finer than its level 0 by more than MPP_TOLERANCE,
    it would be upsampled, its pixels made up (a 20x slide in a 40x run);
    '' when it can. ``fix`` says what to do; where the slide's mpp comes
    from is said (a wrong ``--slide-mpp`` is a likely cause)."""
    have = s.mpp[0]
    if mpp >= have * (1 - MPP_TOLERANCE):
        return ""
    return (f"slide {s.path} has {have:g} um/px at its finest level (as "
            f"{_mpp_source(s, cell, slide_flag)} says); it cannot provide {mpp:g} um/px "
            f"without upsampling: {fix}")


def read_table(path: str, what: str, columns: Sequence[str]
               ) -> Tuple[str, List[Tuple[int, Dict[str, str]]]]:
    """``data.dataset.read_csv`` of a table the user named with ``what``
    (``--train CSV``): a missing, unreadable or malformed file raises
    :class:`UsageError` naming ``what`` and the file."""
    if not path:
        raise UsageError(f"no {what} given")
    from ..data.dataset import read_csv
    try:
        return read_csv(path, columns, what)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(_strip(str(e))) from None


def _usage(fn, *args):
    """``fn(*args)``, the library's ValueError of a bad table cell raised as
    a :class:`UsageError` (one line, exit 2)."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(_strip(str(e))) from None


def _label(text: str, task: str, where: str, num_classes: int = 2,
           classes: Optional[Sequence[str]] = None, run: bool = False) -> float:
    """A row's label as a number (see :func:`read_slide_table`); ``run``:
    the classes are a trained run's (evaluate), not options to give."""
    if task == "classification":
        if classes is not None and text in classes:
            return float(list(classes).index(text))
        index = _class_index(text)
        if index is None or index >= num_classes:
            if classes is not None:
                raise UsageError(f"{where}: label {text!r} is not one of {', '.join(classes)} "
                                 f"(--classes) or 0 .. {num_classes - 1}")
            hint = "" if is_number(text) else (
                "; the run named no classes (train --classes), so its labels are the class "
                "indices" if run else "; named classes: give --classes")
            if num_classes == 2:
                raise UsageError(f"{where}: label {text!r} is not 0 or 1 (task "
                                 f"classification{hint})")
            raise UsageError(f"{where}: label {text!r} is not an integer in 0 .. "
                             f"{num_classes - 1} (task classification, --num-classes "
                             f"{num_classes}{hint})")
        return float(index)
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UsageError(f"{where}: label {text!r} is not a number (task regression)")
    return v


def _class_index(text: str) -> Optional[int]:
    """A class index written as digits, or as an integral float (``1.0``:
    what pandas writes for a float column); None for anything else."""
    whole, dot, frac = text.partition(".")
    if whole.isdigit() and whole.isascii() and (not dot or frac and set(frac) == {"0"}):
        return int(whole)
    return None


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _strip(msg: str) -> str:
    return msg[len("streamcnn: "):] if msg.startswith("streamcnn: ") else msg


class Slides(torch.utils.data.Dataset):
    """``(uint8 3 x S x S, label, index)`` of a checked :class:`Table`, read
    by :class:`streamcnn.data.SlideDataset` (whose labels are not used: a
    regression label is a float).

    ``rows = ((a, b), (s0, s1))``: a tile-parallel rank's share of each
    image instead (``app.tile_parallel.RowPlan``): the image is
    ``SlideDataset.read_rows(i, (a, b), (s0, s1))``, a dict of the rows
    (flipped and turned, not yet colour-jittered), the draw and the
    channel sums of rows ``[s0, s1)``."""

    def __init__(self, table: Table, size: int, mpp: float, crop: str,
                 augment: bool = False, seed: Optional[int] = None,
                 rows: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None,
                 slide_mpp: Optional[float] = None):
        from ..data import SlideDataset
        self.table = table
        self.rows = rows
        self.ds = SlideDataset([(p, 0, m) for p, m in zip(table.paths, table.mpps)], size,
                               mpp=mpp, crop=crop, augment=augment, seed=seed,
                               slide_mpp=slide_mpp)

    def __len__(self) -> int:
        return len(self.table.paths)

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __getitem__(self, i: int):
        try:
            if self.rows is not None:
                img = self.ds.read_rows(i, *self.rows)
            else:
                img, _ = self.ds[i]
        except (RuntimeError, ValueError, OSError, MemoryError) as e:
            # the reader's own errors (OpenSlide failing on a tile, a
            # truncated image, pixels that do not fit in memory) and a file
            # gone; anything else is a bug
            if not (str(e).strip().startswith("streamcnn: ") or isinstance(e, OSError)):
                raise
            raise SlideError(f"slide {self.table.paths[i]} (of {self.table.csv}) cannot be "
                             f"read: {_strip(first_line(e, None))}") from None
        return img, torch.tensor(self.table.labels[i], dtype=torch.float32), i


def to_device(img, device: torch.device):
    """An image batch (a tensor, or the dict of a rows read) on ``device``."""
    if isinstance(img, dict):
        return {k: v.to(device, non_blocking=True) for k, v in img.items()}
    return img.to(device, non_blocking=True)


# -- distributed context ------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 otherwise);
    with ``group`` its place in that process group (``barrier`` and
    ``gather`` over it), e.g. the data-parallel ranks of a tile-parallel
    run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.group)

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def all_true(self, flag: bool) -> bool:
        return all(self.gather(bool(flag)))


def dist_from_env() -> Dist:
    """The ranks ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


# set once this process has destroyed a process group (train's end)
_GROUP_ENDED = False


def group_ended() -> None:
    """Record that this process destroyed its process group: the command
    line then ends it with :func:`end_process`."""
    global _GROUP_ENDED
    _GROUP_ENDED = True


def ends_without_finalization() -> bool:
    """Whether this process destroyed a process group (see
    :func:`group_ended`)."""
    return _GROUP_ENDED


def end_process(code: int) -> None:
    """End a process that ran collectives (its process group destroyed)
    without the interpreter's finalization: gloo threads torn down there
    ended finished ranks with SIGABRT ('terminate called without an active
    exception') now and then, which torchrun, or the parent of spawned
    ranks, reports as a failed run. Everything a run writes is written and
    closed before it returns. Python's exit handlers still run here
    (multiprocessing's finalizers: the semaphore of tqdm's lock is released,
    else the resource tracker warned of 'leaked semaphore objects'); then
    the streams are flushed."""
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_distributed(dist: Dist, device: torch.device, backend: Optional[str] = None) -> None:
    """The process group: ``backend``, else NCCL for CUDA devices and gloo
    for the CPU; every collective waits at most ``STREAMCNN_DIST_TIMEOUT``
    seconds."""
    if dist.enabled and not torch.distributed.is_initialized():
        from .tile_parallel import dist_timeout
        torch.distributed.init_process_group(
            backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=dist_timeout())


def resolve_device(name: str, dist: Optional[Dist] = None) -> torch.device:
    """``--device``: cpu, cuda (this process's device under torchrun: its
    local rank's) or cuda:N; UsageError naming why not (not a device, no
    CUDA device, an index beyond the devices)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: not cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", (dist.local_rank if dist is not None else 0) % count)
    if dev.index >= count:
        raise UsageError(f"--device {name}: there are {count} CUDA devices (cuda:0 ..)")
    return dev


# -- scores and metrics -------------------------------------------------------------------
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_of(out: torch.Tensor, label: torch.Tensor, task: str,
            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy on the class logits (each image's times ``weights`` of
    its class), or MSE of one output (float32)."""
    out = out.float()
    if task == "classification":
        label = label.long()
        if weights is None:
            return torch.nn.functional.cross_entropy(out, label)
        # per image, not torch's weighted mean (which divides by the batch's
        # weights: an image alone would get weight 1)
        ce = torch.nn.functional.cross_entropy(out, label, reduction="none")
        return (weights.to(ce.device)[label] * ce).mean()
    return torch.nn.functional.mse_loss(out[:, 0], label.float())


def class_weights(text: str, labels: Sequence[float], num_classes: int
                  ) -> Optional[torch.Tensor]:
    """The ``--class-weights`` of a run: None, the given weights, or
    ``balanced``: ``n / (K n_c)`` of the training labels (scikit-learn's
    ``compute_class_weight``); a class without a training slide cannot be
    balanced."""
    from .config import parse_class_weights
    given = parse_class_weights(text, num_classes)
    if given is not None:
        return torch.tensor(given, dtype=torch.float32)
    if text != "balanced":
        return None
    counts = [sum(int(v) == c for v in labels) for c in range(num_classes)]
    missing = [c for c, n in enumerate(counts) if n == 0]
    if missing:
        raise UsageError(f"--class-weights balanced: the training set has no slide of "
                         f"class(es) {', '.join(map(str, missing))}")
    return torch.tensor([len(labels) / (num_classes * n) for n in counts],
                        dtype=torch.float32)


def score_of(out: torch.Tensor, task: str) -> torch.Tensor:
    """The per-image score: P(class 1) of two classes, the K class
    probabilities (``N x K``) of more, or the regression output."""
    out = out.float()
    if task == "classification":
        p = out.softmax(dim=1)
        return p[:, 1] if p.shape[1] == 2 else p
    return out[:, 0]


def _flat(scores) -> List[float]:
    return [v for s in scores for v in (s if isinstance(s, (list, tuple)) else [s])]


def default_metric(task: str) -> str:
    return "auc" if task == "classification" else "spearman"


def check_metric(kind: str, task: str, of: str) -> None:
    """Refuse a metric of the other task (Spearman is regression's alone);
    ``of`` ends the message: ``"--task classification"``, ``"a regression
    model"``."""
    if (kind == "spearman") != (task == "regression"):
        have = "spearman" if task == "regression" else ", ".join(METRICS[:-1])
        raise UsageError(f"--metric {kind} is not a metric of {of} ({have})")


def metric_name(task: str, kind: Optional[str] = None) -> str:
    """The metrics.csv column: ``val_auc``, ``val_kappa``, ..."""
    return "val_" + (kind or default_metric(task))


def predicted_classes(scores: Sequence) -> List[int]:
    """The most probable class of each score (P(class 1) of two classes,
    or the class probabilities)."""
    return [max(range(len(s)), key=s.__getitem__) if isinstance(s, (list, tuple))
            else int(s >= 0.5) for s in scores]


def metric(labels: Sequence[float], scores: Sequence, task: str,
           kind: Optional[str] = None) -> Tuple[float, str]:
    """``(value, why_undefined)`` of ``kind`` (default: ``auc`` for
    classification, ``spearman`` for regression): ROC AUC (scikit-learn;
    of more than two classes, whose scores are the class probabilities, the
    macro average of the one-vs-rest AUCs), ``kappa`` (quadratic weighted
    Cohen's kappa of the predicted classes), ``accuracy``,
    ``balanced_accuracy`` or Spearman's rho (scipy); NaN with the reason
    when it is undefined (a class missing, constant labels or scores)."""
    kind = kind or default_metric(task)
    if not all(math.isfinite(v) for v in _flat(scores)):
        return math.nan, "some scores are not finite: the metric is undefined"
    if task == "classification" and kind != "auc":
        from sklearn import metrics as skm
        y, pred = [int(v) for v in labels], predicted_classes(scores)
        if kind == "accuracy":
            return float(skm.accuracy_score(y, pred)), ""
        if kind == "balanced_accuracy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # a predicted class with no slide
                return float(skm.balanced_accuracy_score(y, pred)), ""
        k = len(scores[0]) if scores and isinstance(scores[0], (list, tuple)) else 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = float(skm.cohen_kappa_score(y, pred, weights="quadratic",
                                            labels=list(range(k))))
        if not math.isfinite(v):
            return math.nan, ("every label and prediction is the same class: the quadratic "
                              "weighted kappa is undefined")
        return v, ""
    if task == "classification":
        classes = sorted(set(int(v) for v in labels))
        if len(classes) < 2:
            return math.nan, (f"the validation set has a single class (every label is "
                              f"{classes[0] if classes else '-'}): AUC is undefined")
        from sklearn.metrics import roc_auc_score
        if scores and isinstance(scores[0], (list, tuple)):
            k = len(scores[0])
            missing = sorted(set(range(k)) - set(classes))
            if missing:
                return math.nan, (f"the validation set has no slide of class(es) "
                                  f"{', '.join(map(str, missing))}: the macro one-vs-rest "
                                  "AUC is undefined")
            return float(roc_auc_score([int(v) for v in labels], scores, multi_class="ovr",
                                       average="macro", labels=list(range(k)))), ""
        return float(roc_auc_score(labels, scores)), ""
    if len(set(labels)) < 2:
        return math.nan, "the validation labels are all equal: Spearman is undefined"
    if len(set(scores)) < 2:
        return math.nan, "the model's scores are all equal: Spearman is undefined"
    from scipy.stats import spearmanr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(labels, scores).statistic
    return float(rho), ""


def metric_interval(labels: Sequence[float], scores: Sequence, task: str,
                    kind: Optional[str] = None, resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0) -> Tuple[float, float, str]:
    """``(low, high, why_undefined)``: the ``confidence`` percentile
    interval of :func:`metric` over ``resamples`` bootstrap resamples of the
    slides (``scipy.stats.bootstrap``). For classification the resampling is
    stratified by label, as pROC's ``ci.auc`` does: each resample keeps
    every class's number of slides, so a metric defined on the slides is
    defined on every resample. NaNs with the reason when there is no
    interval: the metric is undefined on the slides or on some resample (a
    regression's resample with constant labels or scores), or a class (or a
    regression's set) has a single slide, which every resample would repeat."""
    import numpy as np
    from scipy.stats import bootstrap
    value, why = metric(labels, scores, task, kind)
    if math.isnan(value):
        return math.nan, math.nan, why
    n = len(labels)
    if task == "classification":
        classes = sorted(set(int(v) for v in labels))
        strata = [np.array([i for i in range(n) if int(labels[i]) == c]) for c in classes]
        single = [c for c, a in zip(classes, strata) if len(a) < 2]
        if single:
            return math.nan, math.nan, (f"class(es) {', '.join(map(str, single))} have a "
                                        "single slide: no bootstrap interval")
    else:
        strata = [np.arange(n)]
        if n < 2:
            return math.nan, math.nan, "a single slide: no bootstrap interval"

    def statistic(*parts):
        idx = [int(i) for a in parts for i in a]
        return metric([labels[i] for i in idx], [scores[i] for i in idx], task, kind)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a degenerate distribution (e.g. AUC 1 always)
        res = bootstrap(strata, statistic, n_resamples=resamples, vectorized=False,
                        paired=False, confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
    if not np.isfinite(np.asarray(res.bootstrap_distribution, dtype=np.float64)).all():
        return math.nan, math.nan, ("the metric is undefined on some resamples (constant "
                                    "labels or scores): no bootstrap interval")
    return float(res.confidence_interval.low), float(res.confidence_interval.high), ""


_QUIET_FORKS = False       # workers_ignore_sigint's hook registered


def workers_ignore_sigint() -> None:
    """Every process this one forks from now on (its DataLoader workers)
    ignores SIGINT. A Ctrl-C reaches every process of the terminal's
    group: a worker ran the command's handler, inherited with the fork
    (under ``--tile-parallel`` the rank's, which reads a value shared with
    the other processes). A worker ends when its command stops the
    DataLoader, or within seconds of its parent's end (torch's watchdog);
    SIGTERM is :func:`worker_exits_on_sigterm`'s. A SIGINT that reaches
    the worker before the at-fork hook runs is the inherited handler's (a
    stop raised in an at-fork hook is dropped quietly:
    ``cli.dropped_stops_quiet``). Registered once per process."""
    import signal
    global _QUIET_FORKS
    if _QUIET_FORKS:
        return
    _QUIET_FORKS = True

    def child():
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:      # (not forked from the main thread)
            pass

    os.register_at_fork(after_in_child=child)


def worker_exits_on_sigterm(worker_id: int) -> None:
    """``worker_init_fn`` of the commands' DataLoaders: a worker ends on
    SIGTERM at once with exit status 0, whoever sent it. torch's own
    handler does that only for its parent's SIGTERM and lets any other
    kill the worker; the main process then fails with "DataLoader worker
    ... is killed by signal: Terminated" where a SIGTERM sent to the whole
    process group (Slurm stopping a job step) reaches the worker first.
    With status 0 nothing fails there, and the main process ends the
    command as on Ctrl-C (:class:`Terminated`); a worker the signal
    reaches before this runs is :func:`killed_by_sigterm`. (Ignoring
    SIGTERM is no answer: at exit multiprocessing terminates a worker a
    leaked iterator still holds, and waits for it.)"""
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def killed_by_sigterm(e: BaseException) -> bool:
    """torch's DataLoader error for a worker a SIGTERM killed: one sent to
    the whole process group (Slurm stopping a job step) that reached the
    worker before its :func:`worker_exits_on_sigterm` ran (a worker just
    started), and this process before its own SIGTERM."""
    return isinstance(e, RuntimeError) and "is killed by signal: Terminated" in str(e)


@torch.no_grad()
def predict(model: torch.nn.Module, data: "Slides", device: torch.device, task: str,
            amp: str = "off", dist: Dist = Dist(), workers: int = 0, progress: bool = True,
            desc: str = "evaluate", todo: Optional[Sequence[int]] = None,
            on_score: Optional[Callable[[int, Any, float], None]] = None
            ) -> Tuple[List[int], List[Any], float]:
    """Scores of every slide of ``data`` (``(indices, scores, mean_loss)``,
    in table order), each rank scoring its share ``rank::world`` and the
    results gathered over ranks. ``todo``: only these indices of ``data``;
    ``on_score(index, score, loss)`` is called on the rank that scored a
    slide as soon as it has (``evaluate`` keeps them as it goes)."""
    from tqdm import tqdm
    todo = list(range(len(data))) if todo is None else list(todo)
    mine = todo[dist.rank::dist.world]
    workers_ignore_sigint()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=1,
                                         num_workers=workers,
                                         worker_init_fn=worker_exits_on_sigterm)
    was = model.training
    model.eval()
    out: List[Tuple[int, float, float]] = []
    try:
        for img, label, index in tqdm(loader, desc=desc, unit="slide", leave=False,
                                      disable=not progress, dynamic_ncols=True):
            check_stop()                    # a stop whose exception Python dropped
            img, label = to_device(img, device), label.to(device)
            with autocast(device, amp):
                y = model(img)
            score = score_of(y, task)[0]
            out.append((int(index), score.item() if score.dim() == 0 else score.tolist(),
                        float(loss_of(y, label, task))))
            if on_score is not None:
                on_score(*out[-1])
    finally:
        model.train(was)
    merged = sorted(r for part in dist.gather(out) for r in part)
    indices = [r[0] for r in merged]
    scores = [r[1] for r in merged]
    loss = sum(r[2] for r in merged) / max(1, len(merged))
    return indices, scores, loss


# -- files --------------------------------------------------------------------------------
class WriteError(OSError):
    """A file of the run could not be written (a full disk, no permission):
    the file as it was is kept, and the command line prints
    ``streamcnn: <message>`` on one line and exits with 1."""


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file to write ``path`` through: a temporary file in the same
    folder, fsynced and renamed over ``path`` when the block ends, removed
    if it raises, so readers never see a partial file and an interrupted or
    failed write (Ctrl-C, a crash, a full disk) leaves the previous file
    intact. Failures to write raise :class:`WriteError` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp", dir=folder)
    except OSError as e:
        raise WriteError(f"streamcnn: cannot write {path}: {e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        from ..tiff import file_mode
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a failed write as a RuntimeError
        failed = isinstance(e, OSError) or (isinstance(e, RuntimeError) and
                                            "writ" in str(e))
        if failed and not isinstance(e, WriteError):
            raise WriteError(f"streamcnn: cannot write {path} ({_strip(first_line(e, None))});"
                             " the file as it was is kept") from None
        raise


# atomic_file's (and PyramidWriter's) temporary files: "." + the file's
# name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: str, ours: Callable[[str], bool]) -> None:
    """Remove the temporary files of ``folder`` that a killed write left
    (SIGKILL, the out-of-memory killer, a power cut: no ``finally`` ran),
    of the files ``ours(name)`` says the calling command writes there (a
    model-sized file per crash, which nothing else removed). Only with the
    folder's lock held: nothing else then writes those files."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for n in names:
        m = _TEMP.fullmatch(n)
        if m and ours(m.group(1)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, n))


def lock_folder(path: str, command: str = "train", file: Optional[str] = None
                ) -> Optional[int]:
    """An exclusive advisory lock (``flock``) on the folder ``path`` itself
    (no file is added to it) or, with ``file``, on that file in it (created
    empty and left there: a lock of its own beside the folder's, which a
    training run holds while ``evaluate`` may write into its folder), held
    while the returned descriptor is open; a process that ends, however it
    ends, releases it. RunFolderBusy when another process holds it; None
    where the file system gives no such lock (some network file systems):
    then there is none."""
    import fcntl
    try:
        if file is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(os.path.join(path, file), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        what = "run folder" if command == "train" else "output folder"
        raise RunFolderBusy(f"{what} {path} is in use by another streamcnn {command} (it "
                            "holds the folder's lock): wait for it to end, or give another "
                            "--out") from None
    except OSError:
        os.close(fd)
        return None
    return fd


def _entries(path: str) -> List[Tuple[int, int, str]]:
    """The directory entries ``path`` names: its own and, for a symbolic
    link, its target's, as (device, inode of the folder, name)."""
    out = []
    for p in (path, os.path.realpath(path)):
        try:
            st = os.stat(os.path.dirname(os.path.abspath(p)))
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino, os.path.basename(p)))
    return out


def check_inputs_kept(outputs: Sequence[str], inputs: Sequence[Tuple[str, str]],
                      command: str, verb: str = "writes") -> None:
    """Refuse a run that would write (or remove) one of its own inputs:
    ``outputs`` are the paths it may write (or, ``verb``, remove), ``inputs`` (what,
    path) the files it reads (slides, tables, the checkpoint). ValueError
    naming both: a slide called ``X_cam.png`` in predict's --out, a --csv
    that is evaluate's predictions.csv, are not overwritten."""
    named = {}
    for what, path in inputs:
        if os.path.lexists(path):
            for e in _entries(path):
                named.setdefault(e, (what, path))
    if not named:
        return
    for out in outputs:
        st_out = _entries(out)[:1]
        if st_out and st_out[0] in named:
            what, path = named[st_out[0]]
            raise ValueError(f"streamcnn: {what} {path} is where {command} {verb} "
                             f"{os.path.basename(out)}: move it out of the output folder, or "
                             "give another --out")


def checkpoint_identity(path: str) -> Dict[str, Any]:
    """A checkpoint file as --resume settings record it: its absolute path,
    size and modification time (a run retrained into the same path is
    another checkpoint)."""
    ck = os.path.abspath(path)
    st = os.stat(ck)
    return {"checkpoint": ck, "checkpoint_size": st.st_size,
            "checkpoint_mtime_ns": st.st_mtime_ns}


def check_settings(sfile: str, settings: Dict[str, Any], out: str, command: str) -> bool:
    """--resume: the settings an earlier run into ``out`` recorded in
    ``sfile`` (JSON) must equal ``settings``; ValueError naming each that
    differs (or an unreadable file). False when there is no ``sfile``."""
    if not os.path.exists(sfile):
        return False
    try:
        with open(sfile) as f:
            before = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"streamcnn: --resume: cannot read {sfile}: {e}") from None
    if not isinstance(before, dict):
        raise ValueError(f"streamcnn: --resume: {sfile} is not what {command} writes")
    differ = [k for k in sorted(set(settings) | set(before))
              if settings.get(k) != before.get(k)]
    if differ:
        said = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now"
                         for k in differ)
        raise ValueError(f"streamcnn: --resume: the run in {out} had other settings ({said}); "
                         "give the same, or another --out")
    return True


def write_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def write_predictions(path: str, table: Table, indices: Sequence[int],
                      scores: Sequence, classes: Optional[Sequence[str]] = None) -> None:
    """``path,label,score`` per slide (the path as the CSV names it); of
    more than two classes ``path,label,prediction,prob_0,...,prob_K-1``;
    with class names (``classes``) ``label_name`` after ``label`` and
    ``prediction_name`` after ``prediction``."""
    write_csv(path, *prediction_rows(table, indices, scores, classes))


def prediction_rows(table: Table, indices: Sequence[int], scores: Sequence,
                    classes: Optional[Sequence[str]] = None, exact: bool = False
                    ) -> Tuple[List[str], List[List[Any]]]:
    """The header and rows of :func:`write_predictions`; ``exact``: scores
    written so that they read back to the same floats (else 6 digits)."""
    fmt = repr if exact else (lambda v: f"{v:.6g}")
    rows = []
    multi = bool(scores) and isinstance(scores[0], (list, tuple))
    named = classes is not None
    for i, s, pred in zip(indices, scores, predicted_classes(scores)):
        lab = table.labels[i]
        lab = int(lab) if float(lab).is_integer() else lab
        row = [table.names[i], lab] + ([classes[int(lab)]] if named else [])
        if multi:
            row += [pred] + ([classes[pred]] if named else []) + [fmt(float(v)) for v in s]
        else:
            row.append(fmt(float(s)))
        rows.append(row)
    header = ["path", "label"] + (["label_name"] if named else [])
    if multi:
        header += ["prediction"] + (["prediction_name"] if named else []) + \
            [f"prob_{j}" for j in range(len(scores[0]))]
    else:
        header.append("score")
    return header, rows


def save_figure(fig, path: str, dpi: int = 100, tight: bool = False) -> None:
    """``fig`` as a PNG at ``path`` (written atomically); ``tight``: cropped
    to what is drawn, with a margin of 0.1 inch."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight", "pad_inches": 0.1}
                                                 if tight else {}))
    write_atomic(path, buf.getvalue())


def plot_roc(path: str, labels: Sequence[float], scores: Sequence, title: str) -> bool:
    """The ROC curve as a PNG (of more than two classes, one curve per
    class against the rest, for the classes present with others); False
    (nothing written) with a single class."""
    if len(set(int(v) for v in labels)) < 2 or \
            not all(math.isfinite(v) for v in _flat(scores)):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if isinstance(scores[0], (list, tuple)):
        for c in range(len(scores[0])):
            y = [int(v) == c for v in labels]
            if 0 < sum(y) < len(y):
                p = [s[c] for s in scores]
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, lw=1.5, label=f"class {c}: AUC {roc_auc_score(y, p):.3f}")
    else:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM (ru_maxrss would
    count the parent's memory at fork, which Linux carries over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA's allocator peak,
    or this process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:   # Linux: resets VmHWM
            f.write("5")
