"""streamcnn — train CNNs end to end on gigapixel images by streaming the
memory-heavy stem tile by tile, with outputs and gradients equal to the
whole-image pass.

    import streamcnn
    stem = streamcnn.StreamingModule(nn.Sequential(...).eval(), tile_size=1024)
    loss = head(stem(image)).sum(); loss.backward()
"""

from ._library import (backward_tiles, band_info, cone_info, library_path, load_library,
                       macs_executed, program_info, tiling_info, work_info)
from . import data, models, ops, progress, reference
from .module import StreamingModule
from .program import convert
from .slide import Slide

__version__ = "0.1.0"

__all__ = [
    "Slide",
    "StreamingModule",
    "backward_tiles",
    "band_info",
    "cone_info",
    "data",
    "convert",
    "library_path",
    "load_library",
    "macs_executed",
    "models",
    "ops",
    "program_info",
    "progress",
    "reference",
    "tiling_info",
    "work_info",
]
