"""Halo caching (forward_cached / backward_cached, StreamingModule's
halo_cache): every value computed once, the halos (bands above a row of
tiles, strips left of a tile) kept from the forward for the backward and
their gradients passed up and to the left. Exactness against the cone-recompute ops and whole-image autograd,
the strips' size, the multiply-adds actually executed, and bad strips."""

import random

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err
from test_equivalence import _valid_size, random_stem


def _ops_grads(sm, x, params, g, cached):
    mask = [x.requires_grad] + [p.requires_grad for p in params]
    x, params = x.detach(), [p.detach() for p in params]
    if cached:
        y, strips = torch.ops.streamcnn.forward_cached(x, params, sm.program, sm.tile_size)
        grads = torch.ops.streamcnn.backward_cached(g, strips, x, params, sm.program,
                                                    sm.tile_size, mask)
    else:
        y = torch.ops.streamcnn.forward(x, params, sm.program, sm.tile_size)
        grads = torch.ops.streamcnn.backward(g, x, params, sm.program, sm.tile_size, mask)
    return y, grads


@pytest.mark.parametrize("seed", [*range(24), *(f"cat{i}" for i in range(8))])
def test_cached_ops_equal_cone_recompute_random_stems(seed):
    """Thin tiles (the receptive field: halos reach back over several row
    tiles), wide and tall ones, batch 1 and 3, float64. The "cat" seeds:
    stems with joins along the channels (the cat instruction)."""
    if isinstance(seed, str):
        seed = 600 + int(seed[3:])
        stem = random_stem(seed, cat=True)
    else:
        stem = random_stem(seed)
    rng = random.Random(7000 + seed)
    size = _valid_size(stem, rng, 1, 48) or _valid_size(stem, rng, 48, 120)
    assert size is not None
    sm = streamcnn.StreamingModule(stem, 10**6, in_channels=3)
    rf = sm.receptive_field
    x = torch.randn(rng.choice([1, 3]), 3, *size, dtype=torch.float64, requires_grad=True)
    params = sm.stream_params()
    for tile in [rf, (rf[0] + rng.randint(1, 7), 10**6), (10**6, rf[1] + 2)]:
        sm.tile_size = list(tile)
        y0 = torch.ops.streamcnn.forward(x.detach(), [p.detach() for p in params],
                                         sm.program, sm.tile_size)
        g = torch.randn_like(y0)
        y1, a = _ops_grads(sm, x, params, g, False)
        y2, b = _ops_grads(sm, x, params, g, True)
        assert torch.equal(y1, y2)
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert rel_err(v, u) <= 1e-12, (tile, rel_err(v, u))


def _resnet_stem():
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18()
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2).eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    return stem


