"""Bad inputs: each one a clear exception naming what is wrong; the process
lives on and nothing leaks."""

import random
import resource

import pytest
import torch
import torch.nn as nn

import streamcnn
from streamcnn import program as P


def _stem():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 2, 3)).eval()


def _sm(tile=16):
    return streamcnn.StreamingModule(_stem(), tile)


# ---- StreamingModule construction --------------------------------------------


@pytest.mark.parametrize("tile", [0, -5, (0, 8), (8, -1)])
def test_tile_not_positive(tile):
    with pytest.raises(ValueError, match="tile_size must be positive"):
        _sm(tile)


@pytest.mark.parametrize("tile", [2**31 + 1, (8, 2**62)])
def test_tile_too_large(tile):
    with pytest.raises(ValueError, match=r"tile_size must be at most 2147483648"):
        _sm(tile)


@pytest.mark.parametrize("tile", [1.5, "16", (8, 8, 8), True, (8.5, 8), torch.tensor(16.0)])
def test_tile_wrong_type(tile):
    with pytest.raises((TypeError, ValueError), match="tile_size"):
        _sm(tile)


def test_parameter_removed_after_construction():
    stem = _stem()
    sm = streamcnn.StreamingModule(stem, 16)
    stem[0].bias = None
    with pytest.raises(ValueError, match=r"stem's 0\.bias is None"):
        sm(torch.randn(1, 3, 20, 20))


def test_mean_std_not_numbers():
    for kw in (dict(mean="abc"), dict(std=[1.0, "x", 2.0]), dict(mean=[[1.0, 2.0], [3.0]])):
        with pytest.raises(TypeError, match="mean and std must be numbers"):
            streamcnn.StreamingModule(_stem(), 16, **kw)


def test_tile_integer_like():
    """Integers of other types, as PyTorch's own size arguments take them."""
    np = pytest.importorskip("numpy")
    for tile in (np.int64(16), torch.tensor(16), (np.int32(16), 12)):
        sm = _sm(tile)
        assert sm.tile_size == ([16, 16] if not isinstance(tile, tuple) else [16, 12])
        assert all(type(t) is int for t in sm.tile_size)


def test_tile_smaller_than_receptive_field():
    # conv3 -> maxpool2 -> conv3: 3 + 1 + 2 * 2 = 8 rows and cols
    assert _sm().receptive_field == (8, 8)
    with pytest.raises(ValueError, match=r"minimum tile_size for this stem is 8 x 8"):
        _sm(7)
    with pytest.raises(ValueError, match=r"minimum tile_size for this stem is 8 x 8"):
        _sm((8, 7))
    _sm(8)  # exactly the receptive field works


def test_repr_of_a_module_whose_constructor_raised():
    """A traceback (pytest's, a debugger's) shows the half-built self: its
    repr must not raise an AttributeError of its own."""
    for bad in (7, (8, 7)):
        with pytest.raises(ValueError, match="minimum tile_size") as info:
            _sm(bad)
        tb = info.tb
        while tb is not None and "self" not in tb.tb_frame.f_locals:
            tb = tb.tb_next
        half = tb.tb_frame.f_locals["self"]
        assert isinstance(half, streamcnn.StreamingModule)
        assert "StreamingModule(<not built>)" in repr(half)
    assert "tile_size=(8, 8)" in repr(_sm(8))


def test_train_mode_batchnorm():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # training mode
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' \(fx node '_1'\).*freeze it: call \.eval\(\)"):
        streamcnn.StreamingModule(stem, 16)


def test_batchnorm_without_running_stats():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        streamcnn.StreamingModule(stem.eval(), 16)


def test_dropout_in_training_mode():
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.2))
    with pytest.raises(ValueError, match=r"Dropout.*call \.eval\(\)"):
        streamcnn.StreamingModule(stem, 16)


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


class _MeanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("stem, node", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)), "AdaptiveAvgPool2d '1'.*not local"),
    (_Pooled(), "torch.flatten \\(fx node 'flatten'\\).*not local"),
    (_MeanHead(), "method .mean\\(\\) \\(fx node 'mean'\\).*not local"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)),
     "Upsample.*upsampling is not supported"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU()), "ELU '1'.*not supported"),
    (nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), "ConvTranspose2d.*not supported"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, return_indices=True)), "return_indices"),
])
def test_unsupported_nodes(stem, node):
    with pytest.raises(ValueError, match=node):
        streamcnn.StreamingModule(stem.eval(), 64)


def test_constant_add_and_untraceable():
    class AddConst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) + 1.0

    with pytest.raises(ValueError, match="adding a constant"):
        streamcnn.StreamingModule(AddConst(), 8)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx could not trace"):
        streamcnn.StreamingModule(Branchy(), 8)
    with pytest.raises(TypeError, match="nn.Module"):
        streamcnn.StreamingModule(lambda x: x, 8)


