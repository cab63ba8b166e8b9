"""spotocc: SPOT-Occ and the SparseOcc baseline for camera-based 3D semantic occupancy, in plain PyTorch."""

__version__ = "0.1.0"
