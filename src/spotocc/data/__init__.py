"""Datasets, augmentation, depth targets and the synthetic scene generator."""

from spotocc.data.batch import collate

__all__ = ["collate"]
