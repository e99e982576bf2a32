"""Progress over tiles for long calls (``StreamingModule(..., progress=True)``).

The C operators report after each tile through a thread-local callback
(``sc_set_progress``); this module installs one that draws a line on stderr
(``streamcnn forward: 12/36 tiles, 3.1 s``), redrawn at most 10 times a
second and ended with a newline when the call is done.
"""

import contextlib
import ctypes
import sys
import threading
import time

from ._library import clib

_PROGRESS_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                ctypes.c_int64)
_state = threading.local()
_PHASES = ("forward", "backward")


class _Printer:
    def __init__(self, stream):
        self.stream = stream
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.shown = False

    def __call__(self, user, phase, done, total):
        now = time.perf_counter()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        try:
            self.stream.write(f"\rstreamcnn {_PHASES[phase] if 0 <= phase < 2 else phase}: "
                              f"{done}/{total} tiles, {now - self.t0:.1f} s")
            self.stream.flush()
            self.shown = True
        except Exception:  # noqa: BLE001 - never let display break the call
            pass

    def close(self):
        if self.shown:
            try:
                self.stream.write("\n")
                self.stream.flush()
            except Exception:  # noqa: BLE001
                pass


def enabled() -> bool:
    """Whether progress is being shown for calls on this thread."""
    return getattr(_state, "on", False)


@contextlib.contextmanager
def show(on: bool = True, stream=None):
    """Show per-tile progress of the operator calls in this block (on this
    thread). No-op when ``on`` is false or a block is already active."""
    if not on or enabled():
        yield
        return
    printer = _Printer(stream or sys.stderr)
    fn = _PROGRESS_FN(printer)  # referenced until the block ends
    lib = clib()
    lib.sc_set_progress(fn, None)
    _state.on = True
    try:
        yield
    finally:
        lib.sc_set_progress(None, None)
        _state.on = False
        printer.close()
