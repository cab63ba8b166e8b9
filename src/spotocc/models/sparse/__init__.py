"""Sparse 3D convolution behind one interface, the SparseLatentDiffuser encoder and its pyramid neck."""
