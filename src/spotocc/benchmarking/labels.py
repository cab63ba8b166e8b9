"""Realistic synthetic head outputs and the timing / memory benchmark of ``occupancy_labels``."""

from __future__ import annotations

import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spotocc.engine.atomic import write_bytes_atomic
from spotocc.models.labels import class_probs_from_logits, occupancy_labels

# Class roles per preset: which class ids are ground regions, buildings, vegetation, vehicles and
# small objects. Ids follow spotocc.data.classes (class 0 = empty in both).
_ROLES = {
    "nuscenes": {
        "num_classes": 17,
        "road": 11,
        "sidewalk": 13,
        "terrain": 14,
        "other_flat": 12,
        "building": 15,
        "vegetation": 16,
        "trunk": 16,
        "vehicles": (4, 4, 4, 4, 10, 3, 9, 5),  # cars dominate
        "small": (7, 7, 8, 1, 2, 6),
        "extent_m": (102.4, 102.4, 8.0),
        "ground_m": 3.2,
    },
    "kitti": {
        "num_classes": 20,
        "road": 9,
        "sidewalk": 11,
        "terrain": 17,
        "other_flat": 10,
        "building": 13,
        "vegetation": 15,
        "trunk": 16,
        "vehicles": (1, 1, 1, 1, 4, 5),
        "small": (6, 7, 2, 3, 18, 19, 14),
        "extent_m": (51.2, 51.2, 6.4),
        "ground_m": 1.7,
    },
}


