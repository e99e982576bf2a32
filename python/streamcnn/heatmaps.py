"""Heatmaps of a slide classifier: where the model sees the class.

    from streamcnn import heatmaps
    s = heatmaps.saliency(model.stem, model.head, image)        # N x H x W, max |d score / d x|
    r = heatmaps.cam(model.stem, model.head, image)             # r.cam: N x H x W class scores
    r.winners                                                   # max head: what won the max

Both take the image as the stem takes it (``N x C x H x W`` or ``C x H x W``,
uint8 or float) and never hold the stem's activations of the whole image:

* :func:`saliency` -- the gradient of the target's score (the class logit,
  or the regression output) with respect to the image pixels (in the
  image's units: 0..255 for uint8), reduced per pixel to the largest
  absolute value over the channels. The stem output's gradient comes from
  the head by autograd; the image gradient is then computed in **bands** of
  input rows: each band (its output rows' cones, aligned to the output
  stride) runs through the streamed stem as an image of its own, and its
  output gradient is restricted to the outputs whose whole cone lies in the
  band (or is clipped by the true image border there), whose values and
  derivatives are therefore exactly the whole image's. By linearity the
  bands' image gradients, added where they overlap (the halo), are the
  whole image's gradient. Only one band exists in float at a time (a uint8
  image has no gradient of its own, and a float copy of a gigapixel
  region would not fit), and the reduced map can be max-pooled on the fly
  (``pool``).
* :func:`cam` -- the class-activation map: the head's linear layer at
  every location of its feature map (``head.class_map``), bilinearly
  upsampled to the image with each location placed at the centre of its
  receptive field; for a global max-pool head also the locations that won
  the max, each channel's contribution ``w[k, c] * max a_c`` put at its
  winning location (they sum to the logit minus the bias).

Display helpers: :func:`upsample`, :func:`smooth`, :func:`normalize`,
:func:`colorize`.
"""

import contextlib
import math
import numbers
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .module import StreamingModule
from .ops import compute_dtype
from .program import convert
from .slide import whole_numbers
from ._library import cone_info, program_info

Target = Union[None, int, Sequence[int], torch.Tensor]


# ---------------------------------------------------------------------------
# geometry: which input rows an output row reads


class Cone(NamedTuple):
    """Per axis, output index ``i`` of a program reads input indices
    ``[i * stride - before, i * stride + after)`` (padding included): the
    receptive field is ``before + after`` long and its centre is at
    ``i * stride + (after - before - 1) / 2``."""
    stride: Tuple[int, int]
    before: Tuple[int, int]
    after: Tuple[int, int]

    @property
    def receptive_field(self) -> Tuple[int, int]:
        return (self.before[0] + self.after[0], self.before[1] + self.after[1])

    @property
    def center(self) -> Tuple[float, float]:
        """Input coordinate of output 0's receptive-field centre, per axis."""
        return ((self.after[0] - self.before[0] - 1) / 2,
                (self.after[1] - self.before[1] - 1) / 2)

    def then(self, other: "Cone") -> "Cone":
        """The cone of ``other`` (a program run on this one's output)
        in this one's input coordinates."""
        s, b, a = [], [], []
        for ax in range(2):
            s1, b1, a1 = self.stride[ax], self.before[ax], self.after[ax]
            s2, b2, a2 = other.stride[ax], other.before[ax], other.after[ax]
            s.append(s1 * s2)
            b.append(b2 * s1 + b1)
            a.append((a2 - 1) * s1 + a1)
        return Cone(tuple(s), tuple(b), tuple(a))


def program_cone(program: Sequence[int]) -> Cone:
    """The :class:`Cone` of a program, from the C core: output 0's
    unclipped cone (``streamcnn.cone_info``, the box arithmetic the
    replay plans its tiles with) and the total stride
    (``streamcnn.program_info``). Raises ValueError for an invalid
    program."""
    r0, r1, c0, c1 = cone_info(program, (0, 1), (0, 1))
    info = program_info(program)
    return Cone((info[4], info[5]), (-r0, -c0), (r1, c1))


