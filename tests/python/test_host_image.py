"""An image in host memory, the stem on a CUDA device: each tile is streamed
to the device (read by the gather kernel directly when the image is pinned,
staged through a device copy when it is pageable). Needs a GPU: every test
here skips without one, saying so."""

import pytest
import torch
import torch.nn as nn

import streamcnn
from conftest import randomize_bn, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (none here)")


def _stem():
    stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3, padding=1)).eval()
    randomize_bn(stem, torch.Generator().manual_seed(0))
    return stem.double().cuda()


@cuda
@pytest.mark.parametrize("halo_cache", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_host_image_equals_device_image(pinned, dtype, layout, halo_cache):
    """Pinned dense images take the side-stream prefetch (NCHW and NHWC;
    the backward's tile order differs with and without halo caching),
    pageable ones the staged copy."""
    stem = _stem()
    mean, std = ([120.0, 110.0, 100.0], [60.0, 50.0, 55.0]) if dtype == torch.uint8 \
        else (None, None)
    sm = streamcnn.StreamingModule(stem, 64, mean=mean, std=std, halo_cache=halo_cache)
    g = torch.Generator().manual_seed(1)
    host = (torch.randint(0, 256, (2, 3, 301, 257), generator=g, dtype=torch.uint8)
            if dtype == torch.uint8 else torch.randn(2, 3, 301, 257, generator=g,
                                                     dtype=torch.float64))
    host = host.contiguous(memory_format=layout)
    if pinned:
        host = host.pin_memory()
        assert host.is_pinned()
    dev = host.cuda()
    y_host = sm(host)
    assert y_host.device.type == "cuda"
    y_dev = sm(dev)
    assert torch.equal(y_host, y_dev)
    gout = torch.randn_like(y_dev)
    a = torch.autograd.grad(y_host, list(stem.parameters()), gout)
    b = torch.autograd.grad(y_dev, list(stem.parameters()), gout)
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-12


@cuda
def test_host_image_has_no_gradient():
    sm = streamcnn.StreamingModule(_stem(), 64)
    x = torch.randn(1, 3, 80, 80, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="host memory"):
        sm(x)
    params = [p.detach() for p in sm.stream_params()]
    y = torch.ops.streamcnn.forward(x.detach(), params, sm.program, sm.tile_size)
    with pytest.raises(RuntimeError, match="host memory"):
        torch.ops.streamcnn.backward(torch.ones_like(y), x.detach(), params, sm.program,
                                     sm.tile_size, [True] + [False] * len(params))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_image_under_cuda_autocast(dtype):
    """The stem runs on the GPU, so autocast("cuda") applies to a uint8
    image in host memory as to one on the device (before, the host image's
    CPU device was asked and the stem ran in float32)."""
    stem = _stem().float()
    sm = streamcnn.StreamingModule(stem, 64, mean=[120.0, 110.0, 100.0],
                                   std=[60.0, 50.0, 55.0])
    g = torch.Generator().manual_seed(2)
    host = torch.randint(0, 256, (1, 3, 203, 187), generator=g, dtype=torch.uint8).pin_memory()
    with torch.autocast("cuda", dtype=dtype):
        y_host = sm(host)
        y_dev = sm(host.cuda())
    assert y_host.dtype == y_dev.dtype == dtype and y_host.device.type == "cuda"
    assert rel_err(y_host, y_dev) < 1e-3
    params = list(stem.parameters())
    grads = torch.autograd.grad(y_host.float().sum(), params)
    assert all(gr.dtype == torch.float32 for gr in grads)


@cuda
@pytest.mark.parametrize("halo_cache", [True, False])
def test_pinned_image_may_be_freed_when_the_call_returns(halo_cache):
    """The gather kernels read pinned pixels asynchronously; torch's host
    allocator hands a freed pinned block out again at once, knowing nothing
    of them. The call returns only after its last read from the image, so
    freeing it and refilling the block right away changes no result."""
    stem = _stem().float()
    sm = streamcnn.StreamingModule(stem, 96, halo_cache=halo_cache,
                                   mean=[120.0, 110.0, 100.0], std=[60.0, 50.0, 55.0])
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (1, 3, 1536, 1024), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        expected = sm(pixels.cuda())
        torch.cuda.synchronize()
        for _ in range(3):
            x = pixels.pin_memory()
            y = sm(x)  # queued; the last tiles may still be running
            del x
            reuse = torch.empty_like(pixels).pin_memory()  # likely the same block
            reuse.fill_(255)
            torch.cuda.synchronize()
            assert torch.equal(y, expected)
            del reuse


@cuda
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pinned", [True, False])
def test_host_band_from_a_later_row(pinned, layout, cached):
    """A tile-parallel rank's part of a uint8 image in host memory holds the
    image rows from image_row0 > 0 (its band's cone, as each rank reads its
    rows of the slide): the side-stream prefetch of a dense pinned part
    reads the part's rows, not the whole image's. The band's output and
    parameter gradients equal those of the same band of the image on the
    device, and the bands concatenate to the whole output."""
    stem = _stem()
    sm = streamcnn.StreamingModule(stem, 64, mean=[120.0, 110.0, 100.0],
                                   std=[60.0, 50.0, 55.0])
    g = torch.Generator().manual_seed(4)
    pixels = torch.randint(0, 256, (1, 3, 301, 257), generator=g, dtype=torch.uint8)
    params = [p.detach() for p in sm.stream_params()]
    tile, (h, w) = sm.tile_size, pixels.shape[2:]
    whole = torch.ops.streamcnn.forward(pixels.cuda(), params, sm.program, tile)
    mask = [False] + [True] * len(params)
    cuts = [0, 20, whole.shape[2]]
    outs = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        a, b = (int(v) for v in streamcnn.band_info(sm.program, h, w, tile, (lo, hi))[:2])
        rows = [lo, hi, a, h]
        part = pixels[:, :, a:b].contiguous(memory_format=layout)
        if pinned:
            part = part.pin_memory()
        dev = part.cuda()
        gout = torch.randn(1, whole.shape[1], hi - lo, whole.shape[3], generator=g,
                           dtype=torch.float64).cuda()
        if cached:
            y_host, s_host = torch.ops.streamcnn.forward_cached_rows(part, params, sm.program,
                                                                     tile, rows)
            y_dev, s_dev = torch.ops.streamcnn.forward_cached_rows(dev, params, sm.program,
                                                                   tile, rows)
            got = torch.ops.streamcnn.backward_cached_rows(gout, s_host, part, params,
                                                           sm.program, tile, mask, rows)
            want = torch.ops.streamcnn.backward_cached_rows(gout, s_dev, dev, params,
                                                            sm.program, tile, mask, rows)
        else:
            y_host = torch.ops.streamcnn.forward_rows(part, params, sm.program, tile, rows)
            y_dev = torch.ops.streamcnn.forward_rows(dev, params, sm.program, tile, rows)
            got = torch.ops.streamcnn.backward_rows(gout, part, params, sm.program, tile,
                                                    mask, rows)
            want = torch.ops.streamcnn.backward_rows(gout, dev, params, sm.program, tile,
                                                     mask, rows)
        assert y_host.device.type == "cuda" and torch.equal(y_host, y_dev), (lo, hi)
        for u, v in zip(got, want):
            assert rel_err(u, v) < 1e-12, (lo, hi)
        outs.append(y_host)
    assert rel_err(torch.cat(outs, 2), whole) < 1e-12


@cuda
@pytest.mark.parametrize("halo_cache", [True, False])
def test_host_image_sparse_backward(halo_cache):
    """A max-pool head's output gradient (a few non-zeros): the sparse
    backward recomputes boxes inside a tile's region, each reading its
    pixels from the tile's prefetched copy on the device, and the row
    pieces of a tile's backward read theirs from it too. The gradients equal
    those of the image on the device."""
    stem = _stem()
    sm = streamcnn.StreamingModule(stem, 64, mean=[120.0, 110.0, 100.0],
                                   std=[60.0, 50.0, 55.0], halo_cache=halo_cache)
    g = torch.Generator().manual_seed(5)
    host = torch.randint(0, 256, (2, 3, 333, 297), generator=g, dtype=torch.uint8).pin_memory()
    params = list(stem.parameters())
    grads, macs = [], []
    for x in (host, host.cuda()):
        streamcnn.macs_executed(reset=True)
        y = sm(x)
        loss = y.amax(dim=(2, 3)).sum()
        grads.append(torch.autograd.grad(loss, params))
        macs.append(streamcnn.macs_executed(reset=True))
    for u, v in zip(*grads):
        assert rel_err(u, v) < 1e-12
    assert macs[0] == macs[1]