def _box_sdf(
    pts: torch.Tensor, center: tuple[float, float, float], half: tuple[float, float, float], yaw: float
) -> torch.Tensor:
    """Signed distance to an upright box (positive inside), pts [..., 3] in metres."""
    d = pts - torch.tensor(center)
    c, s = math.cos(yaw), math.sin(yaw)
    local = torch.stack((c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]), dim=-1)
    q = local.abs() - torch.tensor(half)  # [..., 3] > 0 outside along that axis
    outside = q.clamp(min=0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp(max=0)
    return -(outside + inside)


def _ellipsoid_sdf(
    pts: torch.Tensor, center: tuple[float, float, float], radii: tuple[float, float, float]
) -> torch.Tensor:
    """Approximate signed distance to an ellipsoid (positive inside)."""
    r = torch.tensor(radii)
    return (1.0 - ((pts - torch.tensor(center)) / r).norm(dim=-1)) * r.min()


def _semantic_sdfs(grid: tuple[int, int, int], roles: dict, gen: torch.Generator) -> torch.Tensor:
    """Per-class signed distances [C, X, Y, Z] (metres) of one random street scene; class 0 = empty."""
    num_classes = roles["num_classes"]
    ex, ey, ez = roles["extent_m"]
    vs = (ex / grid[0], ey / grid[1], ez / grid[2])
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) * v for n, v in zip(grid, vs)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [X, Y, Z, 3]
    x, y, z = pts.unbind(-1)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    sdf = torch.full((num_classes, *grid), -1e3)
    ground = roles["ground_m"] + 0.25 * torch.sin(x / u(9, 15)) + 0.15 * torch.cos(y / u(7, 13))
    # the ground is a thin sheet (what LiDAR-derived labels contain); below it is empty again
    thickness = u(0.6, 1.0)
    below = torch.minimum(ground - z, z - (ground - thickness))
    # a curved road along x and a straight one along y; sidewalks beside them, terrain elsewhere
    y0, bend, period = ey * u(0.35, 0.65), u(3, 8), u(12, 25)

    def y_road(x_m):  # centre line of the curved road at x
        return y0 + bend * (torch.sin(x_m / period) if torch.is_tensor(x_m) else math.sin(x_m / period))

    x_road = ex * u(0.3, 0.7)
    dist_road = torch.minimum((y - y_road(x)).abs(), (x - x_road).abs())  # [X, Y, Z]
    road_half, walk_out = u(5, 7), u(8, 10)
    regions = {
        roles["road"]: road_half - dist_road,
        roles["sidewalk"]: torch.minimum(walk_out - dist_road, dist_road - road_half),
        roles["terrain"]: dist_road - walk_out,
    }
    patch = torch.full_like(x, -1e3)
    for _ in range(3):  # other-flat patches carved out of the terrain
        cx, cy, r = u(0, ex), u(0, ey), u(3, 7)
        patch = torch.maximum(patch, r - ((x - cx) ** 2 + (y - cy) ** 2).sqrt())
    patch = torch.minimum(patch, dist_road - walk_out)
    regions[roles["terrain"]] = torch.minimum(regions[roles["terrain"]], -patch)
    regions[roles["other_flat"]] = patch
    for cls, region in regions.items():
        sdf[cls] = torch.maximum(sdf[cls], torch.minimum(below, region))

    def place(cls: int, center, half, yaw) -> None:
        sdf[cls] = torch.maximum(sdf[cls], _box_sdf(pts, center, half, yaw))

    for _ in range(14):  # buildings away from the roads
        for _attempt in range(20):
            cx, cy = u(0, ex), u(0, ey)
            if min(abs(cy - y_road(cx)), abs(cx - x_road)) > walk_out + 6:
                break
        height = u(3, ez)
        place(roles["building"], (cx, cy, height / 2), (u(3, 9), u(3, 9), height / 2), u(-0.3, 0.3))
    for _ in range(25):  # trees (crown + trunk) and bushes
        cx, cy = u(0, ex), u(0, ey)
        base = roles["ground_m"]
        if torch.rand((), generator=gen).item() < 0.6:
            r = u(1.5, 3.0)
            crown = _ellipsoid_sdf(pts, (cx, cy, base + u(2.5, 4.0)), (r, r, r * 0.8))
            sdf[roles["vegetation"]] = torch.maximum(sdf[roles["vegetation"]], crown)
            place(roles["trunk"], (cx, cy, base + 1.2), (0.25, 0.25, 1.5), 0.0)
        else:
            bush = _ellipsoid_sdf(pts, (cx, cy, base + 0.3), (u(1, 3), u(1, 3), u(0.6, 1.2)))
            sdf[roles["vegetation"]] = torch.maximum(sdf[roles["vegetation"]], bush)
    for _ in range(30):  # vehicles on the curved road
        cls = roles["vehicles"][int(torch.randint(len(roles["vehicles"]), (), generator=gen))]
        length = 2.3 * (1 + 2 * torch.rand((), generator=gen).item())  # half length
        cx = u(0, ex)
        cy = y_road(cx) + u(-road_half + 1.5, road_half - 1.5)
        place(cls, (cx, cy, roles["ground_m"] + 0.9), (length, 1.0, 0.85), u(-0.15, 0.15))
    for _ in range(25):  # pedestrians, cones, poles, barriers near the road edges
        cls = roles["small"][int(torch.randint(len(roles["small"]), (), generator=gen))]
        side = 1 if torch.rand((), generator=gen).item() < 0.5 else -1
        cx = u(0, ex)
        cy = y_road(cx) + side * u(road_half - 0.5, walk_out)
        place(cls, (cx, cy, roles["ground_m"] + 0.6), (u(0.25, 1.2), u(0.25, 0.5), u(0.4, 0.9)), 0.0)
    sdf[0] = -sdf[1:].max(dim=0).values  # empty: outside everything
    return sdf / min(vs)  # in low-resolution voxels


