"""Synthetic checkpoints in the released (mmcv-era) layout, built from the listings next to this file.

Independent of spotocc's converter: names and shapes come from the released listings, BatchNorm
buffers from which released modules are BatchNorms (spec: image backbone, image neck, depth net and
sparse encoder use (Sync)BN; the voxel neck and the head use GroupNorm / LayerNorm), and the view
transformer's geometry from the released formulas (``gen_dx_bx`` / ``create_frustum``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch

HERE = Path(__file__).parent
PRESETS = ("spotocc_nusc_256", "spotocc_kitti", "sparseocc_nusc_256", "sparseocc_kitti")

# released top-level modules whose 1-D ``.weight`` tensors belong to BatchNorms
_BATCHNORM_PREFIXES = ("img_backbone.", "img_neck.", "img_view_transformer.", "img_bev_encoder_backbone.")

# the released configs' geometry: point cloud range, occupancy size, LSS downsample, network input
RELEASED_GRIDS = {
    "nusc": dict(
        pc_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0], occ_size=[512, 512, 40], lss=4, input=(256, 704)
    ),
    "kitti": dict(
        pc_range=[0, -25.6, -2, 51.2, 25.6, 4.4], occ_size=[256, 256, 32], lss=2, input=(384, 1280)
    ),
}
RELEASED_DBOUND = (2.0, 58.0, 0.5)


def dataset_of(preset: str) -> str:
    return "kitti" if "kitti" in preset else "nusc"


def released_parameters(preset: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every released parameter, in file order."""
    out = {}
    for line in (HERE / f"{preset}.txt").read_text().splitlines():
        name, shape = line.split(" ", 1)
        out[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


def is_batchnorm_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 1 and name.startswith(_BATCHNORM_PREFIXES)


def released_geometry(dataset: str, input_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """dx, bx, nx, frustum as the released view transformer computed them (float32)."""
    g = RELEASED_GRIDS[dataset]
    pc, occ, lss = g["pc_range"], g["occ_size"], g["lss"]
    bounds = [[pc[i], pc[i + 3], (pc[i + 3] - pc[i]) / occ[i] * lss] for i in range(3)]
    dx = torch.tensor([row[2] for row in bounds], dtype=torch.float32)
    bx = torch.tensor([row[0] + row[2] / 2.0 for row in bounds], dtype=torch.float32)
    nx = torch.tensor([(row[1] - row[0]) / row[2] for row in bounds], dtype=torch.float32)
    h, w = input_size or g["input"]
    fh, fw = h // 16, w // 16
    ds = torch.arange(*RELEASED_DBOUND, dtype=torch.float).view(-1, 1, 1).expand(-1, fh, fw)
    d = ds.shape[0]
    xs = torch.linspace(0, w - 1, fw, dtype=torch.float).view(1, 1, fw).expand(d, fh, fw)
    ys = torch.linspace(0, h - 1, fh, dtype=torch.float).view(1, fh, 1).expand(d, fh, fw)
    return {"dx": dx, "bx": bx, "nx": nx, "frustum": torch.stack((xs, ys, ds), -1)}


def released_state_dict(preset: str, *, seed: int | None = 0) -> OrderedDict[str, torch.Tensor]:
    """Every released tensor of ``preset`` (parameters, BN buffers, geometry).

    ``seed`` int: random values (unique per tensor); ``seed=None``: free stride-0 placeholders (for
    name/shape tests only).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    geometry = released_geometry(dataset_of(preset))

    def values(shape: tuple[int, ...], kind: str = "normal") -> torch.Tensor:
        if gen is None:
            return torch.zeros((), dtype=torch.long if kind == "count" else torch.float32).expand(shape)
        if kind == "count":
            return torch.randint(1, 10**9, shape, generator=gen)
        if kind == "positive":
            return torch.rand(shape, generator=gen) + 0.5
        return torch.randn(shape, generator=gen)

    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in released_parameters(preset).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("img_view_transformer.") and leaf in geometry:
            state[name] = geometry[leaf].clone()
            continue
        state[name] = values(shape)
        if is_batchnorm_weight(name, shape):
            module = name.removesuffix("weight")
            state[module + "running_mean"] = values(shape)
            state[module + "running_var"] = values(shape, "positive")
            state[module + "num_batches_tracked"] = values((), "count")
    return state


def mmcv_checkpoint(state: dict[str, torch.Tensor], **meta_extra) -> dict:
    """The dict mmcv 1.4's ``save_checkpoint`` pickles (meta with plain Python values + state dict)."""
    meta = {
        "mmcv_version": "1.4.0",
        "time": "Thu Jan  1 00:00:00 2024",
        "epoch": 24,
        "iter": 84384,
        "config": "model = dict(type='SpotOcc')\n",
        "CLASSES": ("empty", "barrier", "bicycle"),
        "env_info": "sys.platform: linux",
        "seed": 0,
        "hook_msgs": {"last_ckpt": "work_dirs/epoch_24.pth"},
    }
    meta.update(meta_extra)
    return {"meta": meta, "state_dict": OrderedDict(state)}


def fingerprint(tensor: torch.Tensor) -> tuple:
    """Shape, dtype, first and last values: unique for the random tensors of :func:`released_state_dict`."""
    flat = tensor.detach().reshape(-1)
    return (tuple(tensor.shape), str(tensor.dtype), tuple(flat[:8].tolist()), tuple(flat[-8:].tolist()))