# ---- calls ---------------------------------------------------------------------------


def test_wrong_channels():
    sm = _sm()
    with pytest.raises(ValueError, match="expects 3 channels, the image has 4"):
        sm(torch.randn(1, 4, 20, 20))
    with pytest.raises(RuntimeError, match="expects 3 input channels, the image has 4"):
        torch.ops.streamcnn.forward(torch.randn(1, 4, 20, 20), sm.stream_params(), sm.program,
                                    sm.tile_size)


@pytest.mark.parametrize("shape", [(3, 20, 20), (1, 1, 3, 20, 20), (20,)])
def test_wrong_rank(shape):
    sm = _sm()
    with pytest.raises(ValueError, match="N x C x H x W"):
        sm(torch.randn(shape))
    with pytest.raises(RuntimeError, match="4-D N x C x H x W"):
        torch.ops.streamcnn.forward(torch.randn(shape), sm.stream_params(), sm.program,
                                    sm.tile_size)


def test_dtype_mismatch():
    sm = _sm()
    with pytest.raises(TypeError, match="image is torch.float64 but the stem's parameters are "
                                        "torch.float32"):
        sm(torch.randn(1, 3, 20, 20, dtype=torch.float64))
    # one parameter in another dtype is named (it said "the stem's parameters
    # are float64" of a float32 stem with one float64 convolution)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    stem[2].double()
    with pytest.raises(TypeError, match=r"image is torch.float32 but the stem's '2.weight' is "
                                        r"torch.float64: its parameters and the image must "
                                        r"share a dtype \(module.to\(torch.float32\)\)"):
        streamcnn.StreamingModule(stem, 16)(torch.randn(1, 3, 20, 20))
    with pytest.raises(RuntimeError, match=r"params\[0\] \(weight of instruction 0, conv\) is "
                                           "float32 but the image is float64"):
        torch.ops.streamcnn.forward(torch.randn(1, 3, 20, 20, dtype=torch.float64),
                                    sm.stream_params(), sm.program, sm.tile_size)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_unsupported_image_dtype(dtype):
    sm = _sm()
    x = torch.zeros(1, 3, 20, 20, dtype=dtype)
    with pytest.raises(TypeError, match="uint8, float16, bfloat16, float32 or float64"):
        sm(x)
    with pytest.raises(RuntimeError, match="uint8, float16, bfloat16, float32 or float64"):
        torch.ops.streamcnn.forward(x, sm.stream_params(), sm.program, sm.tile_size)


def test_image_too_small():
    sm = _sm()
    with pytest.raises(ValueError, match="too small"):
        sm(torch.randn(1, 3, 3, 20))
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.streamcnn.forward(torch.randn(1, 3, 3, 20), sm.stream_params(), sm.program,
                                    sm.tile_size)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="expected a tensor"):
        _sm()([1, 2, 3])


def test_sparse_image_or_parameter():
    sm = _sm()
    x = torch.randn(1, 3, 20, 20)
    with pytest.raises(TypeError, match=r"dense \(strided\) tensor, got torch.sparse_coo"):
        sm(x.to_sparse())
    ps = sm.stream_params()
    with pytest.raises(RuntimeError, match=r"the image tensor must be a dense \(strided\)"):
        torch.ops.streamcnn.forward(x.to_sparse(), ps, sm.program, sm.tile_size)
    bad = [ps[0].detach().to_sparse()] + ps[1:]
    with pytest.raises(RuntimeError, match=r"params\[0\] must be a dense \(strided\)"):
        torch.ops.streamcnn.forward(x, bad, sm.program, sm.tile_size)


def test_batchnorm_switched_to_train_after_wrapping():
    sm = _sm()
    sm.stem[1].train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) was switched to training mode"):
        sm(torch.randn(1, 3, 20, 20))


def test_raw_op_bad_params():
    sm = _sm()
    x = torch.randn(1, 3, 20, 20)
    params = sm.stream_params()
    with pytest.raises(RuntimeError, match="indexes 8 parameter tensors but 7 were given"):
        torch.ops.streamcnn.forward(x, params[:-1], sm.program, sm.tile_size)
    bad = list(params)
    bad[0] = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"params\[0\] .* has shape \[4, 3, 5, 5\], expected "
                                           r"\[4, 3, 3, 3\]"):
        torch.ops.streamcnn.forward(x, bad, sm.program, sm.tile_size)
    bad[0] = params[0]
    bad[4] = torch.randn(5)  # running_mean
    with pytest.raises(RuntimeError, match=r"params\[4\] \(running_mean of instruction 1, batchnorm\)"):
        torch.ops.streamcnn.forward(x, bad, sm.program, sm.tile_size)