def _smooth_noise(num: int, grid: tuple[int, int, int], coarse: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency noise [num, X, Y, Z] with unit-ish amplitude."""
    size = tuple(max(2, s // coarse) for s in grid)
    noise = torch.randn((1, num, *size), generator=gen)
    return F.interpolate(noise, size=grid, mode="trilinear", align_corners=True)[0]


def structured_head_outputs(
    *,
    preset: str = "nuscenes",
    grid: tuple[int, int, int] = (128, 128, 10),
    num_queries: int = 100,
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former-like head outputs for random street scenes, to benchmark label formation.

    One "active" query per class present in the scene owns that class's region: its mask logit is a
    saturating function of the signed distance (large positive inside, large negative outside, a
    soft edge of 2-4 logits per low-res voxel) plus smooth noise, and its class probability is high.
    The other queries have no-object-dominant class probabilities and smooth junk masks (half random
    fields, half damped copies of active masks). Empty space (class 0) dominates the volume.

    Returns:
        class_probs [B, Q, C] (no-object column already dropped) and mask_logits [B, Q, X, Y, Z].
    """
    if preset not in _ROLES:
        raise ValueError(f"preset must be one of {sorted(_ROLES)}, got {preset!r}")
    roles = _ROLES[preset]
    num_classes = roles["num_classes"]
    gen = torch.Generator().manual_seed(seed)
    probs, logits = [], []
    for _ in range(batch_size):
        sdf = _semantic_sdfs(grid, roles, gen)  # [C, X, Y, Z]
        labels = sdf.argmax(dim=0)
        present = torch.unique(labels).tolist()
        if len(present) > num_queries:
            raise ValueError(f"num_queries={num_queries} is smaller than the {len(present)} classes present")
        order = torch.randperm(num_queries, generator=gen)
        active_q = order[: len(present)]
        cls_logits = torch.randn((num_queries, num_classes + 1), generator=gen)
        cls_logits[:, -1] += 4 + 4 * torch.rand(num_queries, generator=gen)  # no-object dominant
        mask = torch.empty((num_queries, *grid))
        noise = _smooth_noise(num_queries, grid, 8, gen)
        for q, cls in zip(active_q.tolist(), present):
            cls_logits[q, -1] -= 6
            cls_logits[q, cls] += 5 + 4 * torch.rand((), generator=gen).item()
            sharp = 2 + 2 * torch.rand((), generator=gen).item()  # logits per low-res voxel at the edge
            amp = 8 + 6 * torch.rand((), generator=gen).item()
            mask[q] = amp * torch.tanh(sharp * sdf[cls] / amp) + 0.8 * noise[q]
        for q in order[len(present) :].tolist():
            if torch.rand((), generator=gen).item() < 0.5:
                mask[q] = 3 * noise[q] - 6 * torch.rand((), generator=gen).item()
            else:
                src = active_q[int(torch.randint(len(present), (), generator=gen))]
                mask[q] = (0.5 + 0.5 * torch.rand((), generator=gen).item()) * mask[src] + noise[q]
        probs.append(cls_logits.softmax(dim=-1)[:, :-1])
        logits.append(mask)
    return torch.stack(probs), torch.stack(logits)


def load_head_outputs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int] | None]:
    """Head outputs from an ``.npz``: ``mask_logits`` [B, Q, X, Y, Z] (or [Q, X, Y, Z]) and either
    ``class_probs`` [B, Q, C] or ``cls_logits`` [B, Q, C+1]; optional ``out_size`` (3 ints)."""
    with np.load(path) as data:
        keys = set(data.files)
        if "mask_logits" not in keys or not keys & {"class_probs", "cls_logits"}:
            raise ValueError(
                f"{path}: needs 'mask_logits' and 'class_probs' or 'cls_logits', has {sorted(keys)}"
            )
        mask_logits = torch.from_numpy(np.asarray(data["mask_logits"], dtype=np.float32))
        if "class_probs" in keys:
            class_probs = torch.from_numpy(np.asarray(data["class_probs"], dtype=np.float32))
        else:
            cls_logits = torch.from_numpy(np.asarray(data["cls_logits"], dtype=np.float32))
            class_probs = class_probs_from_logits(cls_logits if cls_logits.dim() == 3 else cls_logits[None])
        out_size = tuple(int(s) for s in data["out_size"]) if "out_size" in keys else None
    if mask_logits.dim() == 4:
        mask_logits = mask_logits[None]
    if class_probs.dim() == 2:
        class_probs = class_probs[None]
    _check_head_shapes(class_probs, mask_logits, f"{path}: ")
    return class_probs, mask_logits, out_size  # type: ignore[return-value]


def _check_head_shapes(class_probs: torch.Tensor, mask_logits: torch.Tensor, where: str = "") -> None:
    if mask_logits.dim() != 5 or class_probs.dim() != 3 or class_probs.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"{where}class_probs {tuple(class_probs.shape)} and mask_logits {tuple(mask_logits.shape)} "
            "are not [B, Q, C] and [B, Q, X, Y, Z]"
        )


def save_head_outputs(
    path: str | Path, class_probs: torch.Tensor, mask_logits: torch.Tensor, out_size: tuple[int, int, int]
) -> None:
    """Write head outputs (``class_probs`` [B, Q, C], ``mask_logits`` [B, Q, X, Y, Z]) and the output
    grid as the compressed ``.npz`` that :func:`load_head_outputs` reads, atomically."""
    _check_head_shapes(class_probs, mask_logits)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        class_probs=class_probs.detach().float().cpu().numpy(),
        mask_logits=mask_logits.detach().float().cpu().numpy(),
        out_size=np.asarray(out_size, dtype=np.int64),
    )
    write_bytes_atomic(path, buffer.getvalue())


