"""Out of memory inside a tile (issue 17): the allocation fails, the call
raises RuntimeError (or torch.OutOfMemoryError, a RuntimeError) naming
streamcnn, everything the call held is released, and the next call works
and gives the right answer. Each case runs in a subprocess whose address
space is limited (RLIMIT_AS), or, under AddressSanitizer (which reserves
terabytes of shadow address space, so RLIMIT_AS cannot be used), whose
allocator refuses blocks over a size (max_allocation_size_mb with
allocator_may_return_null)."""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(r"""
    import ctypes, gc, os, resource, sys
    import torch, torch.nn as nn
    import streamcnn
    torch.set_num_threads(1)
    asan = sys.argv[1] == "asan"
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 8, 3, stride=2, padding=1)).eval()
    sm = streamcnn.StreamingModule(stem, tile_size=1024)
    small = torch.randn(1, 3, 96, 80)
    big = torch.randn(1, 3, 1024, 1024)  # one tile: 64 x 1024^2 floats = 256 MB a value
    ref_small = stem(small)
    ref_big_sum = None

    def vm():  # bytes of address space in use
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33, summed over every arena
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    _mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if _mallinfo2 is not None:
        _mallinfo2.restype = MallInfo2

    def heap():  # bytes the allocator has handed out and not had back (torch's CPU
        if _mallinfo2 is None:  # tensors come from malloc), or None
            return None
        m = _mallinfo2()
        return m.uordblks + m.hblkhd

    def step(x):
        x = x.clone().requires_grad_(True)
        y = sm(x)
        y.sum().backward()
        return y.detach(), x.grad

    y, g = step(small)  # warm up: every code path, thread pool, allocator
    assert torch.allclose(y, ref_small, atol=1e-5, rtol=1e-4)
    if not asan:
        y_big, _ = step(big)  # the reference of the big image, unlimited
        ref_big_sum = float(y_big.double().sum())
        del y_big, _
    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if not asan:
        base, heap_base = vm(), heap()
        resource.setrlimit(resource.RLIMIT_AS, (base + (96 << 20), hard))
    failures, sizes, held = 0, [], []
    for what in ("forward", "backward") * 3:
        try:
            if what == "forward":
                with torch.no_grad():
                    sm(big)
            else:
                step(big)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            msg = str(e)
            assert "streamcnn" in msg and "out of memory" in msg, msg
            if not failures:
                print(what, type(e).__name__, msg.splitlines()[0][:300])
            failures += 1
        gc.collect()
        if not asan:
            sizes.append(vm() - base)
            if heap_base is not None:
                held.append(heap() - heap_base)
    if not asan:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # the next calls work: small always, big once the memory is back
    y, g = step(small)
    assert torch.allclose(y, ref_small, atol=1e-5, rtol=1e-4)
    if not asan:
        y_big, _ = step(big)
        assert abs(float(y_big.double().sum()) - ref_big_sum) <= 1e-6 * abs(ref_big_sum) + 1e-3
    print("failures", failures, "growth_mb", [s >> 20 for s in sizes],
          "held_kb", [h >> 10 for h in held])
    sys.stdout.flush()
    assert failures == 6, failures
    # nothing held after a failure. Exact: what malloc has handed out does not
    # grow (a tile is 64 MiB or more; a few KB of Python objects come and go).
    # Coarse: the address space, which also moves with glibc's arenas and
    # trimming (up to 18 MB under load, CI 2026-12-06), stays under one tile.
    if held:
        assert max(held) - min(held) < (1 << 20), held
    if sizes:
        assert max(sizes) - min(sizes) < (48 << 20), sizes
    print("ok")
""")


def _asan() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def test_allocation_failure_inside_a_tile_raises_and_recovers():
    env = dict(os.environ)
    mode = "asan" if _asan() else "rlimit"
    if mode == "asan":  # blocks over 64 MB fail (the tile's values are 256 MB)
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + \
            ":allocator_may_return_null=1:max_allocation_size_mb=64"
    r = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert r.stdout.strip().endswith("ok"), r.stdout
