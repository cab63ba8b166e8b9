"""Occupancy models: image backbone, LSS view transformer, sparse voxel encoder and neck, heads."""
