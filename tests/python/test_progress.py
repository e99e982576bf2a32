"""progress=True: per-tile progress on stderr for the forward and the
backward it leads to; off by default and in TorchScript."""

import torch
import torch.nn as nn

import streamcnn


def _stem():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def test_progress_reports_every_phase(capsys):
    sm = streamcnn.StreamingModule(_stem(), 24, progress=True)
    n = sm.tiling(90, 70)["tiles"]
    x = torch.randn(1, 3, 90, 70, requires_grad=True)
    y = sm(x)
    err = capsys.readouterr().err
    total = n[0] * n[1]
    assert f"streamcnn forward: {total}/{total} tiles" in err and err.endswith("\n")
    y.sum().backward()
    err = capsys.readouterr().err
    assert f"streamcnn backward: {total}/{total} tiles" in err
    # the same results as without progress
    plain = streamcnn.StreamingModule(sm.stem, 24)
    assert torch.equal(plain(x), y)
    assert not streamcnn.progress.enabled()


def test_no_progress_by_default_or_when_scripted(capsys):
    sm = streamcnn.StreamingModule(_stem(), 24)
    sm(torch.randn(1, 3, 50, 50)).sum()
    assert capsys.readouterr().err == ""
    scripted = torch.jit.script(streamcnn.StreamingModule(_stem(), 24, progress=True))
    scripted(torch.randn(1, 3, 50, 50))
    assert capsys.readouterr().err == ""


def test_progress_block_for_raw_ops(capsys):
    sm = streamcnn.StreamingModule(_stem(), 24)
    x = torch.randn(2, 3, 40, 40)
    with streamcnn.progress.show():
        torch.ops.streamcnn.forward(x, sm.stream_params(), sm.program, sm.tile_size)
    assert "streamcnn forward:" in capsys.readouterr().err
    torch.ops.streamcnn.forward(x, sm.stream_params(), sm.program, sm.tile_size)
    assert capsys.readouterr().err == ""


def test_deterministic_sets_cudnn_flags_for_forward_and_backward():
    """deterministic=True: the ops (forward and the backward it leads to)
    run with cuDNN's deterministic algorithms; the flags are restored after;
    results repeat bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "streamcnn" in str(func):
                seen.append((str(func), torch.backends.cudnn.deterministic,
                             torch.backends.cudnn.benchmark))
            return func(*args, **(kwargs or {}))

    sm = streamcnn.StreamingModule(_stem(), 24, deterministic=True)
    x = torch.randn(1, 3, 60, 50, requires_grad=True)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with Spy():
        y = sm(x)
        y.square().sum().backward()
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before
    assert [s[0].split(".")[1] for s in seen] == ["forward_cached", "backward_cached"]
    assert all(det and not bench for _, det, bench in seen)
    g1 = x.grad.clone()
    x.grad = None
    y2 = sm(x)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, g1)
