"""Layers as other libraries write them (timm's, torchvision.ops'): the
forms a timm backbone's stem is made of, written here as timm 1.0 writes
them (timm is not a dependency), streamed exactly or refused naming the
module."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import streamcnn
from conftest import compare, randomize_bn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: a BatchNorm2d subclass whose forward
    calls F.batch_norm itself (batch statistics in training mode), then an
    activation."""

    def __init__(self, c, act=nn.ReLU):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None
                                                  and self.running_var is None)
        x = F.batch_norm(x,
                         self.running_mean if not self.training or self.track_running_stats
                         else None,
                         self.running_var if not self.training or self.track_running_stats
                         else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class FrozenBatchNormAct2d(nn.Module):
    """timm.layers.FrozenBatchNormAct2d (what timm's freeze_batch_norm_2d puts
    in place of a BatchNormAct2d): buffers, the batch norm written out."""

    def __init__(self, c, act=nn.ReLU):
        super().__init__()
        self.eps = 1e-5
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)
        self.drop = nn.Identity()
        self.act = act(inplace=True) if act is nn.ReLU else act()

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        return self.act(self.drop(x))


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """timm.layers.DropPath (stochastic depth, ``drop_prob``)."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block in NCHW: its layer scale is
    ``x.mul(self.gamma.reshape(1, -1, 1, 1))``, and a DropPath."""

    def __init__(self, c, view=False):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = BatchNormAct2d(c, nn.GELU)
        self.conv_pw = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.view = view
        self.drop_path = DropPath(0.1)

    def forward(self, x):
        y = self.conv_pw(self.norm(self.conv_dw(x)))
        y = self.gamma.view(-1, 1, 1) * y if self.view else y.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + self.drop_path(y)