def stem_cone(stem: StreamingModule) -> Cone:
    """The cone of a StreamingModule's program."""
    cone = getattr(stem, "_heatmap_cone", None)
    if cone is None or cone[0] is not stem.program:
        cone = (stem.program, program_cone(stem.program))
        stem._heatmap_cone = cone
    return cone[1]


def map_cone(stem: StreamingModule, head: nn.Module) -> Cone:
    """The cone of ``head.body(stem(x))`` (the class map's locations) in
    image coordinates. A body that torch.fx cannot convert into a program
    raises a ValueError."""
    body = getattr(head, "body", None)
    if body is None or len(list(body.children())) == 0 and not list(body.parameters()):
        return stem_cone(stem)
    was = body.training
    body.eval()
    try:
        conv = convert(body, stem.out_channels)
    finally:
        body.train(was)
    return stem_cone(stem).then(program_cone(conv.program))


# ---------------------------------------------------------------------------
# inputs


def _batch(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"streamcnn: the image must be a tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"streamcnn: the image must be C x H x W or N x C x H x W, got shape "
                         f"{tuple(image.shape)}")
    return image


def _targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """One output index per image: ``target`` (an int, or one per image),
    or the predicted class (argmax; index 0 for a single output)."""
    n, k = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = _int_targets(target)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        each = "an int" if n == 1 else f"an int, or one per image ({n})"
        raise ValueError(f"streamcnn: target must be {each}, got {t.numel()} entries for "
                         f"a batch of {n}")
    if bool(((t < 0) | (t >= k)).any()):
        raise ValueError(f"streamcnn: target {t.tolist()} out of range for {k} outputs")
    return t.to(logits.device)


def _stem_output_shape(stem: StreamingModule, x: torch.Tensor) -> Tuple[int, ...]:
    """The shape of ``stem(x)`` (N x C x h x w), without running it."""
    oh, ow = stem.tiling(x.shape[2], x.shape[3])["output"]
    return (x.shape[0], stem.out_channels, oh, ow)


def _int_targets(target) -> torch.Tensor:
    """``target`` as a flat int64 tensor: ints (Python's, numpy's, an
    integer tensor's); a class name, a float or a bool is refused (they
    were an internal TypeError, or cut to an int without a word)."""
    bad = TypeError(f"streamcnn: target must be an output index (an int, or one per "
                    f"image), got {target!r}; a class name's index is its place in the "
                    "run's classes")
    if isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or \
                target.dtype == torch.bool:
            raise bad
        return target.detach().to(torch.long).flatten()
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    out = []
    for v in items:
        if isinstance(v, bool):
            raise bad
        try:
            out.append(operator.index(v))
        except TypeError:
            raise bad from None
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------
# saliency


class BandPlan(NamedTuple):
    """One band of the saliency: output rows ``[o0, o1)`` read input rows
    ``[r0, r1)``; ``r0`` is a multiple of the output stride, so output row
    ``o`` is the band's row ``o - r0 / stride``."""
    o0: int
    o1: int
    r0: int
    r1: int