def test_macs_executed_each_value_once():
    """The counters of the C core: a cached forward executes exactly the
    modelled multiply-adds (work()['macs_cached']), which are the
    whole-image ones: nothing is computed twice; a training step executes
    them twice (forward, recompute) and each gradient once."""
    stem = _resnet_stem().double()
    h, w = 448, 320
    x = torch.randn(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    for tile, hc in [((150, 180), True), ((150, 180), False), ((130, 4096), True)]:
        sm = streamcnn.StreamingModule(stem, tile, halo_cache=hc)
        work = sm.work(h, w)
        streamcnn.macs_executed(reset=True)
        with torch.no_grad():
            sm(x)
        fwd = streamcnn.macs_executed(reset=True)
        assert fwd[0] == work["macs_cached"]  # the forward op always caches
        sm(x).sum().backward()
        step = streamcnn.macs_executed(reset=True)
        if hc:
            assert step == (2 * work["macs_cached"], work["macs_cached"], work["macs_cached"])
        else:  # the cone backward recomputes overlaps (and more, in pieces)
            assert step[0] > work["macs_cached"] + work["macs_streamed"] * 0.99
        assert work["macs_cached"] == work["macs_whole"]
        assert work["recompute_cached"] == 1.0
        assert work["macs_cached"] < work["macs_streamed"]


def test_macs_counted_on_any_thread():
    """The counters are process-wide: autograd runs a CUDA backward on a
    device thread of its own, and its multiply-adds count all the same
    (here: a forward and backward on another thread, read on this one)."""
    import threading
    stem = _resnet_stem().double()
    x = torch.randn(1, 3, 256, 200, dtype=torch.float64)
    sm = streamcnn.StreamingModule(stem, 128)
    work = sm.work(256, 200)
    streamcnn.macs_executed(reset=True)
    t = threading.Thread(target=lambda: sm(x).sum().backward())
    t.start()
    t.join()
    got = streamcnn.macs_executed(reset=True)
    assert got[0] == 2 * work["macs_cached"] and got[2] == work["macs_cached"], (got, work)
    assert streamcnn.macs_executed() == (0.0, 0.0, 0.0)


def test_strips_size_matches_work_info_and_fake():
    stem = _resnet_stem()
    sm = streamcnn.StreamingModule(stem, (120, 150))
    x = torch.randn(2, 3, 301, 277)
    params = [p.detach() for p in sm.stream_params()]
    y, strips = torch.ops.streamcnn.forward_cached(x, params, sm.program, sm.tile_size)
    assert strips.dim() == 1 and strips.dtype == torch.float32
    assert strips.numel() == 2 * sm.work(301, 277)["strip_elements"] > 0
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fp = [mode.from_tensor(p) for p in params]
        fy, fs = torch.ops.streamcnn.forward_cached(fx, fp, sm.program, sm.tile_size)
    assert fy.shape == y.shape and fs.shape == strips.shape
    # one tile: no halos, no strips
    _, none = torch.ops.streamcnn.forward_cached(x, params, sm.program, [4096, 4096])
    assert none.numel() == 0


def _small():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 5, 3, stride=2),
                         nn.AvgPool2d(2, 1, count_include_pad=False, padding=1)).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return streamcnn.StreamingModule(stem, 14)


def test_opcheck_forward_cached():
    sm = _small()
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.streamcnn.forward_cached.default,
                          (x, sm.stream_params(), sm.program, sm.tile_size))


def _cached_call(*shape):
    """A small stem's forward_cached on a random image: sm, x, params, strips
    and a random output gradient."""
    sm = _small()
    x = torch.randn(*shape, dtype=torch.float64)
    params = [p.detach() for p in sm.stream_params()]
    y, strips = torch.ops.streamcnn.forward_cached(x, params, sm.program, sm.tile_size)
    return sm, x, params, strips, torch.randn_like(y)


def test_opcheck_backward_cached():
    sm, x, params, strips, g = _cached_call(2, 3, 23, 19)
    mask = [True] + [i % 2 == 0 for i in range(len(params))]
    torch.library.opcheck(torch.ops.streamcnn.backward_cached.default,
                          (g, strips, x, params, sm.program, sm.tile_size, mask))


def test_bad_strips_raise():
    sm, x, params, strips, g = _cached_call(1, 3, 40, 37)
    mask = [True] + [False] * len(params)
    bad = [strips[:-1], strips.float(), strips.reshape(1, -1), torch.cat([strips, strips]),
           strips[::2]]
    for s in bad:
        with pytest.raises(RuntimeError, match="strips must be the second output"):
            torch.ops.streamcnn.backward_cached(g, s, x, params, sm.program, sm.tile_size, mask)
    # strips of another tiling
    _, other = torch.ops.streamcnn.forward_cached(x, params, sm.program, [20, 14])
    if other.numel() != strips.numel():
        with pytest.raises(RuntimeError, match="strips"):
            torch.ops.streamcnn.backward_cached(g, other, x, params, sm.program,
                                                sm.tile_size, mask)


