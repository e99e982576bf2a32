"""Data: slide datasets and synthetic slides."""

from . import synthetic
from .dataset import Augment, SlideDataset, read_table

__all__ = ["Augment", "SlideDataset", "read_table", "synthetic"]
