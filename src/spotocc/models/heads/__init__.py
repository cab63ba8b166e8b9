"""Mask-classification occupancy heads (SPOT-Occ and the SparseOcc baseline) and their parts."""
