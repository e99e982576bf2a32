"""Tile-parallel streaming (streamcnn.distributed.TileParallel): one image's
stem over 2 and 3 CPU processes (gloo, torch.multiprocessing.spawn, a
file:// rendezvous, 60 s timeouts). float64 output, every parameter
gradient and the image gradient against the single-process whole-image
autograd pass; also the raw *_rows ops (opcheck, bands equal to the
whole output's rows, bad ranges refused)."""

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err

TOL = 1e-10
TIMEOUT = datetime.timedelta(seconds=60)


def _random_stem():
    """Convolution, batch norm, ReLU, a ceil-mode max pool, a residual
    block, a strided convolution and a padded average pool (float64)."""
    from torchvision.models.resnet import BasicBlock
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1, ceil_mode=True), BasicBlock(4, 4),
                         nn.Conv2d(4, 5, 3, stride=2),
                         nn.AvgPool2d(2, 1, count_include_pad=False, padding=1))
    stem = stem.double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return stem


def _resnet18_stem():
    import torchvision
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).double()
    randomize_bn(model, torch.Generator().manual_seed(2))
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1).eval()


def _loss(y, w):
    """A head run identically on every rank: linear and quadratic terms."""
    return (y * w).sum() + 0.1 * y.square().sum()


def _reference(stem, x, w):
    """Output, parameter gradients and image gradient of the whole image."""
    xr = x.detach().double().requires_grad_(x.is_floating_point())
    y = stem(xr)
    params = [p for p in stem.parameters() if p.requires_grad]
    wrt = ([xr] if x.is_floating_point() else []) + params
    got = torch.autograd.grad(_loss(y, w), wrt)
    gx = got[0] if x.is_floating_point() else None
    return y.detach(), list(got[1:] if x.is_floating_point() else got), gx