def test_raw_op_bad_tile_and_grad():
    sm = _sm()
    x = torch.randn(1, 3, 20, 20)
    ps = sm.stream_params()
    for tile in ([], [1, 2, 3]):
        with pytest.raises(RuntimeError, match="tile_size must have 1 or 2 entries"):
            torch.ops.streamcnn.forward(x, ps, sm.program, tile)
    for tile in ([0], [16, -1], [2**62], [16, 2**31 + 1]):
        with pytest.raises(RuntimeError, match=r"tile_size must be in \[1, 2147483648\]"):
            torch.ops.streamcnn.forward(x, ps, sm.program, tile)
    with pytest.raises(RuntimeError, match="minimum tile_size for this stem is 8 x 8"):
        torch.ops.streamcnn.forward(x, ps, sm.program, [7, 7])
    y = sm(x)
    mask = [True] * (len(ps) + 1)
    with pytest.raises(RuntimeError, match="grad_output must have the stem output's shape"):
        torch.ops.streamcnn.backward(torch.randn(1, 2, 5, 5), x, ps, sm.program, sm.tile_size,
                                     mask)
    with pytest.raises(RuntimeError, match="grad_output must have the image's dtype"):
        torch.ops.streamcnn.backward(torch.randn_like(y).double(), x, ps, sm.program,
                                     sm.tile_size, mask)
    with pytest.raises(RuntimeError, match="output_mask has 3 entries, expected 9"):
        torch.ops.streamcnn.backward(torch.randn_like(y), x, ps, sm.program, sm.tile_size,
                                     [True] * 3)


def _rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _statm_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def test_malformed_programs_raise_and_do_not_leak():
    """Random integer lists and mutations of a valid program: RuntimeError
    (or a valid result), never a crash; memory stays flat."""
    sm = _sm()
    x = torch.randn(1, 3, 20, 20)
    ps = sm.stream_params()
    valid = list(sm.program)
    rng = random.Random(0)

    def attempt(prog, params):
        try:
            torch.ops.streamcnn.forward(x, params, prog, [16, 16])
            return True
        except RuntimeError as e:
            assert str(e).startswith("streamcnn: "), str(e)
            return False

    def round_(n):
        ok = 0
        for i in range(n):
            if i % 3 == 0:
                prog = [rng.randint(-3, 40) for _ in range(rng.randint(0, 60))]
                if prog and rng.random() < 0.5:
                    prog[:2] = [P.MAGIC, P.VERSION]
            else:
                prog = list(valid)
                for _ in range(rng.randint(1, 3)):
                    j = rng.randrange(len(prog))
                    prog[j] = rng.choice([rng.randint(-2, 20), prog[j] + 1, prog[j] - 1,
                                          rng.randint(-2**63, 2**63 - 1)])
                if rng.random() < 0.1:
                    prog = prog[:rng.randrange(len(prog))]
            params = ps if rng.random() < 0.8 else ps[:rng.randrange(len(ps) + 1)]
            ok += attempt(prog, params)
        return ok

    round_(300)  # warm up allocator caches
    uses = [t._use_count() for t in [x, *ps]]
    before = _statm_kb()
    accepted = round_(3000)
    after = _statm_kb()
    assert accepted < 3000
    # every tensor handle the kernels received was released, on every path
    assert [t._use_count() for t in [x, *ps]] == uses
    assert after - before < 20_000, f"resident memory grew by {after - before} kB"


def test_hooks_of_the_stem_are_refused():
    """Hooks of the stem's modules are not called when it is streamed (its
    layers run as one program): refused naming the module and the hook, at
    construction and at a call after one was added (a forward hook's change
    of the output was silently lost, a capture stayed empty); the old
    hook-based weight_norm gets the parametrization to use; a hook on the
    StreamingModule itself works; global module hooks are a warning."""
    def stem():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()

    x = torch.randn(1, 3, 24, 24)
    s = stem()
    s[1].register_forward_hook(lambda m, i, o: o * 0.5)
    with pytest.raises(ValueError, match=r"module '1' \(ReLU\) has a forward hook: hooks of "
                                         r"the stem's modules are not called"):
        streamcnn.StreamingModule(s, 16)
    s = stem()
    s.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(ValueError, match=r"module '\(the stem\)' \(Sequential\) has a forward "
                                         "pre-hook"):
        streamcnn.StreamingModule(s, 16)
    s = stem()
    sm = streamcnn.StreamingModule(s, 16)
    handle = s[2].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(ValueError, match=r"module '2' \(Conv2d\) has a backward hook"):
        sm(x)
    handle.remove()
    seen = []
    sm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert sm(x).shape == seen[0]
    s = stem()
    torch.nn.utils.weight_norm(s[0])
    with pytest.raises(ValueError, match="use torch.nn.utils.parametrizations.weight_norm"):
        streamcnn.StreamingModule(s, 16)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.warns(UserWarning, match="global module hooks"):
            streamcnn.StreamingModule(stem(), 16)
    finally:
        handle.remove()


