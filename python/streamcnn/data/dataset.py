"""Slide datasets: one uint8 image of a chosen size and resolution per slide,
for training a streamed network end to end on whole-slide images."""

import codecs
import csv
import dataclasses
import io
import math
import operator
import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..slide import Slide, _check_box, box_of_mask

_CROPS = ("tissue", "center", "random")


def _row_bands(img: torch.Tensor):
    """Slices of ~2^20 pixels of rows of a ``C x H x W`` image, in order:
    per-pixel work done band by band keeps its temporaries small."""
    step = max(1, (1 << 20) // max(1, img.shape[2]))
    return (slice(r, r + step) for r in range(0, img.shape[1], step))


def channel_sums(img: torch.Tensor) -> torch.Tensor:
    """Exact int64 sums of each channel of a uint8 ``C x H x W`` image, in
    bands of rows (torch's sum of a uint8 image over H and W makes an
    int64 copy of it first: 8x its size, 1.5 GB at 8192²)."""
    out = torch.zeros(img.shape[0], dtype=torch.int64, device=img.device)
    for rows in _row_bands(img):
        out += img[:, rows].sum(dim=(1, 2), dtype=torch.int64)
    return out


def contiguous(img: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``img.contiguous()`` of a ``C x H x W`` image, copying a transposed
    view (an odd quarter turn) in ``block``-square pieces: torch copies it
    row by row, reading a column of the source per row (2x slower at
    8192², ``bench/augment.py``)."""
    if img.is_contiguous():
        return img
    if img.stride(1) >= img.stride(2):
        return img.contiguous()
    out = torch.empty(img.shape, dtype=img.dtype, device=img.device)
    for r in range(0, img.shape[1], block):
        for c in range(0, img.shape[2], block):
            out[:, r:r + block, c:c + block] = img[:, r:r + block, c:c + block]
    return out


@dataclasses.dataclass(frozen=True)
class AugmentDraw:
    """One draw of :class:`Augment` for an image: flips, the number of
    quarter turns and the colour factors (1.0 = unchanged)."""
    flip_w: bool = False          # mirror left-right
    flip_h: bool = False          # mirror top-bottom
    quarter_turns: int = 0        # torch.rot90(k, dims=(1, 2)), k in 0..3
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0

    def as_tensor(self) -> torch.Tensor:
        """The draw as 6 float64 values (what DataLoader can batch)."""
        return torch.tensor([float(self.flip_w), float(self.flip_h),
                             float(self.quarter_turns), self.brightness, self.contrast,
                             self.saturation], dtype=torch.float64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "AugmentDraw":
        v = t.reshape(-1).tolist()
        return AugmentDraw(bool(v[0]), bool(v[1]), int(v[2]), v[3], v[4], v[5])

    def source_box(self, height: int, width: int, rows: Tuple[int, int]
                   ) -> Tuple[int, int, int, int]:
        """The box ``(x, y, w, h)`` of the image before the flips and turns
        (``height x width``) that rows ``[a, b)`` of the result come from:
        :meth:`Augment.geometry` of that box alone gives those rows."""
        a, b = rows
        pts = [self._source_of(a, 0, height, width),
               self._source_of(b - 1, (height if self.quarter_turns % 2 else width) - 1,
                               height, width)]
        ys, xs = [p[0] for p in pts], [p[1] for p in pts]
        return min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1

    def _source_of(self, y: int, x: int, h: int, w: int) -> Tuple[int, int]:
        """The source pixel of result pixel (y, x): the turns undone, then
        the flips (the reverse of Augment.geometry's order)."""
        k = self.quarter_turns % 4            # rot90 k: out[y][x] = in[x][w-1-y] (k=1)
        if k == 1:
            y, x = x, w - 1 - y
        elif k == 2:
            y, x = h - 1 - y, w - 1 - x
        elif k == 3:
            y, x = h - 1 - x, y
        if self.flip_h:
            y = h - 1 - y
        if self.flip_w:
            x = w - 1 - x
        return y, x


class Augment:
    """Augmentation of a uint8 ``3 x H x W`` image, drawn from ``generator``
    (or torch's default generator, which DataLoader seeds per worker):

    * ``flip``: horizontal and vertical flips, each with probability 1/2;
    * ``rot90``: a rotation by k * 90 degrees, k uniform in 0..3 (square
      images only, so the size stays; skipped for non-square ones);
    * light colour jitter: brightness, contrast and saturation factors drawn
      uniformly from ``[1 - b, 1 + b]`` etc., applied in float32 and rounded
      back to uint8 (0 turns a jitter off): each pixel scaled by the
      brightness, moved away from its grey (0.299 R + 0.587 G + 0.114 B) by
      the saturation, then away from the image's mean by the contrast. The
      mean is worked out in float64 from the exact integer sums of the
      image's channels, so it is the same however the image is split: a
      part of the image is jittered exactly as in the whole, given the
      whole's sums (:meth:`colour`; how a tile-parallel rank that reads
      only its rows jitters them).

    The result is uint8 of the same shape. ``draw`` / ``geometry`` /
    ``colour`` are the three steps of a call."""

    def __init__(self, flip: bool = True, rot90: bool = True, brightness: float = 0.1,
                 contrast: float = 0.1, saturation: float = 0.1):
        for name, v in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"streamcnn: Augment {name} must be in [0, 1), got {v!r}")
        self.flip, self.rot90 = bool(flip), bool(rot90)
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __repr__(self):
        return (f"Augment(flip={self.flip}, rot90={self.rot90}, brightness={self.brightness}, "
                f"contrast={self.contrast}, saturation={self.saturation})")

    def draw(self, height: int, width: int,
             generator: Optional[torch.Generator] = None) -> AugmentDraw:
        """The random choices for a ``height x width`` image (six uniform
        numbers from ``generator``, whatever is switched off)."""
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        k = min(3, int(u[2] * 4)) if self.rot90 and height == width else 0
        return AugmentDraw(self.flip and u[0] < 0.5, self.flip and u[1] < 0.5, k,
                           1 + self.brightness * (2 * u[3] - 1),
                           1 + self.contrast * (2 * u[4] - 1),
                           1 + self.saturation * (2 * u[5] - 1))

    @staticmethod
    def geometry(img: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
        """The flips, then the quarter turns, of ``C x H x W`` ``img`` (a
        whole image or the :meth:`AugmentDraw.source_box` of some rows),
        as ``torch.rot90(img.flip(...), k, dims=(1, 2))`` gives it, made
        with at most one copy: the flips of ``rot90`` (k = 1: columns, 2:
        both, 3: rows) are folded into the draw's, and an odd turn is a
        transposed view (:func:`contiguous` copies it in blocks)."""
        k = d.quarter_turns % 4
        dims = [dim for dim, flip in ((1, d.flip_h != (k in (2, 3))),
                                      (2, d.flip_w != (k in (1, 2)))) if flip]
        if dims:
            img = img.flip(dims)
        return img.transpose(1, 2) if k % 2 else img

    @staticmethod
    def colour(img: torch.Tensor, d: AugmentDraw, sums: Sequence[int],
               pixels: int) -> torch.Tensor:
        """The colour jitter of ``img`` (uint8 ``3 x h x w``: the image or
        any part of it), given the per-channel sums ``sums`` of the whole
        image's uint8 values and its number of pixels. Each result pixel
        depends only on its own value and these numbers."""
        b, c, s = d.brightness, d.contrast, d.saturation
        if (b, c, s) == (1.0, 1.0, 1.0):
            return img
        m = [float(int(v)) / pixels for v in sums]
        # the mean of x below over the whole image, from the exact sums
        mean = b * ((1 - s) * (0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2])
                    + s * (m[0] + m[1] + m[2]) / 3)
        # contiguous whatever img's strides: the jitter of a turned view
        # is also its (cache-friendly) copy
        out = torch.empty(img.shape, dtype=img.dtype, device=img.device)
        # in bands of rows: the float32 temporaries stay small (a whole
        # 8192² image at once peaked at 14x its uint8 size), and each
        # pixel's arithmetic is the same in any band
        # (in place: the same float32 operations as grey + s * (x - grey),
        # each commuted exactly, at half the time of new tensors)
        for rows in _row_bands(img):
            x = img[:, rows].float().mul_(b)
            grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
            x.sub_(grey).mul_(s).add_(grey)             # saturation around the grey
            x.sub_(mean).mul_(c).add_(mean)             # contrast around the mean
            out[:, rows] = x.round_().clamp_(0, 255)
        return out

    def __call__(self, img: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError("streamcnn: Augment expects a uint8 3 x H x W image, got "
                             f"{img.dtype} {tuple(img.shape)}")
        d = self.draw(img.shape[1], img.shape[2], generator)
        # flips and turns move pixels and the jitter maps each pixel alone,
        # given the channel sums (which the moves keep): the sums of the
        # image as read (contiguous, faster) and the jitter of the moved view
        # (its result is contiguous, so the turn's copy comes free)
        sums = channel_sums(img).tolist()
        return contiguous(self.colour(self.geometry(img, d), d, sums,
                                      img.shape[1] * img.shape[2]))


def read_table(table: Union[str, os.PathLike, Sequence[Tuple[str, object]]]
               ) -> List[Tuple[str, str]]:
    """``(path, label)`` rows of a CSV file with a ``path,label`` header (other
    columns are ignored; relative paths are relative to the CSV's folder) or
    of a sequence of pairs."""
    return [(p, label) for p, label, _ in _read_rows(table)]


def _decode(data: bytes, what: str, name: str) -> str:
    """The text of a table's bytes by its byte-order mark: UTF-8 (also
    without one) or UTF-16 LE/BE (Excel's "Unicode text"). Other bytes (a
    Latin-1 or cp1252 file, UTF-16 without a mark) are refused naming the
    line of the first bad one, not guessed."""
    enc = "utf-8"
    for bom, e in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                   (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            data, enc = data[len(bom):], e
            break
    try:
        text = data.decode(enc)
        bad = text.find("\0")
    except UnicodeDecodeError as e:
        text = data[:e.start].decode(enc, "replace")
        bad = len(text)
    if bad < 0:
        return text
    line = text[:bad].replace("\r\n", "\n").replace("\r", "\n").count("\n") + 1
    raise ValueError(f"streamcnn: {what} {name} is not {enc.upper()} text (line {line}): "
                     "save it as 'CSV UTF-8'")


def _is_blank(line: str) -> bool:
    """A line of no text: empty, or only separators (a spreadsheet's ``,,``)."""
    return not line.strip(" \t\r\n,;\"")


def table_reader(text: str):
    """A ``csv.reader`` of a slide table's text (any line ends: LF, CRLF, an
    old Mac's CR): comma-separated, or semicolon- or tab-separated when the
    header (its first non-blank line) has no comma (as spreadsheets write
    them in some locales)."""
    lines = io.StringIO(text, newline="")
    header = next((ln for ln in lines if not _is_blank(ln)), "")
    delimiter = ","
    if "," not in header and header.count(";") + header.count("\t"):
        delimiter = max(";\t", key=header.count)
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)


_DECIMAL_COMMA = re.compile(r"[+-]?[0-9]+,[0-9]+")


def read_csv(path: Union[str, os.PathLike], columns: Sequence[str], what: str = "table"
             ) -> Tuple[str, List[Tuple[int, Dict[str, str]]]]:
    """``(folder of the file, [(line, row)])`` of a CSV table whose header
    has ``columns`` (named in any case, spaces around them ignored; each at
    most once), as spreadsheets save it too (see :func:`_decode` and
    :func:`table_reader`): each row a dict of its stripped cells by
    lower-case column name (missing ones empty; in a semicolon- or
    tab-separated table a number with a decimal comma, ``0,25``, outside the
    ``path`` column becomes ``0.25``) with the line it ends on;
    blank lines before the header and blank rows (no cell filled, e.g. a
    spreadsheet's trailing ``,,``) left out. A missing file raises
    ``FileNotFoundError``, an unreadable or malformed one ``ValueError``,
    each naming ``what`` and the file."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"streamcnn: {what} {name} is a directory, not a CSV file")
    try:
        with open(name, "rb") as f:
            text = _decode(f.read(), what, name)
    except FileNotFoundError:
        raise FileNotFoundError(f"streamcnn: {what} {name} does not exist") from None
    except OSError as e:
        raise ValueError(f"streamcnn: cannot read {what} {name}: {e}") from None
    reader = table_reader(text)
    try:
        header = [c.strip() for c in next((r for r in reader if not _is_blank("".join(r))),
                                          [])]
        fields = [c.lower() for c in header]
        twice = sorted({c for c in fields if c and fields.count(c) > 1})
        if twice:
            raise ValueError(f"streamcnn: {what} {name} line {reader.line_num}: the header "
                             f"has more than one {twice[0]!r} column")
        if not all(c in fields for c in columns):
            need = f"a {columns[0]!r} column" if len(columns) == 1 else \
                " and ".join(map(repr, columns)) + " columns"
            raise ValueError(f"streamcnn: {what} {name} needs a header with {need}, "
                             f"got {header}")
        # semicolon or tab tables come from locales that write 0,25 for 0.25
        comma = reader.dialect.delimiter != ","
        rows = []
        for cells in reader:
            cells = [c.strip() for c in cells[:len(fields)]]
            if comma:
                cells = [c.replace(",", ".") if f != "path" and _DECIMAL_COMMA.fullmatch(c)
                         else c for f, c in zip(fields, cells)]
            if any(cells):
                rows.append((reader.line_num, dict(zip(fields, cells + [""] * len(fields)))))
    except csv.Error as e:
        raise ValueError(f"streamcnn: {what} {name}: {e}") from None
    return os.path.dirname(os.path.abspath(name)), rows


def _read_rows(table) -> List[Tuple[str, object, Optional[float]]]:
    """``(path, label, mpp)`` rows: a CSV's optional ``mpp`` column (empty:
    None), or the third item of a sequence's triples."""
    if isinstance(table, (str, os.PathLike)):
        name = os.fspath(table)
        base, lines = read_csv(name, ("path", "label"), "slide table")
        rows = []
        for line, row in lines:
            where = f"slide table {name} line {line}"
            rows.append((row_path(base, row, where), _label(row["label"], where),
                         _row_mpp(row.get("mpp", ""), where)))
    else:
        rows = []
        for i, item in enumerate(table):
            try:
                p, label, *rest = item
                if len(rest) > 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"streamcnn: table row {i} must be a (path, label) pair or "
                                 f"a (path, label, mpp) triple, got {item!r}") from None
            mpp = _row_mpp(rest[0] if rest else None, f"table row {i}")
            rows.append((os.fspath(p), _label(label, f"table row {i}"), mpp))
    if not rows:
        raise ValueError("streamcnn: the slide table is empty")
    return rows


def _label(v, where: str) -> Union[int, str]:
    """A row's label: an int (numpy's and a one-element integer tensor's
    too) or its text; an empty one is refused, naming ``where``."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    text = "" if v is None else str(v).strip()
    if not text:
        raise ValueError(f"streamcnn: {where}: the label is empty")
    return text


def row_path(base: str, row: Dict[str, str], where: str) -> str:
    """A table row's ``path`` cell, relative to the table's folder ``base``
    unless absolute; an empty one raises a ValueError naming ``where``."""
    p = row.get("path", "")
    if not p:
        raise ValueError(f"streamcnn: {where}: empty path")
    return p if os.path.isabs(p) else os.path.join(base, p)


def _row_mpp(value, where: str) -> Optional[float]:
    """A row's microns per pixel (None or empty: the slide's own)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"streamcnn: {where}: mpp {value!r} is not a positive number")
    return v


