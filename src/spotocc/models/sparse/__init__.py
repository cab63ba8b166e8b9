"""Sparse 3D convolution behind one interface, the SparseLatentDiffuser encoder and its pyramid neck."""

from spotocc.models.sparse.conv import (
    SPARSE_BACKENDS,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseModule,
    SparseSequential,
    SparseTensor,
    SubMConv3d,
    resolve_backend,
    set_sparse_backend,
)
from spotocc.models.sparse.encoder import RELEASED_NAME_MAP, SparseLatentDiffuser
from spotocc.models.sparse.pyramid import SparseFeaturePyramid

__all__ = [
    "RELEASED_NAME_MAP",
    "SPARSE_BACKENDS",
    "SparseConv3d",
    "SparseConvTranspose3d",
    "SparseFeaturePyramid",
    "SparseLatentDiffuser",
    "SparseModule",
    "SparseSequential",
    "SparseTensor",
    "SubMConv3d",
    "resolve_backend",
    "set_sparse_backend",
]
