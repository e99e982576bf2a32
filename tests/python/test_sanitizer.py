"""The sanitizer harness itself (make sanitize): a deliberate out-of-bounds
read inside libstreamcnn, in a subprocess, must be reported by
AddressSanitizer, so that a "zero findings" run cannot come from a library
or preload that was not instrumented. Runs only under make sanitize."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    "libasan" not in os.environ.get("LD_PRELOAD", ""),
    reason="checks the ASan harness; runs under make sanitize only")

CHILD = textwrap.dedent("""
    import ctypes
    from streamcnn import _library
    _library.load_library()
    lib = _library._cdll
    # a valid header promising 65536 instructions, in an array of 300
    # words (heap, not pymalloc), passed with a length it does not have
    words = (ctypes.c_int64 * 300)(0x53434E4E, 1, 3, 65536, 0)
    for i in range(5, 296, 5):
        words[i:i + 5] = [5, 3, 0, 1, 0]  # relu of the image
    info = (ctypes.c_int64 * 8)()
    err = ctypes.create_string_buffer(256)
    lib.sc_program_info(words, 1 << 20, info, err, len(err))
    print("not detected", err.value)
""")


def test_asan_reports_an_out_of_bounds_read_in_the_library():
    lib = os.environ.get("STREAMCNN_LIBRARY", "")
    assert "asan" in lib, f"STREAMCNN_LIBRARY={lib!r} is not the sanitizer build"
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0, r.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
    assert "sc_program_decode" in r.stderr