class SlideDataset(torch.utils.data.Dataset):
    """One image per slide: ``(uint8 3 x S x S, label)``.

    ``table``: a CSV file with a ``path,label`` header (or a sequence of
    ``(path, label)`` pairs). Labels that are all integers are used as
    such; otherwise they are class names, numbered in sorted order
    (``.classes``: names that are numbers by value, then the others as
    text); an empty label is refused. ``size``: ``S`` or ``(H, W)``. Exactly one of ``mpp``
    (the microns per pixel to read at) or ``level``.

    The microns per level-0 pixel of a slide are, in this order: the row's
    own (an ``mpp`` column of the CSV, or ``(path, label, mpp)`` triples),
    what the slide file says (``Slide.mpp``), ``slide_mpp`` (for files that
    say nothing, e.g. PNG or JPEG images). A slide with none of them is
    refused when read at ``mpp``.

    ``crop``:

    * ``"tissue"`` — the tissue bounding box (Otsu on saturation of a
      thumbnail, see ``Slide.tissue_box``), centred in the image; where the
      tissue is smaller than ``S`` the rest is the slide's background colour,
      where it is larger the centre ``S`` of it is kept. A slide without
      tissue gives its centre.
    * ``"center"`` — the ``S x S`` window at the slide's centre (outside the
      slide: background).
    * ``"random"`` — an ``S x S`` window centred on a random tissue pixel (a
      random position when there is no tissue).

    ``augment``: ``True`` for ``Augment()``, an ``Augment``, or any callable
    ``uint8 image -> image``. Randomness (random crops, augmentation)
    comes from torch's default generator, which DataLoader seeds per worker;
    with ``seed`` it is a function of ``(seed, epoch, index)`` instead
    (``set_epoch`` like DistributedSampler), so runs repeat exactly.

    Slides are opened lazily in the process that reads them (at most
    ``max_open`` at a time, least recently used closed first; of plain
    images, decoded whole, at most ``max_decoded``), so the
    dataset works with ``DataLoader(num_workers > 0)`` under fork or spawn.
    Tissue geometry is computed once per slide and process.
    """

    def __init__(self, table, size: Union[int, Sequence[int]], *, mpp: Optional[float] = None,
                 level: Optional[int] = None, crop: str = "tissue",
                 augment: Union[bool, Callable, None] = None, seed: Optional[int] = None,
                 tolerance: float = 0.05, threads: Optional[int] = None, max_open: int = 16,
                 tissue_thumbnail: int = 1024, slide_mpp: Optional[float] = None,
                 max_decoded: int = 2):
        rows = _read_rows(table)
        if slide_mpp is not None:
            slide_mpp = _row_mpp(slide_mpp, "slide_mpp")
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"streamcnn: size must be S or (H, W), got {size!r}") from None
        if h < 1 or w < 1 or h * w > (1 << 34):
            raise ValueError(f"streamcnn: size {h} x {w} must be positive and at most 2^34 "
                             "pixels")
        if (mpp is None) == (level is None):
            raise ValueError("streamcnn: give exactly one of mpp= or level=")
        if mpp is not None and not mpp > 0:
            raise ValueError(f"streamcnn: mpp must be positive, got {mpp!r}")
        if level is not None and (not isinstance(level, int) or level < 0):
            raise ValueError(f"streamcnn: level must be a non-negative int, got {level!r}")
        if crop not in _CROPS:
            raise ValueError(f"streamcnn: crop must be one of {_CROPS}, got {crop!r}")
        if augment is True:
            augment = Augment()
        elif augment is False:
            augment = None
        if augment is not None and not callable(augment):
            raise TypeError(f"streamcnn: augment must be True/False or a callable, got "
                            f"{augment!r}")
        if max_open < 1 or max_decoded < 1:
            raise ValueError(f"streamcnn: max_open and max_decoded must be positive, got "
                             f"{max_open} and {max_decoded}")
        missing = [p for p, _, _ in rows if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"streamcnn: slide not found: {missing[0]!r}{more}")
        labels = [lab for _, lab, _ in rows]
        ints = [_as_int(v) for v in labels]
        if all(v is not None for v in ints):
            self.classes: Optional[List[str]] = None
            self.labels = ints
        else:
            # names that are numbers ("0.5", "10") in the order of their
            # values (not "10" before "2"), then the others as text
            self.classes = sorted({str(v) for v in labels}, key=_class_order)
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[str(v)] for v in labels]
        self.paths = [p for p, _, _ in rows]
        self.mpps: List[Optional[float]] = [m for _, _, m in rows]
        self.slide_mpp, self.max_decoded = slide_mpp, max_decoded
        self.size = (h, w)
        self.mpp, self.level, self.crop = mpp, level, crop
        self.augment, self.seed = augment, seed
        # the epoch in shared memory: DataLoader workers that persist across
        # epochs (persistent_workers=True) see set_epoch too (they hold a
        # copy of the dataset made when they started)
        self._epoch = torch.zeros(1, dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except RuntimeError:      # no shared memory here (/dev/shm): workers
            pass                  # started after set_epoch still see it
        self.tolerance, self.threads, self.max_open = tolerance, threads, max_open
        self.tissue_thumbnail = tissue_thumbnail
        self._tissue: Dict[str, Tuple] = {}
        self._open: "OrderedDict[str, Slide]" = OrderedDict()
        self._pid = os.getpid()

    # -- bookkeeping ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """With ``seed``: draw the random crops/augmentations of ``epoch``
        (also in DataLoader workers already running: persistent_workers)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()          # handles stay in their process
        return state

    def close(self) -> None:
        """Close the slides this process holds open."""
        while self._open:
            self._open.popitem(last=False)[1].close()

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def slide(self, i: int) -> Slide:
        """The open ``Slide`` of row ``i`` (opened in this process on first use)."""
        if self._pid != os.getpid():            # forked: the parent's handles are not ours
            self._open = OrderedDict()
            self._pid = os.getpid()
        path, mpp = self.paths[i], self.mpps[i]
        key = (path, mpp)
        s = self._open.get(key)
        if s is None:
            s = Slide(path, mpp=mpp, default_mpp=self.slide_mpp)
            self._open[key] = s
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            decoded = [k for k, v in self._open.items() if v.in_memory]
            for k in decoded[:max(0, len(decoded) - self.max_decoded)]:
                self._open.pop(k).close()
        else:
            self._open.move_to_end(key)
        return s

    # -- geometry ------------------------------------------------------------------------
    def _downsample(self, s: Slide) -> float:
        if self.mpp is not None:
            if s.mpp is None:
                raise ValueError(f"streamcnn: {s.path!r} has no microns-per-pixel metadata "
                                 "(openslide.mpp-x): give it in an mpp column of the table "
                                 "or as slide_mpp=, or use level=")
            return s.downsample_for_mpp(self.mpp)  # refuses pixels that are not square
        if self.level >= s.level_count:
            raise ValueError(f"streamcnn: level {self.level} is out of range for {s.path!r} "
                             f"(levels 0 .. {s.level_count - 1})")
        return s.level_downsamples[self.level]

    def _tissue_of(self, s: Slide):
        t = self._tissue.get(s.path)
        if t is None:
            t = self._tissue[s.path] = tissue_geometry(s, self.tissue_thumbnail)
        return t

    def _generator(self, i: int) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)

    def window(self, i: int, generator: Optional[torch.Generator] = None):
        """Where item ``i`` is read: ``(x, y, w, h)`` in level-0 pixels of
        the part read from the slide, its ``(row, col)`` offset in the output
        image, its size ``(h, w)`` in output pixels, and the downsample
        (:func:`crop_window`)."""
        s = self.slide(i)
        return crop_window(s, self._downsample(s), self.size, self.crop,
                           lambda: self._tissue_of(s), generator)

    # -- items ---------------------------------------------------------------------------
    def read(self, i: int, generator: Optional[torch.Generator] = None,
             box: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The image of item ``i`` before augmentation (uint8 3 x H x W);
        with ``box = (x, y, w, h)`` only that part of it, bit for bit as in
        the whole image, reading only the slide pixels it needs."""
        return self._read_window(self.slide(i), self.window(i, generator), box)

    def _read_window(self, s: Slide, win, box: Optional[Sequence[int]]) -> torch.Tensor:
        return read_window(s, win, self.size, box, tolerance=self.tolerance,
                           threads=self.threads)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        i = self._index(i)
        g = self._generator(i)
        img = self.read(i, g)
        if self.augment is not None:
            img = self.augment(img, g) if isinstance(self.augment, Augment) \
                else self.augment(img)
        return img, self.labels[i]

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"streamcnn: index {i} out of range for {len(self)} slides")
        return i % len(self)

    def read_rows(self, i: int, rows: Tuple[int, int],
                  sum_rows: Optional[Tuple[int, int]] = None) -> dict:
        """Rows ``[a, b)`` of item ``i`` as ``self[i]`` gives it, reading
        only the slide pixels they need (what a tile-parallel rank reads).

        The flips and turns are applied; the colour jitter is not, because
        its contrast needs the sums of the whole image: the result holds
        ``part`` (uint8 3 x (b - a) x W, geometry only), ``draw`` (the
        augmentation's :meth:`AugmentDraw.as_tensor`; the identity without
        augmentation) and ``sums`` (int64, the per-channel sums of the
        rows ``sum_rows``, which must lie inside ``[a, b)``: the ranks sum
        disjoint rows covering the image, all-reduce, and call
        :meth:`Augment.colour` with the total). Same random numbers as
        ``self[i]``. ``a == b`` gives no rows (an empty band)."""
        i = self._index(i)
        oh, ow = self.size
        a, b = (int(v) for v in rows)
        s0, s1 = (a, a) if sum_rows is None else (int(v) for v in sum_rows)
        if not 0 <= a <= b <= oh or not a <= s0 <= s1 <= b:
            raise ValueError(f"streamcnn: rows {(a, b)} and sum_rows {(s0, s1)} must satisfy "
                             f"0 <= a <= sum_rows <= b <= {oh}")
        if self.augment is not None and not isinstance(self.augment, Augment):
            raise ValueError("streamcnn: read_rows needs augment=None/True or an Augment "
                             f"(a callable {self.augment!r} works on whole images only)")
        g = self._generator(i)
        s = self.slide(i)
        win = self.window(i, g)
        d = self.augment.draw(oh, ow, g) if self.augment is not None else AugmentDraw()
        # the width of the result (the turns keep the size: square images)
        part = torch.empty((3, 0, ow), dtype=torch.uint8)
        if b > a:
            part = contiguous(Augment.geometry(
                self._read_window(s, win, d.source_box(oh, ow, (a, b))), d))
        sums = channel_sums(part[:, s0 - a:s1 - a])
        return {"part": part, "sums": sums, "draw": d.as_tensor()}


def tissue_geometry(s: Slide, thumbnail: int = 1024
                    ) -> Tuple[Optional[Tuple[int, int, int, int]], Optional[torch.Tensor]]:
    """The tissue of slide ``s`` as the crops use it: its level-0 bounding
    box ``(x, y, w, h)`` and up to 4096 level-0 points of it (``n x 2``,
    x then y), from the tissue mask of a thumbnail of longest side
    ``thumbnail``; ``(None, None)`` without tissue."""
    mask, ds = s.tissue_mask(thumbnail)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None, None
    box = box_of_mask(mask, ds, s.dimensions)  # one thumbnail read
    keep = torch.linspace(0, ys.numel() - 1, min(ys.numel(), 4096)).long()
    pts = torch.stack([(xs[keep].double() + 0.5) * ds, (ys[keep].double() + 0.5) * ds], dim=1)
    return box, pts


def crop_window(s: Slide, d: float, size: Tuple[int, int], crop: str,
                tissue: Callable[[], Tuple], generator: Optional[torch.Generator] = None):
    """Where the ``size = (H, W)`` image of ``crop`` (see
    :class:`SlideDataset`) is read from slide ``s`` at downsample ``d``:
    ``(x, y, w, h)``, the level-0 origin and the size in output pixels of
    the part read from the slide, its ``(row, col)`` offset in the output
    image, its size ``(h, w)``, and ``d``. Output pixel ``(i, j)`` is at
    level-0 ``(x + (j - col) d, y + (i - row) d)``. ``tissue()`` gives
    :func:`tissue_geometry` (called only for the crops that need it)."""
    oh, ow = size
    w0, h0 = s.dimensions
    if crop == "tissue":
        box, _ = tissue()
        if box is None:
            box = (0, 0, w0, h0)
        bx, by, bw, bh = box
        rw, rh = min(ow, max(1, round(bw / d))), min(oh, max(1, round(bh / d)))
        cx, cy = bx + bw / 2, by + bh / 2
        x, y = round(cx - rw * d / 2), round(cy - rh * d / 2)
        return (x, y, rw, rh), ((oh - rh) // 2, (ow - rw) // 2), (rh, rw), d
    if crop == "center":
        cx, cy = w0 / 2, h0 / 2
    else:
        _, pts = tissue()
        if pts is None:
            u = torch.rand(2, generator=generator, dtype=torch.float64)
            cx, cy = u[0].item() * w0, u[1].item() * h0
        else:
            k = int(torch.randint(0, pts.shape[0], (1,), generator=generator))
            cx, cy = pts[k].tolist()
    x, y = round(cx - ow * d / 2), round(cy - oh * d / 2)
    return (x, y, ow, oh), (0, 0), (oh, ow), d


def read_window(s: Slide, win, size: Tuple[int, int], box: Optional[Sequence[int]] = None,
                tolerance: float = 0.05, threads: Optional[int] = None) -> torch.Tensor:
    """The ``size = (H, W)`` uint8 image of window ``win``
    (:func:`crop_window`) of slide ``s``, the slide's background colour
    where the window has no slide pixels; with ``box = (x, y, w, h)`` only
    that part of it, bit for bit as in the whole image, reading only the
    slide pixels it needs."""
    (x, y, rw, rh), (r0, c0), _, d = win
    oh, ow = size
    bx, by, bw, bh = _check_box(box, ow, oh, "image")
    # the part of the read window (at (r0, c0), rh x rw) inside the box
    ix0, ix1 = max(bx, c0), min(bx + bw, c0 + rw)
    iy0, iy1 = max(by, r0), min(by + bh, r0 + rh)
    part = None
    if ix1 > ix0 and iy1 > iy0:
        part = s.read_scaled((x, y), d, (rw, rh), tolerance=tolerance, threads=threads,
                             box=(ix0 - c0, iy0 - r0, ix1 - ix0, iy1 - iy0))
        if (ix0, iy0, ix1, iy1) == (bx, by, bx + bw, by + bh):
            return part
    out = torch.tensor(s.background, dtype=torch.uint8).view(3, 1, 1).expand(
        3, bh, bw).contiguous()
    if part is not None:
        out[:, iy0 - by:iy1 - by, ix0 - bx:ix1 - bx] = part
    return out


def _class_order(name: str) -> Tuple[int, float, str]:
    try:
        f = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, f, name) if math.isfinite(f) else (1, 0.0, name)


def _as_int(v) -> Optional[int]:
    """A label that is an integer (``3``, ``"3"``, or ``"3.0"`` as pandas
    writes a float column) as an int; None for a class name."""
    try:
        return int(str(v))
    except ValueError:
        pass
    try:
        f = float(str(v))
    except ValueError:
        return None
    return int(f) if f.is_integer() else None