def band_plan(cone: Cone, height: int, out_rows: int, band_rows: int) -> list:
    """Bands of at most ``band_rows`` output rows... of about ``band_rows``
    *input* rows: the output rows are cut into groups of
    ``max(1, band_rows // stride)``; each group's input band is the hull of
    its cones, clipped to the image, its start rounded down to the stride."""
    s, before, after = cone.stride[0], cone.before[0], cone.after[0]
    k = max(1, band_rows // s)
    plan = []
    for o0 in range(0, out_rows, k):
        o1 = min(out_rows, o0 + k)
        r0 = max(0, (o0 * s - before) // s * s)
        r1 = min(height, (o1 - 1) * s + after)
        plan.append(BandPlan(o0, o1, r0, r1))
    return plan


def _default_band_rows(cone: Cone, width: int, channels: int) -> int:
    """About 2^24 input values per band, and at least twice the receptive
    field (so the halo is at most half the band)."""
    return max(2 * cone.receptive_field[0], (1 << 24) // max(1, width * channels))


class _Pooler:
    """Collects final rows of the reduced map (N x r x W) in order and
    writes their ``pool x pool`` maxima into ``out`` (N x ceil(H / pool) x
    ceil(W / pool))."""

    def __init__(self, out: torch.Tensor, pool: int):
        self.out, self.pool = out, pool
        self.pending = None
        self.row = 0          # next output row

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.out.device)
        if rows.shape[1] == 0:
            return
        if self.pool == 1:
            self.out[:, self.row:self.row + rows.shape[1]] = rows
            self.row += rows.shape[1]
            return
        rows = rows if self.pending is None else torch.cat([self.pending, rows], dim=1)
        full = rows.shape[1] // self.pool * self.pool
        if full:
            self._write(rows[:, :full])
        self.pending = rows[:, full:].clone() if full < rows.shape[1] else None

    def _write(self, rows: torch.Tensor) -> None:
        p = F.max_pool2d(rows.unsqueeze(1), self.pool, self.pool, ceil_mode=True).squeeze(1)
        self.out[:, self.row:self.row + p.shape[1]] = p
        self.row += p.shape[1]

    def close(self) -> None:
        if self.pending is not None:
            self._write(self.pending)
            self.pending = None


def _output_gradient(stem: StreamingModule, head: nn.Module, x: torch.Tensor,
                     target: Target, features: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d score / d stem output, logits, targets): the stem runs without
    gradient (streamed forward; or its output is given as features), the
    head by autograd on its output."""
    if features is None:
        with torch.no_grad():
            f = stem(x)
    else:
        want = _stem_output_shape(stem, x)
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != want:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else \
                type(features).__name__
            raise ValueError(f"streamcnn: features must be stem(image), "
                             f"{' x '.join(map(str, want))} for this image, got {got}")
        f = features.detach()
    f.requires_grad_(True)
    with torch.enable_grad():
        logits = head(f)
        if logits.dim() != 2:
            raise ValueError(f"streamcnn: the head must return N x outputs, got shape "
                             f"{tuple(logits.shape)}")
        t = _targets(logits.detach(), target)
        score = logits.gather(1, t[:, None]).sum()
        (g,) = torch.autograd.grad(score, f)
    return g, logits.detach(), t


def saliency(stem: StreamingModule, head: nn.Module, image: torch.Tensor,
             target: Target = None, *, pool: int = 1, band_rows: Optional[int] = None,
             progress=None, return_logits: bool = False,
             features: Optional[torch.Tensor] = None):
    """The saliency map: ``max_c |d score / d image[n, c, y, x]|``, float32
    (float64 for a float64 stem) ``N x ceil(H / pool) x ceil(W / pool)`` (with ``pool > 1`` the maximum
    over each ``pool x pool`` block), where score is ``head(stem(image))[n,
    target[n]]``: the logit of ``target`` (an int or one per image; default
    the predicted class) or the regression output (index 0).

    ``image``: as the stem takes it (uint8 or float, ``N x C x H x W`` or
    ``C x H x W``), never converted as a whole: the image gradient is
    computed band by band (``band_rows`` input rows each, default about
    2^24 values; see the module docstring), exactly. ``progress``: a
    callable ``(done, total)`` called after each band (e.g. a tqdm's
    update). With ``return_logits`` also returns the logits (N x outputs)
    and the targets. ``features``: ``stem(image)`` when already computed
    (saves one forward)."""
    if not isinstance(stem, StreamingModule):
        raise TypeError("streamcnn: saliency needs the stem as a StreamingModule")
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise ValueError(f"streamcnn: pool must be a positive int, got {pool!r}")
    x = _batch(image).detach()
    n, c, h, w = x.shape
    cone = stem_cone(stem)
    g, logits, t = _output_gradient(stem, head, x, target, features)
    features = None
    dtype = compute_dtype(x, stem.stream_params()) if x.dtype == torch.uint8 else x.dtype
    if band_rows is None:
        band_rows = _default_band_rows(cone, w, c)
    if not isinstance(band_rows, int) or isinstance(band_rows, bool) or band_rows < 1:
        raise ValueError(f"streamcnn: band_rows must be a positive int, got {band_rows!r}")
    plan = band_plan(cone, h, g.shape[2], band_rows)
    with _frozen(stem):   # the bands' backward computes the image gradient only
        out = _band_gradients(stem, x, g, plan, cone, dtype, pool, progress)
    if return_logits:
        return out, logits, t
    return out


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Parameters without requires_grad inside the block (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _band_gradients(stem, x, g, plan, cone, dtype, pool, progress) -> torch.Tensor:
    """The reduced image gradient, band by band (see :func:`saliency`)."""
    n, c, h, w = x.shape
    device = g.device
    odt = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(n, -(-h // pool), -(-w // pool), dtype=odt)
    pooler = _Pooler(out, pool)
    carry, carry_r0 = None, 0      # summed image gradient of rows [carry_r0, ...)
    done_r = 0                     # rows [0, done_r) are final and emitted
    s = cone.stride[0]
    for i, b in enumerate(plan):
        # the band on the stem's device (an image in host memory streams to
        # a CUDA stem, but its gradient needs the band there)
        xb = x[:, :, b.r0:b.r1].to(device=device, dtype=dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            fb = stem(xb)
            gb = torch.zeros_like(fb)
            j0 = b.o0 - b.r0 // s
            gb[:, :, j0:j0 + (b.o1 - b.o0)] = g[:, :, b.o0:b.o1]
            (gx,) = torch.autograd.grad(fb, xb, gb)
        del fb, gb, xb
        if carry is not None:           # earlier bands' contributions to these rows
            gx[:, :, carry_r0 - b.r0:carry_r0 - b.r0 + carry.shape[2]] += carry
        nxt = plan[i + 1].r0 if i + 1 < len(plan) else h
        # rows [done_r, nxt) are final: later bands start at nxt or below it
        # no further (starts are non-decreasing); rows no band read stay zero
        end = min(nxt, b.r1)
        if b.r0 > done_r:
            pooler.add(torch.zeros(n, b.r0 - done_r, w, dtype=odt))
        pooler.add(gx[:, :, :end - b.r0].abs().amax(dim=1).to(odt))
        if nxt > b.r1:
            pooler.add(torch.zeros(n, nxt - b.r1, w, dtype=odt))
        done_r = nxt
        carry = gx[:, :, end - b.r0:].clone() if end < b.r1 else None
        carry_r0 = end
        del gx
        if progress is not None:
            progress(i + 1, len(plan))
    pooler.close()
    return out


# ---------------------------------------------------------------------------
# class-activation maps


class CamResult(NamedTuple):
    """What :func:`cam` returns (tensors).

    cam: the target's class map, ``N x H x W`` upsampled to the image (or
    ``N x h x w`` at the feature map's resolution with ``upsample=False``);
    features: the class map at the feature map's resolution (``N x h x w``);
    winners: max-pool head only (else None), ``N x h x w``, each location's
    share of the logit: the sum of ``fc.weight[k, c] * a_c`` over the
    channels ``c`` whose maximum is at that location (ties: the first);
    ``winners.sum() + fc.bias[k]`` is the logit; logits: ``N x outputs``;
    target: ``N``, the class each map is of; cone: the locations'
    receptive fields in image pixels (:class:`Cone`)."""
    cam: torch.Tensor
    features: torch.Tensor
    winners: Optional[torch.Tensor]
    logits: torch.Tensor
    target: torch.Tensor
    cone: Cone


def class_maps(head: nn.Module, f: torch.Tensor, target: Target = None,
               body: Optional[torch.Tensor] = None):
    """(class map N x h x w of the target, winners or None, logits, target)
    from the stem output ``f``: ``a = head.body(f)`` (``body``, when the
    caller has it already), the linear layer at every location
    (``head.class_map``)."""
    for name in ("body", "pool", "fc"):
        if not hasattr(head, name):
            raise TypeError(f"streamcnn: a class map needs a head with body, pool and fc "
                            f"(streamcnn.classifier.Head); this one has no {name!r}")
    with torch.no_grad():
        a = head.body(f) if body is None else body
        logits = head.fc(head.pool(a))
        t = _targets(logits, target)
        maps = head.class_map(a)                               # N x K x h x w
        m = maps.gather(1, t.view(-1, 1, 1, 1).expand(-1, 1, *maps.shape[2:]))[:, 0]
        del maps
        winners = None
        if getattr(head.pool, "kind", None) == "max":
            n, c = a.shape[:2]
            flat = a.flatten(2)
            best, idx = flat.max(dim=2)                        # N x C (first maximum)
            contrib = best * head.fc.weight[t]                 # N x C
            winners = torch.zeros(n, flat.shape[2], dtype=a.dtype, device=a.device)
            winners.scatter_add_(1, idx, contrib)
            winners = winners.view(n, *a.shape[2:])
    return m, winners, logits, t


def cam(stem: StreamingModule, head: nn.Module, image: torch.Tensor, target: Target = None,
        *, upsample: bool = True) -> CamResult:
    """The class-activation map of ``target`` (default: the predicted class)
    for ``head(stem(image))``, a :class:`CamResult`. The stem runs streamed
    (no gradient); the head's body on the stem output as usual. With
    ``upsample`` the map is bilinearly upsampled to the image (``N x H x
    W``, float32), each location at its receptive field's centre."""
    if not isinstance(stem, StreamingModule):
        raise TypeError("streamcnn: cam needs the stem as a StreamingModule")
    x = _batch(image)
    with torch.no_grad():
        f = stem(x)
    m, winners, logits, t = class_maps(head, f, target)
    del f
    cone = map_cone(stem, head)
    full = upsample_map(m, cone, x.shape[2:]) if upsample else m
    return CamResult(full, m, winners, logits, t, cone)


# ---------------------------------------------------------------------------
# resampling and display


def _axis_weights(n_out: int, n_in: int, stride: int, center: float, origin: float,
                  scale: float, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear indices and weight for output pixels ``0 .. n_out - 1``
    whose centres are image coordinates ``origin + (i + 0.5) * scale - 0.5``,
    on a map whose location j sits at ``j * stride + center``; clamped at
    the map's ends."""
    y = origin + (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale - 0.5
    u = ((y - center) / stride).clamp_(0, n_in - 1)
    i0 = u.floor().long().clamp_(0, n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0, i1, (u - i0.double())


def upsample_map(m: torch.Tensor, cone: Cone, size: Sequence[int], *,
                 origin: Sequence[float] = (0.0, 0.0), scale: float = 1.0) -> torch.Tensor:
    """Bilinear resampling of a feature-resolution map ``m`` (``h x w`` or
    ``N x h x w``) to ``size = (rows, cols)`` output pixels, float32. Output
    pixel ``(i, j)`` has its centre at image coordinates ``origin + ((i, j)
    + 0.5) * scale - 0.5`` (scale 1, origin 0: the image's own pixels; a
    window of a large map is computed without the rest); map location
    ``(p, q)`` is at its receptive field's centre ``(p, q) * stride +
    cone.center``. Beyond the outermost centres the map is held constant."""
    if not isinstance(m, torch.Tensor) or m.dim() not in (2, 3):
        raise ValueError(f"streamcnn: the map must be h x w or N x h x w, got "
                         f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
    rows, cols = whole_numbers(size, 2, "size (rows, cols)")
    if rows < 1 or cols < 1:
        raise ValueError(f"streamcnn: size (rows, cols) must be positive, got {size!r}")
    origin = _point(origin, "origin (row, col)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or \
            not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"streamcnn: scale must be a positive number, got {scale!r}")
    squeeze = m.dim() == 2
    if squeeze:
        m = m.unsqueeze(0)
    r0, r1, wr = _axis_weights(rows, m.shape[1], cone.stride[0], cone.center[0], origin[0],
                               scale, m.device)
    c0, c1, wc = _axis_weights(cols, m.shape[2], cone.stride[1], cone.center[1], origin[1],
                               scale, m.device)
    m = m.to(torch.float64)
    wr = wr.view(1, -1, 1)
    top = m.index_select(1, r0) * (1 - wr) + m.index_select(1, r1) * wr
    wc = wc.view(1, 1, -1)
    out = top.index_select(2, c0) * (1 - wc) + top.index_select(2, c1) * wc
    out = out.float()
    return out[0] if squeeze else out


def _point(v, what: str) -> Tuple[float, float]:
    """Two finite numbers, or a ValueError naming ``what``."""
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"streamcnn: {what} must be two numbers, got {v!r}") from None
    for x in (a, b):
        if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)) or \
                not math.isfinite(float(x)):
            raise ValueError(f"streamcnn: {what} must be two finite numbers, got {v!r}")
    return float(a), float(b)


def upsample(m: torch.Tensor, cone: Cone, size: Sequence[int], **kw) -> torch.Tensor:
    """Alias of :func:`upsample_map`."""
    return upsample_map(m, cone, size, **kw)


def smooth(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (``sigma`` in the map's pixels) of an ``h x w`` or
    ``N x h x w`` map (scipy.ndimage, reflecting at the border)."""
    if sigma <= 0:
        return m.clone()
    from scipy.ndimage import gaussian_filter
    arr = m.detach().cpu().double().numpy()
    sig = (0, sigma, sigma) if arr.ndim == 3 else sigma
    return torch.from_numpy(gaussian_filter(arr, sig, mode="reflect")).to(m.dtype)


def percentiles(m: torch.Tensor, low: float = 1.0, high: float = 99.0,
                max_samples: int = 1 << 22) -> Tuple[float, float]:
    """The ``low`` and ``high`` percentiles of a map's finite values (of an
    evenly strided subsample of at most ``max_samples`` values)."""
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 100:
            raise ValueError(f"streamcnn: {name} must be a percentile in 0 .. 100, got {v!r}")
    if low > high:
        raise ValueError(f"streamcnn: the percentiles low {low!r} and high {high!r} are the "
                         "wrong way round")
    flat = m.detach().flatten()
    if flat.numel() > max_samples:
        flat = flat[:: math.ceil(flat.numel() / max_samples)]
    flat = flat[torch.isfinite(flat)].double()
    if flat.numel() == 0:
        return 0.0, 0.0
    q = torch.quantile(flat, torch.tensor([low / 100, high / 100], dtype=torch.float64))
    return float(q[0]), float(q[1])


def normalize(m: torch.Tensor, low: float = 1.0, high: float = 99.0,
              vmin: Optional[float] = None, vmax: Optional[float] = None) -> torch.Tensor:
    """The map scaled to [0, 1] between its ``low`` and ``high`` percentiles
    (or the given ``vmin`` / ``vmax``), clipped; a constant map gives
    zeros. float32."""
    lo, hi = percentiles(m, low, high)
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    if not hi > lo:
        return torch.zeros_like(m, dtype=torch.float32)
    return ((m.float() - lo) / (hi - lo)).clamp_(0, 1)


def colormap_lut(cmap: str = "inferno") -> torch.Tensor:
    """256 x 3 uint8 colours of a matplotlib colour map."""
    import matplotlib
    lut = matplotlib.colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.from_numpy((lut * 255).round()).to(torch.uint8)


def colorize(m01: torch.Tensor, cmap: str = "inferno",
             lut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 ``... x 3`` RGB of a map in [0, 1] (values outside are
    clipped; NaN is colour 0)."""
    lut = colormap_lut(cmap) if lut is None else lut
    idx = (torch.nan_to_num(m01.float(), nan=0.0).clamp(0, 1) * 255).round().long()
    return lut[idx]
