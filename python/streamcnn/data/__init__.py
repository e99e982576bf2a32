"""Data: slide datasets and synthetic slides."""

from . import synthetic
from .dataset import Augment, AugmentDraw, SlideDataset, read_table

__all__ = ["Augment", "AugmentDraw", "SlideDataset", "read_table", "synthetic"]
