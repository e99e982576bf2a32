"""Concurrency: the operators and the slide reader used from several
threads (and DataLoader worker processes) at once give exactly what they
give alone (issue 17). See the README's "Thread safety" section.

ctypes and the dispatcher release the GIL while the C core runs, so the
threads below really overlap inside op/*.c."""

import ctypes
import os
import threading

import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn import StreamingModule
from streamcnn._library import clib, tiling_info
from streamcnn.data import synthetic

ROUNDS = 3


def _stems():
    """Four different stems (conv/bn/relu/pool, residual add, avg pool and
    dilation, channel ops) with their images and tiles, each small."""
    g = torch.Generator().manual_seed(1)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            return torch.relu(y + self.bn(self.c2(y)))

    stems = [
        (nn.Sequential(nn.Conv2d(3, 6, 5, 2, 2), nn.BatchNorm2d(6), nn.ReLU(),
                       nn.MaxPool2d(3, 2, 1)), (1, 3, 61, 53), 29),
        (Res(), (2, 3, 37, 44), 13),
        (nn.Sequential(nn.Conv2d(3, 5, 3, dilation=2, padding=2), nn.SiLU(),
                       nn.AvgPool2d(2), nn.Conv2d(5, 3, 3, stride=2)), (1, 3, 48, 40), 22),
        (nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1,
                       groups=8), nn.LeakyReLU(0.2)), (1, 3, 64, 56), 24),
    ]
    out = []
    for module, shape, tile in stems:
        module = module.double().eval()
        for p in module.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        sm = StreamingModule(module, tile_size=tile)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        out.append((sm, x))
    return out


def _run(sm, x):
    """Forward + backward of one stem: output, image and parameter grads."""
    x = x.clone().requires_grad_(True)
    y = sm(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    params = [p for p in sm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x] + params, g)
    return [y.detach()] + list(grads)


def _in_threads(fns):
    """Run fns at once (a barrier lines the threads up); their results, or
    re-raise the first exception."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def body(i):
        try:
            barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_four_threads_bit_identical_to_single_threaded():
    jobs = _stems()
    ref = [_run(sm, x) for sm, x in jobs]
    for _ in range(ROUNDS):
        got = _in_threads([lambda sm=sm, x=x: _run(sm, x) for sm, x in jobs])
        for r, g in zip(ref, got):
            assert len(r) == len(g)
            for a, b in zip(r, g):
                assert torch.equal(a, b)  # bit-identical, not close


def test_mac_counters_sum_over_threads():
    """The counters are process-wide: concurrent calls add up to exactly
    the sum of the same calls made one after another (integer-valued
    doubles, so the order of the atomic adds does not round)."""
    jobs = _stems()
    streamcnn.macs_executed(reset=True)
    single = []
    for sm, x in jobs:
        _run(sm, x)
        single.append(streamcnn.macs_executed(reset=True))
    assert all(s[0] > 0 and s[2] > 0 for s in single)
    expect = [sum(s[k] for s in single) for k in range(3)]
    _in_threads([lambda sm=sm, x=x: _run(sm, x) for sm, x in jobs])
    assert list(streamcnn.macs_executed(reset=True)) == expect


_PROGRESS_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                ctypes.c_int64)


def test_progress_hooks_are_per_thread():
    """Each thread's callback sees its own calls' tiles only, in order, the
    same as when it runs alone; a thread without a callback reports
    nothing to the others'."""
    jobs = _stems()
    lib = clib()

    def with_progress(sm, x):
        seen = []
        fn = _PROGRESS_FN(lambda user, phase, done, total: seen.append((phase, done, total)))
        lib.sc_set_progress(fn, None)
        try:
            _run(sm, x)
        finally:
            lib.sc_set_progress(None, None)
        return seen

    alone = [with_progress(sm, x) for sm, x in jobs]
    for (sm, x), seen in zip(jobs, alone):
        assert seen, "no progress reported"
        n = tiling_info(sm.program, x.shape[2], x.shape[3], sm.tile_size)
        for phase in (0, 1):
            calls = [s for s in seen if s[0] == phase]
            assert calls and all(t == n[4] * n[5] for _, _, t in calls)
            assert [d for _, d, _ in calls] == list(range(1, n[4] * n[5] + 1))
    fns = [lambda sm=sm, x=x: with_progress(sm, x) for sm, x in jobs]
    fns.append(lambda: _run(*jobs[0]) and [])  # a fifth thread, no callback
    for _ in range(ROUNDS):
        got = _in_threads(fns)
        assert got[:4] == alone


needs_slides = pytest.mark.skipif(not streamcnn.slide.available(),
                                  reason="streamcnn built without OpenSlide")


class _Regions(torch.utils.data.Dataset):
    """Regions of one slide, opened lazily in the process that reads (as
    SlideDataset does): a forked worker never uses the parent's handle."""

    def __init__(self, path, boxes):
        self.path, self.boxes, self._slide, self._pid = path, boxes, None, None

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._slide, self._pid = streamcnn.Slide(self.path), os.getpid()
        (x, y), lv, size = self.boxes[i]
        return self._slide.read_region((x, y), lv, size, threads=2)


@needs_slides
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="gcc 12's ASan runtime takes none of its allocator's locks around fork(): a "
    "DataLoader worker forked while a reader thread frees memory spins forever on ASan's "
    "quarantine lock (gdb, 2026-12-07: __asan::Quarantine::Drain in the child; 1 in ~190 "
    "runs). Runs in make test, on the real allocator, whose fork handlers reset its locks")
def test_slide_reader_workers_and_threads_at_once(tmp_path):
    path = str(tmp_path / "s.tif")
    synthetic.make_slide(path, 900, 700, seed=5, tile=128, min_size=200)
    boxes = [((x, y), lv, (150, 120)) for lv in (0, 1) for x in (0, 333, 800)
             for y in (0, 250, 640)]
    with streamcnn.Slide(path) as s:
        ref = [s.read_region(xy, lv, size, threads=1) for xy, lv, size in boxes]
    shared = streamcnn.Slide(path)  # one handle, read by threads of this process
    stop = threading.Event()
    bad = []

    def reader(k):
        n = 0
        while not stop.is_set() or n < 3:
            i = (k + n) % len(boxes)
            xy, lv, size = boxes[i]
            if not torch.equal(shared.read_region(xy, lv, size, threads=3), ref[i]):
                bad.append(i)
            n += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        ctx = torch.multiprocessing.get_context("fork")
        loader = torch.utils.data.DataLoader(_Regions(path, boxes), batch_size=None,
                                             num_workers=2, multiprocessing_context=ctx,
                                             timeout=300)
        for epoch in range(2):
            got = list(loader)
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
        shared.close()
    assert not any(t.is_alive() for t in threads)
    assert not bad


def test_resampler_from_threads():
    """resize_uint8 (io/resample.c) from four threads at once, each with
    its own thread count inside: the results equal one call's."""
    from streamcnn.slide import resize_uint8
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 300 + 17 * k, 280), dtype=torch.uint8, generator=g)
            for k in range(4)]
    want = [resize_uint8(im, (131, 97), threads=1) for im in imgs]
    got = _in_threads([lambda k=k: [resize_uint8(imgs[k], (131, 97), threads=1 + k)
                                    for _ in range(5)] for k in range(4)])
    for k in range(4):
        assert all(torch.equal(r, want[k]) for r in got[k]), k