def test_layers_changed_after_construction_are_refused():
    """The program keeps the layers as they were read: a layer setting
    changed, or a module replaced, after construction is refused at the
    next call naming it (a new eps or stride was silently ignored);
    parameters, modes, copies and saved states are not such changes."""
    import copy
    import io

    def stem():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()

    x = torch.randn(1, 3, 20, 20)
    s = stem()
    sm = streamcnn.StreamingModule(s, 12)
    s[1].eps = 0.5
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) changed eps from 1e-05 to 0.5 "
                                         "after this StreamingModule was built; build a new"):
        sm(x)
    s[1].eps = 1e-5
    s[0].stride = (2, 2)
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\) changed stride from \(1, 1\) to "
                                         r"\(2, 2\)"):
        sm(x)
    s[0].stride = (1, 1)
    s[2] = nn.GELU()
    with pytest.raises(ValueError, match=r"module '2' was replaced \(ReLU by GELU\)"):
        sm(x)
    s[2] = nn.ReLU()               # inplace differs: it changes nothing streamed
    s[1].momentum = 0.01           # nor does a frozen batch norm's momentum
    sm(x)
    kept = s[0].weight
    s[0].weight = nn.Parameter(torch.randn(4, 3, 5, 5))   # the C core named params[0]
    with pytest.raises(ValueError, match=r"the stem's '0.weight' has shape \[4, 3, 5, 5\], "
                                         r"\[4, 3, 3, 3\] when this StreamingModule was built"):
        sm(x)
    s[0].weight = kept
    with torch.no_grad():
        s[0].weight.mul_(2)         # parameters are read at call time
    sm.train()
    sm.eval()
    torch.testing.assert_close(sm(x), s(x))
    twin = copy.deepcopy(sm)
    torch.testing.assert_close(twin(x), sm(x))
    buf = io.BytesIO()
    torch.save(sm, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), sm(x))


def test_options_of_the_wrong_type_are_refused():
    """A float in a tile pair is refused as a float alone is ((32.0, 32)
    was taken); flags must be bools (halo_cache=None, progress="yes" were
    taken); in_channels must be a positive int (0 said "cannot infer ...;
    pass in_channels=")."""
    with pytest.raises(TypeError, match=r"tile_size must be an int or a pair of ints, got "
                                        r"\(32.0, 32\)"):
        _sm((32.0, 32))
    for name, value in (("halo_cache", None), ("progress", "yes"), ("deterministic", 1)):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
            streamcnn.StreamingModule(_stem(), 16, **{name: value})
    for value in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=f"in_channels must be a positive int, got "
                                             f"{value!r}"):
            streamcnn.StreamingModule(nn.Sequential(nn.ReLU()), 16, in_channels=value)


def test_inputs_streamcnn_cannot_take_are_named():
    """A nested tensor, a StreamingModule inside the stem: one clear error
    each (an internal NestedTensorImpl error; fx's "expected a tensor, got
    Proxy"). Meta tensors give shapes, forward and backward, as PyTorch
    does (it was "unknown device type for autocast")."""
    sm = _sm()
    nested = torch.nested.nested_tensor([torch.randn(3, 20, 20), torch.randn(3, 24, 20)])
    with pytest.raises(TypeError, match="got a nested tensor: stream its images one by one"):
        sm(nested)
    with pytest.raises(ValueError, match=r"the stem holds a StreamingModule \('0'\): streams "
                                         "do not nest"):
        streamcnn.StreamingModule(nn.Sequential(_sm(), nn.ReLU()), 32)
    meta = streamcnn.StreamingModule(_stem(), 16).to("meta")
    x = torch.randn(1, 3, 40, 50, device="meta", requires_grad=True)
    y = meta(x)
    assert y.shape == _stem().to("meta")(x).shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_whole_image_tensor_larger_than_memory_is_named():
    """A stem output larger than the machine's memory: refused naming it
    and that no tile makes it smaller (it advised a smaller tile_size),
    without asking the allocator (whose failure torch's shim printed with
    a C++ backtrace on stderr)."""
    import subprocess
    import sys
    code = ("import torch, torch.nn as nn, streamcnn\n"
            "sm = streamcnn.StreamingModule(nn.Sequential(nn.Conv2d(3, 64, 3)).eval(), 256)\n"
            "x = torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, 100000, 100000)\n"
            "try:\n"
            "    with torch.no_grad():\n"
            "        sm(x)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("streamcnn: out of memory: could not allocate the stem "
                                 "output (1x64x99998x99998, 4-byte elements"), res.stdout
    assert "no tile_size or memory_budget makes smaller" in res.stdout
    assert "aoti_torch" not in res.stderr and "frame #" not in res.stderr, res.stderr[-2000:]