def test_module_chooses_the_op():
    sm = _small()
    x = torch.randn(1, 3, 40, 37, dtype=torch.float64, requires_grad=True)
    assert "forward_cached" in type(sm(x).grad_fn).__name__
    with torch.no_grad():
        assert sm(x).grad_fn is None
    sm.halo_cache = False
    assert "forward_cached" not in type(sm(x).grad_fn).__name__
    off = streamcnn.StreamingModule(sm.stem, 14, halo_cache=False)
    on = streamcnn.StreamingModule(sm.stem, 14)
    g = torch.randn(1, 5, 11, 10, dtype=torch.float64)
    a = torch.autograd.grad(off(x), [x] + list(sm.stem.parameters()), g)
    b = torch.autograd.grad(on(x), [x] + list(sm.stem.parameters()), g)
    for u, v in zip(a, b):
        assert rel_err(v, u) <= 1e-12


def test_uint8_normalised_image_cached():
    """uint8 tiles converted and normalised per tile; the halos are of the
    computed values (the image itself has none)."""
    stem = _resnet_stem()
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 55.0]
    img = torch.randint(0, 256, (1, 3, 257, 203), dtype=torch.uint8)
    ref_x = (img.double() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    stem64 = stem.double()
    sm = streamcnn.StreamingModule(stem64, (110, 130), mean=mean, std=std)
    y = sm(img)
    y_ref = stem64(ref_x)
    g = torch.randn_like(y_ref)
    ps = list(stem64.parameters())
    a = torch.autograd.grad(y, ps, g)
    b = torch.autograd.grad(y_ref, ps, g)
    assert rel_err(y, y_ref) < 1e-12
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-10


def test_first_cached_tile_is_smaller():
    """With halo caching the first tile along an axis reads its whole cone
    and the others their own part and a thin halo: the first is shrunk (as
    many tiles) so that it reads about as much as the next. Cone tiles are
    all output_tile but the last. The split covers the output exactly."""
    tv = pytest.importorskip("torchvision")
    r = tv.models.resnet34(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2,
                         r.layer3).eval()
    sm = streamcnn.StreamingModule(stem, 1920)
    t = sm.tiling(8192, 8192)
    assert t["tiles"] == (6, 6) and t["output_tile"] == (86, 86)
    assert t["row_bounds"] == [0, 72, 160, 248, 336, 424, 512] == t["col_bounds"]
    sm.halo_cache = False
    t = sm.tiling(8192, 8192)
    assert t["row_bounds"] == [0, 86, 172, 258, 344, 430, 512]
    for size, tile in [(600, 547), (1000, 999), (2048, 700), (2555, 4096)]:
        for cached in (True, False):
            sm = streamcnn.StreamingModule(stem, tile, halo_cache=cached)
            t = sm.tiling(size, size + 37)
            for a, b in enumerate([t["row_bounds"], t["col_bounds"]]):
                n, out, edge = t["tiles"][a], t["output"][a], t["output_tile"][a]
                steps = [hi - lo for lo, hi in zip(b, b[1:])]
                assert len(b) == n + 1 and b[0] == 0 and b[-1] == out
                assert min(steps) >= 1 and steps[0] <= edge
                if cached and n > 1:  # the others of one size, the last the rest
                    assert len(set(steps[1:-1])) <= 1 and steps[-1] <= max(steps[1:]) \
                        or max(steps[1:]) - min(steps[1:]) <= 1
                else:
                    assert steps[:-1] == [edge] * (n - 1)


def test_balanced_cached_tiles_are_exact():
    """The shrunk first tiles through a 2-D cached step, float64."""
    tv = pytest.importorskip("torchvision")
    r = tv.models.resnet18(weights=None)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(3))
    sm = streamcnn.StreamingModule(stem, 160)
    t = sm.tiling(420, 390)
    assert t["row_bounds"][1] < t["output_tile"][0]  # the first tile was shrunk
    x = torch.randn(1, 3, 420, 390, dtype=torch.float64, requires_grad=True)
    y, y_ref = sm(x), stem(x)
    g = torch.randn_like(y_ref)
    ps = [x] + list(stem.parameters())
    for a, b in zip(torch.autograd.grad(y, ps, g), torch.autograd.grad(y_ref, ps, g)):
        assert rel_err(a, b) < 1e-10
    assert rel_err(y, y_ref) < 1e-12