def benchmark_labels(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size: tuple[int, int, int],
    *,
    methods: tuple[str, ...] = ("bounded", "direct"),
    repeats: int = 3,
    measure_memory: bool = True,
    **options,
) -> dict:
    """Time (and peak memory of) ``occupancy_labels`` per method on the same inputs, side by side.

    Timing: one warm-up call per method, then ``repeats`` rounds calling the methods in turn; the
    median per method is reported (``<method>_s``) with ``speedup`` = direct / bounded. Labels of all
    methods are compared (``mismatched_voxels``). Work counts of the bounded method: the fraction of
    cells its corner bounds could not decide (``cells_undecided_frac``), of voxels evaluated per voxel
    with a few queries (``voxels_refined_frac``) and with all queries (``voxels_exact_frac``).

    Peak memory (``<method>_peak_mib``): on CUDA the growth of ``max_memory_allocated`` during one
    call; on CPU the growth of the resident set (VmHWM - VmRSS before the call) of a fresh Python
    process that loaded the inputs and ran the method once on a tiny problem to initialise torch.
    """
    device = mask_logits.device
    result: dict = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": mask_logits.shape[0],
        "num_queries": mask_logits.shape[1],
        "num_classes": class_probs.shape[2],
        "grid": tuple(mask_logits.shape[2:]),
        "out_size": tuple(out_size),
    }
    labels = {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:  # warm-up
        labels[method] = occupancy_labels(class_probs, mask_logits, out_size, method, **options)
    for _ in range(repeats):
        for method in methods:
            _sync(device)
            start = time.perf_counter()
            occupancy_labels(class_probs, mask_logits, out_size, method, **options)
            _sync(device)
            times[method].append(time.perf_counter() - start)
    for method in methods:
        result[f"{method}_s"] = statistics.median(times[method])
    if "bounded" in methods and "direct" in methods:
        result["speedup"] = result["direct_s"] / result["bounded_s"]
        result["mismatched_voxels"] = int((labels["bounded"] != labels["direct"]).sum())
    if "bounded" in methods:
        stats: dict = {}
        occupancy_labels(class_probs, mask_logits, out_size, "bounded", stats=stats, **options)
        result["cells_undecided_frac"] = 1.0 - stats["cells_certified_coarse"] / stats["cells"]
        result["cells_refined_certified_frac"] = stats["cells_certified_refined"] / stats["cells"]
        result["voxels_refined_frac"] = stats["voxels_refined"] / stats["voxels"]
        result["voxels_exact_frac"] = stats["voxels_exact"] / stats["voxels"]
    if measure_memory:
        for method in methods:
            result[f"{method}_peak_mib"] = _peak_memory_mib(
                class_probs, mask_logits, out_size, method, options
            )
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(class_probs, mask_logits, out_size, method: str, options: dict) -> float:
    if mask_logits.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        occupancy_labels(class_probs, mask_logits, out_size, method, **options)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save(
            {
                "class_probs": class_probs,
                "mask_logits": mask_logits,
                "out_size": tuple(out_size),
                "method": method,
                "options": options,
            },
            path,
        )
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the directory holding `spotocc`
        env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        done = subprocess.run(
            [sys.executable, "-m", "spotocc.benchmarking.labels", "--memory-probe", str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for method {method!r} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_probe(path: str) -> None:
    """In a fresh process: peak resident-set growth (MiB) of one ``occupancy_labels`` call."""
    job = torch.load(path)
    probs, logits, out_size = job["class_probs"], job["mask_logits"], job["out_size"]
    small = (probs[:1, :4], logits[:1, :4, :4, :4, :4], (8, 8, 8))  # initialise torch's kernels and pools
    occupancy_labels(*small, job["method"], **job["options"])
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    occupancy_labels(probs, logits, out_size, job["method"], **job["options"])
    print((_status_kib("VmHWM") - before) / 1024)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        _memory_probe(sys.argv[2])
    else:
        sys.exit("usage: python -m spotocc.benchmarking.labels --memory-probe INPUTS.pt")