def _check(tp, stem, ref, x, w, label, part=False):
    """Run tp on x (the whole image, or only this rank's rows) and compare
    with the whole-image pass ``ref = _reference(stem, x, w)`` (computed once
    for the several splits of one image); every rank checks."""
    ref_y, ref_p, ref_x = ref
    params = [p for p in stem.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    h, wd = x.shape[2], x.shape[3]
    if part:
        a, b = tp.rows_needed(h, wd)
        xp = x.detach()[:, :, a:b].clone().requires_grad_(x.is_floating_point())
        y = tp(xp, image_row0=a, image_height=h)
    else:
        xp = x.detach().clone().requires_grad_(x.is_floating_point())
        y = tp(xp)
    assert rel_err(y, ref_y) < TOL, (label, "output", rel_err(y, ref_y))
    _loss(y, w).backward()
    for k, (p, g) in enumerate(zip(params, ref_p)):
        assert p.grad is not None, (label, k)
        assert rel_err(p.grad, g) < TOL, (label, "param", k, rel_err(p.grad, g))
    if ref_x is not None:
        if part:  # a part's gradient is this rank's share: sum them
            full = torch.zeros_like(ref_x)
            if b > a:
                full[:, :, a:b] = xp.grad
            dist.all_reduce(full)
            gx = full
        else:
            gx = xp.grad
        assert rel_err(gx, ref_x) < TOL, (label, "image", rel_err(gx, ref_x))


def _init(rank, world, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                            world_size=world, timeout=TIMEOUT)


def _done():
    """Every rank past its last collective before any tears the group down
    (a rank that destroyed its group while the other still finished its
    last all-reduce ended once with SIGABRT, 'terminate called without an
    active exception', in a full make test on a loaded machine); only on
    success: after a failure the other rank may never get here."""
    dist.barrier()


def _worker_two(rank, path):
    _init(rank, 2, path)
    from streamcnn.distributed import TileParallel
    try:
        torch.manual_seed(0)
        stem = _random_stem()
        x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
        xu = torch.randint(0, 256, (2, 3, 45, 37), dtype=torch.uint8)
        w = None
        for cached in (True, False):
            sm = streamcnn.StreamingModule(stem, 22, halo_cache=cached)
            oh, ow = streamcnn.tiling_info(sm.program, 45, 37, sm.tile_size)[:2]
            assert streamcnn.tiling_info(sm.program, 45, 37, sm.tile_size)[4] >= 3
            if w is None:   # the whole-image passes, once for every split below
                w = torch.randn(2, 5, oh, ow, dtype=torch.float64)
                ref, ref_u = _reference(stem, x, w), _reference(stem, xu, w)
            # balanced, and splits that cut through the halos of every
            # layer (the first / last row alone, an odd row in the middle)
            for bands in (None, [(0, 1), (1, oh)], [(0, oh - 1), (oh - 1, oh)],
                          [(0, 5), (5, oh)]):
                tp = TileParallel(sm, bands=bands)
                _check(tp, stem, ref, x, w, ("random", cached, bands))
            tp = TileParallel(sm)
            _check(tp, stem, ref, x, w, ("random part", cached), part=True)
            # a uint8 image (no image gradient), each rank its rows only
            _check(tp, stem, ref_u, xu, w, ("uint8 part", cached), part=True)
        stem18 = _resnet18_stem()
        x18 = torch.randn(2, 3, 67, 51, dtype=torch.float64)
        w = None
        for cached in (True, False):
            sm = streamcnn.StreamingModule(stem18, 48, halo_cache=cached)
            oh, ow = streamcnn.tiling_info(sm.program, 67, 51, sm.tile_size)[:2]
            if w is None:
                w = torch.randn(2, 64, oh, ow, dtype=torch.float64)
                ref = _reference(stem18, x18, w)
            for bands in (None, [(0, 7), (7, oh)]):
                _check(TileParallel(sm, bands=bands), stem18, ref, x18, w,
                       ("resnet18", cached, bands))
        # ranks that disagree are refused on every rank naming what differs
        # (and this rank's), before any band is computed, and the group
        # still works afterwards: the image width; the program (one more
        # padded row and column in the last pooling); the tile size; the
        # fixed bands (of the same largest band: they were silently wrong);
        # a parameter's value; the pixels (silently wrong before)
        sm = streamcnn.StreamingModule(stem, 22)
        tp = TileParallel(sm)
        bad = torch.randn(1, 3, 45, 37 - rank, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=r"disagree on the image's size: ranks \[1\] "
                           rf"differ from rank 0 \(this is rank {rank}: the image's size "
                           rf"1 x 3 x 45 x {37 - rank}\)"):
            tp(bad)
        other = nn.Sequential(*stem[:-1], nn.AvgPool2d(2, 1, count_include_pad=False,
                                                       padding=rank))
        with pytest.raises(RuntimeError, match="disagree on the program: ranks"):
            TileParallel(streamcnn.StreamingModule(other, 22))(x)
        with pytest.raises(RuntimeError, match=rf"disagree on the tile size: .*\({22 + rank}, "):
            TileParallel(streamcnn.StreamingModule(stem, 22 + rank))(x)
        oh = streamcnn.tiling_info(sm.program, 45, 37, sm.tile_size)[0]
        with pytest.raises(RuntimeError, match=r"disagree on the bands: .*\[\(0, "):
            TileParallel(sm, bands=[(0, 4 + rank), (4 + rank, oh)])(x)
        with pytest.raises(RuntimeError, match=r"disagree on the image's pixels: .*\(compared "
                                               "on a grid of them\)"):
            tp(x + rank)
        # an input one rank refuses (rows rows_needed did not give it, a
        # dtype) is refused on every rank at once: the other waited for it
        # in its first collective until the timeout
        a, b = tp.rows_needed(45, 37)
        if rank == 1:
            with pytest.raises(ValueError, match=r"rank 1 reads image rows .* but was given"):
                tp(x[:, :, a + 1:b], image_row0=a + 1, image_height=45)
            with pytest.raises(TypeError, match="the image is torch.float32"):
                tp(x.float())
        else:
            for _ in range(2):
                with pytest.raises(RuntimeError, match="tile-parallel rank 1 refused the input "
                                   r"given to it \(its error says why\); this is rank 0"):
                    tp(x[:, :, a:b], image_row0=a, image_height=45)
        with torch.no_grad():
            stem[0].weight[0, 0, 0, 0] += rank * 1e-9
        try:
            with pytest.raises(RuntimeError, match="disagree on the parameters' values"):
                tp(x)
        finally:
            with torch.no_grad():
                stem[0].weight[0, 0, 0, 0] -= rank * 1e-9
        with torch.no_grad():
            y = tp(x)
            assert rel_err(y, stem(x)) < TOL
        _done()
    finally:
        dist.destroy_process_group()


def _worker_three(rank, path):
    _init(rank, 3, path)
    from streamcnn.distributed import TileParallel
    try:
        torch.manual_seed(0)
        stem = _random_stem()
        # an output of 2 rows over 3 ranks: the third band is empty; and
        # an empty band in the middle (the whole-image passes computed once)
        x2 = torch.randn(2, 3, 7, 29, dtype=torch.float64)
        x3 = torch.randn(2, 3, 33, 21, dtype=torch.float64)
        w2 = w3 = None
        for cached in (True, False):
            sm = streamcnn.StreamingModule(stem, 22, halo_cache=cached)
            oh, ow = streamcnn.tiling_info(sm.program, 7, 29, sm.tile_size)[:2]
            assert oh == 2
            tp = TileParallel(sm)
            assert tp.bands(7, 29)[2] == (2, 2)
            assert tp.rows_needed(7, 29, 2) == (0, 0)
            if w2 is None:
                w2 = torch.randn(2, 5, oh, ow, dtype=torch.float64)
                ref2 = _reference(stem, x2, w2)
            _check(tp, stem, ref2, x2, w2, ("empty band", cached))
            _check(tp, stem, ref2, x2, w2, ("empty band part", cached), part=True)
            oh, ow = streamcnn.tiling_info(sm.program, 33, 21, sm.tile_size)[:2]
            if w3 is None:
                w3 = torch.randn(2, 5, oh, ow, dtype=torch.float64)
                ref3 = _reference(stem, x3, w3)
            _check(TileParallel(sm, bands=[(0, 3), (3, 3), (3, oh)]), stem, ref3, x3, w3,
                   ("middle empty", cached))
        _done()
    finally:
        dist.destroy_process_group()


def _rank(rank, fn, path):
    """Rank ``rank`` runs ``fn(rank, path)``; having succeeded (its group
    destroyed) it leaves with os._exit(0), skipping the interpreter's
    finalization: a process group's gloo threads torn down there ended a
    finished rank with SIGABRT ('terminate called without an active
    exception') about once in a few full runs, barrier or not. A failure
    raises as before (torch.multiprocessing reports it)."""
    fn(rank, path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, world, tmp_path):
    path = str(tmp_path / "rendezvous")
    ctx = mp.start_processes(_rank, args=(fn, path), nprocs=world, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=180):
        pass


def test_two_ranks_equal_whole_image(tmp_path):
    _spawn(_worker_two, 2, tmp_path)


def test_three_ranks_empty_band(tmp_path):
    _spawn(_worker_three, 3, tmp_path)


# ---- the raw *_rows ops, in this process ----------------------------------

def _setup(cached_rows=(3, 8)):
    sm = streamcnn.StreamingModule(_random_stem(), 22)
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    return sm, x, [p.detach() for p in sm.stream_params()]


def test_rows_ops_opcheck():
    sm, x, params = _setup()
    tile = sm.tile_size
    a, b = (int(v) for v in streamcnn.band_info(sm.program, 45, 37, tile, (3, 8))[:2])
    xp = x[:, :, a:b].clone().requires_grad_()
    ps = sm.stream_params()
    rows = [3, 8, a, 45]
    torch.library.opcheck(torch.ops.streamcnn.forward_rows.default,
                          (xp, ps, sm.program, tile, rows))
    torch.library.opcheck(torch.ops.streamcnn.forward_cached_rows.default,
                          (xp, ps, sm.program, tile, rows))
    y, strips = torch.ops.streamcnn.forward_cached_rows(xp.detach(), params, sm.program,
                                                        tile, rows)
    g = torch.randn_like(y)
    mask = [True] + [k % 2 == 0 for k in range(len(params))]
    torch.library.opcheck(torch.ops.streamcnn.backward_rows.default,
                          (g, xp.detach(), params, sm.program, tile, mask, rows))
    torch.library.opcheck(torch.ops.streamcnn.backward_cached_rows.default,
                          (g, strips, xp.detach(), params, sm.program, tile, mask, rows))


def _bands_sum_to_the_whole(sm, x, g, cuts, cached):
    """The bands between ``cuts`` (each given only its rows of the image,
    as band_info names them) concatenate to the whole output; their
    gradients for ``g`` sum to the whole-image gradients."""
    params = [p.detach() for p in sm.stream_params()]
    tile, (h, w) = sm.tile_size, x.shape[2:]
    mask = [True] * (1 + len(params))
    y = torch.ops.streamcnn.forward(x, params, sm.program, tile)
    whole = torch.ops.streamcnn.backward(g, x, params, sm.program, tile, mask)
    outs, sums = [], [torch.zeros_like(t) for t in whole]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        a, b, n_strips, _ = streamcnn.band_info(sm.program, h, w, tile, (lo, hi))
        a, b = int(a), int(b)
        rows, xp, gb = [lo, hi, a, h], x[:, :, a:b], g[:, :, lo:hi].contiguous()
        if cached:
            yb, strips = torch.ops.streamcnn.forward_cached_rows(xp, params, sm.program,
                                                                 tile, rows)
            assert strips.numel() == x.shape[0] * n_strips
            got = torch.ops.streamcnn.backward_cached_rows(gb, strips, xp, params,
                                                           sm.program, tile, mask, rows)
        else:
            yb = torch.ops.streamcnn.forward_rows(xp, params, sm.program, tile, rows)
            got = torch.ops.streamcnn.backward_rows(gb, xp, params, sm.program, tile,
                                                    mask, rows)
        outs.append(yb)
        assert got[0].shape == xp.shape
        sums[0][:, :, a:b] += got[0]
        for s, t in zip(sums[1:], got[1:]):
            s += t
    assert rel_err(torch.cat(outs, 2), y) < TOL, cuts
    for s, t in zip(sums, whole):
        assert rel_err(s, t) < TOL, cuts


@pytest.mark.parametrize("grad", ["dense", "maxpool"])
@pytest.mark.parametrize("cached", [True, False])
def test_rows_ops_sum_to_the_whole(cached, grad):
    """Bands concatenate to the whole output and their gradients sum to the
    whole-image gradients. With a max-pool head's gradient (one non-zero
    per channel) the sparse backward skips and boxes tiles of each band, in
    the band's own coordinates."""
    sm, x, params = _setup()
    y = torch.ops.streamcnn.forward(x, params, sm.program, sm.tile_size)
    oh = y.shape[2]
    if grad == "dense":
        g = torch.randn_like(y)
    else:   # the gradient of sum(amax over space): 1 at each channel's arg-max
        flat = y.flatten(2)
        g = torch.zeros_like(flat).scatter_(2, flat.argmax(2, keepdim=True), 1.0).view_as(y)
    for cuts in ([0, 1, oh], [0, 4, 5, oh], [0, oh - 1, oh]):
        _bands_sum_to_the_whole(sm, x, g, cuts, cached)


@pytest.mark.parametrize("cached", [True, False])
def test_rows_ops_convnext(cached):
    """A ConvNeXt stem (stem, a stage of two blocks: 7 x 7 depthwise
    convolutions, channel layer norms, linear layers, layer scale; the
    downsampling) of torchvision's ConvNeXt at a small width, in row bands
    through tiles of 100: the bands sum to the whole."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    net = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]).double().eval()
    for m in net.modules():
        if hasattr(m, "layer_scale"):
            nn.init.normal_(m.layer_scale, 0, 0.5)
    stem = net.features[:3]
    sm = streamcnn.StreamingModule(stem, 100, halo_cache=cached)
    x = torch.randn(2, 3, 189, 83, dtype=torch.float64)
    assert streamcnn.tiling_info(sm.program, 189, 83, sm.tile_size)[4:] == [4, 2]
    y = stem(x)
    g = torch.randn_like(y)
    oh = y.shape[2]
    for cuts in ([0, 3, oh], [0, 9, 10, oh], [0, oh - 1, oh]):
        _bands_sum_to_the_whole(sm, x, g, cuts, cached)


@pytest.mark.parametrize("cached", [True, False])
def test_rows_of_padding_alone(cached):
    """A convolution padded by more than its kernel reaches makes output
    rows that read only its padding: a band of them reads no image row
    (band_info: [0, 0)), takes an image tensor of none, and computes only
    the values below that convolution (the band's first tile owned all of
    each value up to its cone's end, and the op then asked for the whole
    image: 'read image rows [0, 45)')."""
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=6),
                         nn.Conv2d(5, 5, 3, padding=1)).double().eval()
    sm = streamcnn.StreamingModule(stem, 22)
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    oh = stem(x).shape[2]
    whole_macs = streamcnn.work_info(sm.program, 45, 37, sm.tile_size)[4]
    for lo in (oh - 3, oh - 1):
        a, b, _, macs = streamcnn.band_info(sm.program, 45, 37, sm.tile_size, (lo, oh))
        assert (a, b) == (0, 0)
        assert macs < 0.06 * whole_macs       # before: 0.17 - 0.2
    g = torch.randn(stem(x).shape, dtype=torch.float64)
    for cuts in ([0, oh - 3, oh], [0, oh - 2, oh - 1, oh]):
        _bands_sum_to_the_whole(sm, x, g, cuts, cached)


@pytest.mark.parametrize("rows, match", [
    ([3, 3, 0, 45], "not a non-empty range"),
    ([0, 999, 0, 45], "not a non-empty range"),
    ([-1, 2, 0, 45], "not a non-empty range"),
    ([3, 8], "4 entries"),
    ([3, 8, 0, 30], "cannot hold rows"),
    ([3, 8, -1, 45], "cannot hold rows"),
    ([3, 8, 10, 55], "read image rows"),
    ([0, 1, 2**63 - 1, 45], "cannot hold rows"),         # image_row0 + rows overflowed
    ([0, 1, 2**63 - 40, 2**63 - 1], "image_height = .* must be in"),
])
def test_rows_ops_bad_ranges(rows, match):
    sm, x, params = _setup()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.streamcnn.forward_rows(x, params, sm.program, sm.tile_size, rows)
    y = torch.zeros(2, 5, 5, 10, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.streamcnn.backward_rows(y, x, params, sm.program, sm.tile_size,
                                          [True] * (1 + len(params)), rows)


def test_rows_double_backward_refused():
    sm, x, params = _setup()
    ps = [p.detach().requires_grad_() for p in params]
    y = torch.ops.streamcnn.forward_rows(x, ps, sm.program, sm.tile_size, [0, 3, 0, 45])
    (g,) = torch.autograd.grad(y.sum(), ps[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_balanced_bands():
    from streamcnn.distributed import balanced_bands
    sm, _, _ = _setup()
    oh = streamcnn.tiling_info(sm.program, 301, 37, sm.tile_size)[0]
    for n in (1, 2, 3, 5):
        bands = balanced_bands(sm.program, 301, 37, sm.tile_size, n)
        assert len(bands) == n and bands[0][0] == 0 and bands[-1][1] == oh
        assert all(bands[k][1] == bands[k + 1][0] for k in range(n - 1))
        costs = [streamcnn.band_info(sm.program, 301, 37, sm.tile_size, b)[3] for b in bands]
        # no band costs more than an equal split's largest (the bisection
        # minimises the largest band's work)
        step = -(-oh // n)
        even = [(k * step, min(oh, (k + 1) * step)) for k in range(n)]
        even_max = max(streamcnn.band_info(sm.program, 301, 37, sm.tile_size, b)[3]
                       for b in even if b[1] > b[0])
        assert max(costs) <= even_max * (1 + 1e-6)
    assert balanced_bands(sm.program, 7, 29, sm.tile_size, 4)[2:] == [(2, 2), (2, 2)]


def test_row_plans_cover_every_row_once():
    """The training app's RowPlans: the ranks' sum ranges are disjoint and
    cover the image; each lies inside its rank's read, and the reads hold
    the cones (rows_needed) they were made from."""
    from streamcnn.app.tile_parallel import plans_of
    cases = [[(0, 40), (30, 70), (60, 90)],          # overlapping cones
             [(0, 40), (45, 70)],                    # a gap (widened)
             [(0, 30), (0, 0), (25, 60), (0, 0)],    # empty bands
             [(3, 50)]]                              # rows above and below the cone
    for needed in cases:
        plans = plans_of(needed, 100, 64)
        covered = []
        for (a, b), p in zip(needed, plans):
            if b <= a:
                assert p.read == p.sums == (0, 0)
                continue
            assert p.read[0] <= a and b <= p.read[1]
            assert p.read[0] <= p.sums[0] <= p.sums[1] <= p.read[1]
            covered += list(range(*p.sums))
        assert covered == list(range(100)), needed
    with pytest.raises(ValueError, match="no rank"):
        plans_of([(0, 0)], 10, 10)


def _worker_app_rows(rank, path):
    """The app's TileParallelNet on rows dicts (each rank reads its
    RowPlan's rows, colour jitter from the all-reduced sums) == the whole
    augmented image through the StreamingModule in one process; and the
    bands under autocast (bfloat16 on the CPU) == StreamingModule under the
    same autocast."""
    _init(rank, 2, path)
    from streamcnn.app.common import Dist
    from streamcnn.app.tile_parallel import Grid, TileParallelNet, row_plans
    from streamcnn.data import Augment
    from streamcnn.distributed import TileParallel
    try:
        torch.manual_seed(0)
        stem = _random_stem()
        sm = streamcnn.StreamingModule(stem, 22, mean=[120.0, 110.0, 100.0],
                                       std=[50.0, 60.0, 55.0])

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = sm
                self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                          nn.Linear(5, 2)).double()

        model = Model()
        grid = Grid(2, None, 0, Dist(0, 1, 0, None), torch.device("cpu"))
        h = w = 41
        net = TileParallelNet(model, grid, h)
        plans = row_plans(TileParallel(sm), h, w)
        assert net.plans == plans and net.plan == plans[rank]
        aug = Augment()
        g = torch.Generator().manual_seed(3)
        for k in range(4):
            img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
            d = aug.draw(h, w, torch.Generator().manual_seed(k))
            whole = aug(img, torch.Generator().manual_seed(k))
            for p in model.parameters():
                p.grad = None
            ref = model.head(sm(whole[None]))
            ref.sum().backward()
            ref_grads = [p.grad.clone() for p in model.parameters()]
            for p in model.parameters():
                p.grad = None
            plan = plans[rank]
            a, b = plan.read
            x, y, bw, bh = d.source_box(h, w, (a, b))
            part = Augment.geometry(img[:, y:y + bh, x:x + bw], d)
            s0, s1 = plan.sums
            item = {"part": part[None], "draw": d.as_tensor()[None],
                    "sums": part[:, s0 - a:s1 - a].sum((1, 2))[None]}
            out = net(item)
            assert rel_err(out, ref) < TOL, (k, rel_err(out, ref))
            out.sum().backward()
            for p, r in zip(model.parameters(), ref_grads):
                assert rel_err(p.grad, r) < TOL, (k, rel_err(p.grad, r))
        # autocast: bfloat16 bands, float32 parameters' gradients
        sm32 = streamcnn.StreamingModule(_random_stem().float(), 22)
        tp = TileParallel(sm32)
        x = torch.randn(1, 3, 45, 37)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y1 = sm32(x)
            y2 = tp(x)
        assert y1.dtype == y2.dtype == torch.bfloat16
        assert (y1.float() - y2.float()).abs().max() <= 0.02 * y1.float().abs().max()
        g1 = torch.autograd.grad(y1.float().square().sum(), list(sm32.parameters()))
        g2 = torch.autograd.grad(y2.float().square().sum(), list(sm32.parameters()))
        for a1, a2 in zip(g1, g2):
            assert a2.dtype == torch.float32
            assert rel_err(a2, a1) < 0.05, rel_err(a2, a1)
        _done()
    finally:
        dist.destroy_process_group()


def test_app_rows_and_autocast(tmp_path):
    _spawn(_worker_app_rows, 2, tmp_path)