class Features(nn.Module):
    """A wrapper streaming a timm-style model's forward_features (the model
    itself is not called)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_features(x)


def _stem(*layers):
    stem = nn.Sequential(*layers).double().eval()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    return stem


def test_batchnorm_act_exact_and_frozen():
    stem = _stem(nn.Conv2d(3, 8, 3, 2, 1, bias=False), BatchNormAct2d(8, nn.SiLU),
                 nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8))
    x = torch.randn(2, 3, 61, 53, dtype=torch.float64, requires_grad=True)
    assert compare(stem, x, 24, 1e-10) < 1e-10
    sm = streamcnn.StreamingModule(stem, 24)
    sm.train()  # the head trains: the stem's batch norms stay frozen
    assert not stem[1].training and not stem[3].training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    stem[3].train()
    with pytest.raises(ValueError, match=r"'3' \(BatchNormAct2d\) was switched to training "
                       r"mode.*call \.eval\(\)"):
        sm(x)
    # without running statistics: in eval mode too
    untracked = _stem(nn.Conv2d(3, 8, 3), BatchNormAct2d(8))
    untracked[1].track_running_stats = False
    untracked[1].running_mean = untracked[1].running_var = None
    with pytest.raises(ValueError, match=r"without running statistics \(track_running_stats="
                       r"False\) uses whole-image statistics even in eval mode"):
        streamcnn.StreamingModule(untracked, 24)
    # built in training mode: F.batch_norm with training=True
    with pytest.raises(ValueError, match=r"batch_norm \(fx node 'batch_norm_1', in '3' "
                       r"\(BatchNormAct2d\)\): batch norm with training=True .*call \.eval\(\)"):
        streamcnn.StreamingModule(stem, 24)


def test_frozen_batchnorm():
    misc = pytest.importorskip("torchvision.ops.misc")
    bn = misc.FrozenBatchNorm2d(8)
    stem = _stem(nn.Conv2d(3, 8, 3, 2, 1, bias=False), bn, nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        bn.weight.copy_(torch.rand(8) + 0.5)
        bn.bias.copy_(torch.randn(8))
        bn.running_mean.copy_(torch.randn(8))
        bn.running_var.copy_(torch.rand(8) + 0.5)
    x = torch.randn(1, 3, 64, 59, dtype=torch.float64, requires_grad=True)
    assert compare(stem, x, 32, 1e-10) < 1e-10
    # the first layer: it says how many channels the image has
    only = streamcnn.StreamingModule(nn.Sequential(misc.FrozenBatchNorm2d(3), nn.ReLU()), 8)
    assert only.in_channels == 3
    # timm's frozen BatchNormAct2d: the batch norm, then its activation
    act_stem = _stem(nn.Conv2d(3, 8, 3, 2, 1), FrozenBatchNormAct2d(8),
                     nn.Conv2d(8, 8, 3), FrozenBatchNormAct2d(8, nn.SiLU))
    assert compare(act_stem, x, 32, 1e-10) < 1e-10
    # its statistics are read at each call, as the module does
    sm = streamcnn.StreamingModule(stem, 32)
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12


@pytest.mark.parametrize("view", [False, True])
def test_layer_scale_of_a_reshaped_parameter(view):
    stem = _stem(nn.Conv2d(3, 8, 4, 4), ConvNeXtBlock(8, view), ConvNeXtBlock(8, view))
    x = torch.randn(1, 3, 96, 88, dtype=torch.float64, requires_grad=True)
    assert compare(stem, x, 64, 1e-10) < 1e-10  # gamma's gradient included


def test_a_reshaped_parameter_where_one_is_not_read_whole():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x):
            w = self.norm.weight.reshape(4)
            return F.batch_norm(self.conv(x), self.norm.running_mean, self.norm.running_var,
                                w, self.norm.bias, False, 0.1, 1e-5)

    with pytest.raises(ValueError, match=r"its weight is a reshaped parameter \('reshape'\)"):
        streamcnn.StreamingModule(Block().eval(), 16)
    # a reshape that does not fit fails naming the node
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gamma = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.conv(x) * self.gamma.reshape(1, 5, 1, 1)

    with pytest.raises(ValueError, match=r"reshape \(fx node 'reshape', in '' \(Bad\)\)|"
                       r"reshape \(fx node 'reshape'\): reshaping the parameter failed"):
        streamcnn.StreamingModule(Bad(), 16)


def test_drop_path_stays_frozen_and_is_refused_in_training_mode():
    stem = _stem(nn.Conv2d(3, 8, 4, 4), ConvNeXtBlock(8))
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    sm = streamcnn.StreamingModule(stem, 48)
    sm.train()
    # module(x) is what the stream computes: DropPath kept in eval mode
    assert not stem[1].drop_path.training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    stem[1].drop_path.train()
    with pytest.raises(ValueError, match=r"'1.drop_path' \(DropPath\) was switched to "
                       "training mode"):
        sm(x)
    stem.train()
    with pytest.raises(ValueError, match=r"cannot stream DropPath '1.drop_path': in training "
                       r"mode it drops whole samples at random; call \.eval\(\)"):
        streamcnn.StreamingModule(stem, 48)


def test_module_reading_its_mode_keeps_the_traced_one():
    """A module of another library whose forward reads self.training is
    traced once, in the mode it has: the StreamingModule keeps it so."""

    class ReluWhileTraining(nn.Module):  # as a block that acts only while training
        def forward(self, x):
            return F.relu(x) if self.training else x

    stem = nn.Sequential(nn.Conv2d(3, 4, 3), ReluWhileTraining(), nn.Conv2d(4, 4, 3)).double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    sm = streamcnn.StreamingModule(stem, 20)   # built in training mode: traced doubling
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    sm.eval()
    assert stem[1].training and not stem[0].training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    stem[1].eval()
    with pytest.raises(ValueError, match=r"'1' \(ReluWhileTraining\) was switched to eval "
                       r"mode; what it computes depends on its mode, and it was traced in "
                       r"training mode .*call \.train\(\) on it"):
        sm(x)


@pytest.mark.parametrize("drop", [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                  nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_inplace_after_an_eval_dropout_of_the_same_tensor(drop):
    """In eval mode a dropout returns its input itself: an in-place op on
    that input later changes the dropout's result too (refused, as for any
    view)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = drop(0.5)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.drop(x)
            z = self.act(x)
            return y + z

    stem = nn.Sequential(nn.Conv2d(3, 4, 3), Block()).eval()
    with pytest.raises(ValueError, match=r"it changes '_0', of which '_1_drop' \(read after "
                       r"it\) is a view"):
        streamcnn.StreamingModule(stem, 16)


