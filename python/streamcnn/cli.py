"""The ``streamcnn`` command line: ``streamcnn SUBCOMMAND ...`` (also
``python -m streamcnn`` and ``torchrun -m streamcnn``).

Each subcommand is a module of ``streamcnn.app`` with ``add_arguments(parser)``
and ``run(args) -> int``, listed once in :data:`SUBCOMMANDS`. Errors the
user caused (:class:`UsageError`, and the library's ValueError /
FileNotFoundError whose message starts with ``streamcnn:``) print one line,
``streamcnn: <message>``, on stderr and exit with 2; a file that cannot be
written (:class:`WriteError`: a full disk), or pixels that do not fit in
memory (the library's MemoryError), print one line and exit with 1;
Ctrl-C exits with 130, SIGTERM (a batch scheduler's stop, ``kill``) the same
way with 143.
"""

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from typing import List, Optional

from .app.common import (Terminated, UsageError, WriteError, clear_stops, end_process,
                         ends_without_finalization, stop_requested, stop_signalled,
                         stop_status, stopped_by)
from .app.config import ArgumentParser

# name -> (module of streamcnn.app, one-line help)
SUBCOMMANDS = {
    "synth": ("synth", "write a synthetic CAMELYON-like set of slides and its CSVs"),
    "train": ("train", "train a slide classifier (or regressor) end to end, streamed"),
    "evaluate": ("evaluate", "score slides with a checkpoint: AUC / Spearman, predictions.csv"),
    "export": ("export", "write a checkpoint's model as TorchScript (stem + head)"),
    "predict": ("predict", "score whole slides and draw saliency / class-activation heatmaps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="streamcnn", description="streamcnn: train, evaluate and "
                            "export streamed CNNs on whole-slide images.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"streamcnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name, (modname, help_) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"streamcnn.app.{modname}")
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip()
                           .split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _message(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg[len("streamcnn: "):] if msg.startswith("streamcnn: ") else msg


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``streamcnn ARGV``; returns the exit status. As the command
    (``argv`` None), a process that ran collectives (a ``torchrun`` rank of
    ``train``) ends here, without the interpreter's finalization
    (:func:`~streamcnn.app.common.end_process`)."""
    clear_stops()     # an earlier command's, in this process, were handled
    if argv is None:
        with _stop_signals():
            code = _main(argv)
    else:
        code = _main(argv)
    if argv is None and ends_without_finalization():
        end_process(code)
    return code


@contextlib.contextmanager
def _stop_signals():
    """While the command runs, SIGTERM raises :class:`Terminated` (a
    KeyboardInterrupt) in the main thread, so that it ends as on Ctrl-C:
    its files are left whole (written atomically), and train names the
    epoch last.pt holds, for --resume. A scheduler's SIGTERM before a kill
    (Slurm's preemption) then says what was kept. Both signals (SIGINT
    unless it is ignored, as in a background job) are recorded too, for
    :func:`~streamcnn.app.common.check_stop`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_stop(signum, frame):
        stop_signalled(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, on_stop)
    try:
        with dropped_stops_quiet():
            yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def dropped_stops_quiet():
    """A stop the handlers raised where Python cannot propagate it (an
    at-fork or finalizer callback: "Exception ignored in ...") is dropped
    without its traceback while the block runs: it was recorded, and
    :func:`~streamcnn.app.common.check_stop` raises it again at the
    commands' next step. Other unraisable exceptions print as before."""
    def unraisable(u):
        if isinstance(u.exc_value, KeyboardInterrupt) and stop_requested() is not None:
            return
        hook(u)

    hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook


@contextlib.contextmanager
def library_warnings():
    """The library's own warnings ("streamcnn: ...") shown as one line
    "streamcnn: warning: ...", like the commands' other warnings, and by
    the first process alone where several run one command (torchrun's or
    --tile-parallel's ranks: RANK in the environment; the others would
    repeat it); other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if not text.startswith("streamcnn: "):
                return shown(message, category, filename, lineno, file, line)
            if os.environ.get("RANK", "0") not in ("", "0"):
                return None
            print(f"streamcnn: warning: {text[len('streamcnn: '):]}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


def _main(argv: Optional[List[str]]) -> int:
    """_run with :func:`library_warnings`."""
    with library_warnings():
        return _run(argv)


def _run(argv: Optional[List[str]]) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"streamcnn: {_message(e)}", file=sys.stderr)
        return 2
    except WriteError as e:             # a full disk, no permission: not a bug
        print(f"streamcnn: {_message(e)}", file=sys.stderr)
        return 1
    except MemoryError as e:            # the library's, naming what did not fit
        if not str(e).startswith("streamcnn: "):
            raise
        print(f"streamcnn: {_message(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        # the library's own checks of arguments and named files say
        # "streamcnn: ..."; anything else is a bug and keeps its traceback
        if not str(e).startswith("streamcnn: "):
            raise
        print(f"streamcnn: {_message(e)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RuntimeError) as e:
        # (a RuntimeError: what a stop became inside torch's code, or a
        # DataLoader worker the SIGTERM reached first)
        sig = stopped_by(e)
        if sig is None:
            raise
        word, code = stop_status(sig)
        print(f"streamcnn: {word}", file=sys.stderr)
        return code
    except SystemExit as e:             # --help, --version
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