def test_messages_name_the_module():
    class SE(nn.Module):  # squeeze-excitation: a global pool inside a block
        def __init__(self, c):
            super().__init__()
            self.fc = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.se = SE(4)

        def forward(self, x):
            return self.se(self.conv(x))

    stem = nn.Sequential(nn.Conv2d(3, 4, 3), Block()).eval()
    with pytest.raises(ValueError, match=r"cannot stream method \.mean\(\) \(fx node 'mean', "
                       r"in '1.se' \(SE\)\): it is not local"):
        streamcnn.StreamingModule(stem, 16)

    class SamePad(nn.Conv2d):  # timm's Conv2dSame: padding from the input's size
        def forward(self, x):
            ih = x.size()[-2]
            pad = max((-(ih // -self.stride[0]) - 1) * self.stride[0] + 3 - ih, 0)
            if pad > 0:
                x = F.pad(x, [pad // 2, pad - pad // 2] * 2)
            return F.conv2d(x, self.weight, self.bias, self.stride)

    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(SamePad(4, 4, 3, 2))).eval()
    with pytest.raises(ValueError, match=r"torch.fx could not trace the stem in '1.0' "
                       r"\(SamePad\) \(TraceError"):
        streamcnn.StreamingModule(stem, 16)


def test_plus_zero_and_nonlocal_named_first():
    class MobileOneBlock(nn.Module):  # timm's training-time form: identity_out = 0
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.identity = None

        def forward(self, x):
            identity_out = 0
            if self.identity is not None:
                identity_out = self.identity(x)
            out = self.conv(x) + identity_out
            out += x
            return F.relu(out)

    stem = _stem(nn.Conv2d(3, 4, 3), MobileOneBlock(), MobileOneBlock())
    x = torch.randn(1, 3, 41, 37, dtype=torch.float64, requires_grad=True)
    assert compare(stem, x, 20, 1e-10) < 1e-10

    class SplitAttn(nn.Module):  # ResNeSt's: a 5-d view, then a global mean
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.fc = nn.Conv2d(4, 8, 1)

        def forward(self, x):
            x = self.conv(x)
            b, c, h, w = x.shape
            x = x.reshape(b, 2, 4, h, w)
            gap = x.sum(1).mean((2, 3), keepdim=True)
            attn = self.fc(gap).view(b, 2, 4, 1, 1).softmax(1)
            return (x * attn).sum(1)

    stem = nn.Sequential(nn.Conv2d(3, 4, 3), SplitAttn()).eval()
    with pytest.raises(ValueError, match=r"method \.mean\(\) \(fx node 'mean', in '1' "
                       r"\(SplitAttn\)\): it is not local"):
        streamcnn.StreamingModule(stem, 16)


def test_a_model_whose_features_are_streamed_keeps_its_own_mode():
    """A wrapper streams timm-style ``model.forward_features``; the model's
    forward_head reads its mode (dropout) but is not streamed: the model
    follows train() / eval() as without streamcnn."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward_features(self, x):
            return self.conv(x).relu()

        def forward_head(self, x):
            return self.fc(F.dropout(x.mean((2, 3)), p=0.5, training=self.training))

    m = Model().double().eval()
    sm = streamcnn.StreamingModule(Features(m), 16)
    sm.train()
    assert m.training
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (sm(x) - m.forward_features(x)).abs().max().item() < 1e-12
    sm.eval()
    assert not m.training


def test_size_errors_name_the_layer():
    """An image size at which a join gets values of two sizes (as DLA's at
    odd sizes): the error names the layer, not only the instruction."""

    class Join(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.MaxPool2d(2, 2)
            self.conv = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):
            return self.down(x) + self.conv(x)

    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Join()).double().eval()
    sm = streamcnn.StreamingModule(stem, 16, mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(ValueError, match=r"for a 33 x 32 image, instruction 4 \(add: fx node "
                       r"'add', in '1' \(Join\)\) adds values of 16 x 16 and 17 x 16"):
        sm(torch.rand(1, 3, 33, 32, dtype=torch.float64))
    assert sm(torch.rand(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 4, 16, 16)
    for query in (sm.tiling, sm.work):  # the queries of a size name it too
        with pytest.raises(ValueError, match=r"instruction 4 \(add: fx node 'add', in '1' "):
            query(33, 32)
    budget = streamcnn.StreamingModule(stem, memory_budget="1GB")
    with pytest.raises(ValueError, match=r"instruction 3 \(add: fx node 'add', in '1' "):
        budget.budget_tile(1, 33, 32, torch.float64)


def test_modes_that_do_not_change_the_trace_are_free():
    """Only modules whose mode changes what the stem computes keep it:
    DenseNet's layers read theirs only at a dropout rate over 0, a module
    may read its mode in code the stem does not run (a Lightning module's
    export helpers), a batch norm may pass training=False always."""

    class Layer(nn.Module):  # torchvision's _DenseLayer, drop_rate 0
        def __init__(self, drop_rate=0.0):
            super().__init__()
            self.norm = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.drop_rate = drop_rate

        def forward(self, x):
            y = self.conv(F.relu(self.norm(x)))
            if self.drop_rate > 0:
                y = F.dropout(y, p=self.drop_rate, training=self.training)
            return y

        def to_onnx(self):  # reads its mode elsewhere
            return self.training

    class AlwaysFrozen(nn.BatchNorm2d):
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)

    stem = _stem(nn.Conv2d(3, 4, 3), Layer(), AlwaysFrozen(4), Layer())
    x = torch.randn(1, 3, 30, 30, dtype=torch.float64)
    # the frozen-batch-norm idiom: the net in training mode, batch norms in eval
    stem.train()
    for m in stem.modules():
        if type(m) is nn.BatchNorm2d:
            m.eval()
    sm = streamcnn.StreamingModule(stem, 16)
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    stem.eval()
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    sm.train()
    assert stem[1].training and stem[2].training and not stem[1].norm.training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    # a dropout rate over 0: its mode matters, and is kept
    stem = _stem(nn.Conv2d(3, 4, 3), Layer(0.5))
    sm = streamcnn.StreamingModule(stem, 16)
    sm.train()
    assert not stem[1].training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12


def test_building_leaves_the_stems_tensors_untouched():
    """Building a StreamingModule (tracing the stem again with modes flipped
    runs eager code of the other mode, then puts back the buffers it
    changed) leaves the buffers it did not change as they were, version
    counters too: an autograd graph recorded through the stem before can
    still be differentiated (the batch norms' buffers it saved were
    'modified by an inplace operation'); a buffer the other mode's code
    changed gets its value back."""
    stem = _stem(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), BatchNormAct2d(4))
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    y = stem(x)
    before = {k: (v.clone(), v._version) for k, v in stem.state_dict().items()}
    streamcnn.StreamingModule(stem, 16)
    after = stem.state_dict()
    # (BatchNormAct2d's training-mode code counts its batches in place)
    moved = {k for k, v in after.items() if v._version != before[k][1]}
    assert moved == {"2.num_batches_tracked"}
    assert all(torch.equal(after[k], b[0]) for k, b in before.items())
    y.sum().backward()
    assert x.grad is not None


def test_zero_rate_dropouts_built_in_training_mode():
    """A Dropout / DropPath of rate 0 may be in training mode at the build:
    they are frozen like the others (a dropout rate raised later changes
    nothing streamed, nor the stem's own output; a DropPath's is refused as
    any other changed setting)."""
    block = ConvNeXtBlock(8)
    block.drop_path.drop_prob = 0.0
    stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Dropout(0.0), block).double()
    randomize_bn(stem, torch.Generator().manual_seed(1))
    block.norm.eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    sm = streamcnn.StreamingModule(stem, 48)
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    sm.train()
    stem[1].p = 0.5
    assert not stem[1].training and not block.drop_path.training
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    stem.eval()
    assert (sm(x) - stem(x)).abs().max().item() < 1e-12
    block.drop_path.drop_prob = 0.5
    with pytest.raises(ValueError, match="changed drop_prob from 0.0 to 0.5"):
        sm(x)


def test_drop_path_the_stem_does_not_call_is_left_alone():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage0 = nn.Conv2d(3, 4, 3)
            self.stage1 = nn.Sequential(nn.Conv2d(4, 4, 3), DropPath(0.5))

    class Stage0(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.stage0(x)

    m = Model().double()  # in training mode: stage1's DropPath drops
    sm = streamcnn.StreamingModule(Stage0(m), 16)
    sm.eval()
    sm.train()
    assert m.stage1[1].training
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    assert (sm(x) - m.stage0(x)).abs().max().item() < 1e-12


def test_refusals_of_parameters_a_batch_norm_or_scale_cannot_read():
    class EpsTensor(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.register_buffer("eps_t", torch.tensor(1e-5))

        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps_t)

    with pytest.raises(ValueError, match=r"in '1' \(EpsTensor\)\): its eps must be a number"):
        streamcnn.StreamingModule(nn.Sequential(nn.Conv2d(3, 4, 3), EpsTensor(4)).eval(), 16)

    class Square(nn.Module):  # a 2 x 2 parameter read as 4 channels
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.g = nn.Parameter(torch.rand(2, 2))

        def forward(self, x):
            return self.conv(x) * self.g.reshape(1, -1, 1, 1)

    with pytest.raises(ValueError, match=r"a parameter of shape \(2, 2\) reshaped: only one "
                       "of a single dimension"):
        streamcnn.StreamingModule(Square(), 16)


def test_frozen_batchnorm_alone_or_with_parameters():
    misc = pytest.importorskip("torchvision.ops.misc")
    bn = misc.FrozenBatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    assert (streamcnn.StreamingModule(bn, 8)(x) - bn(x)).abs().max().item() < 1e-12
    # affine parameters that train
    bn.weight = nn.Parameter(torch.rand(3, dtype=torch.float64) + 0.5)
    bn.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))
    stem = nn.Sequential(nn.Conv2d(3, 3, 3), bn).double()
    xg = x.clone().requires_grad_()
    assert compare(stem, xg, 8, 1e-10) < 1e-10


def test_size_errors_name_every_instruction_of_a_join():
    class Join3(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.MaxPool2d(2, 2)
            self.c = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):  # the first of two joins fails
            return torch.cat([self.b(x), self.c(x), self.b(x)], 1)

    sm = streamcnn.StreamingModule(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Join3()), 16)
    with pytest.raises(ValueError, match=r"instruction \d+ \(cat: fx node 'cat', in '1' "
                       r"\(Join3\)\) joins"):
        sm(torch.rand(1, 3, 33, 32))


def test_a_model_whose_method_reads_its_mode():
    """The stem runs a model's forward_features (not the model itself),
    which reads the model's mode: the model keeps the mode it was traced
    in."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3)

        def forward_features(self, x):
            x = self.conv(x)
            if not self.training:
                x = x.relu()
            return self.conv2(x)

    m = Model().double().eval()
    sm = streamcnn.StreamingModule(Features(m), 16)
    sm.train()
    assert not m.training
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert (sm(x) - m.forward_features(x)).abs().max().item() < 1e-12


def test_a_feature_extractor_swapping_graphs_keeps_its_mode():
    """torchvision's create_feature_extractor keeps a train graph and an eval
    graph and swaps them in its own train(): the stream, traced from the
    eval one, keeps it."""
    fx_utils = pytest.importorskip("torchvision.models.feature_extraction")
    ops = pytest.importorskip("torchvision.ops")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.sd = ops.StochasticDepth(0.5, "row")
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y + self.sd(y))

    fe = fx_utils.create_feature_extractor(Net().double().eval(), ["bn"])

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.fe = fe

        def forward(self, x):
            return self.fe(x)["bn"]

    sm = streamcnn.StreamingModule(Stem(), 16)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    sm.train()
    assert not fe.training
    assert (sm(x) - fe(x)["bn"]).abs().max().item() < 1e-12
