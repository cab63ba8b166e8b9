"""Per-stage time and peak memory of the image -> voxel path (nuScenes preset, batch 1 x 6 cameras).

Stages: backbone, neck, depth net, lift+pool (geometry, voxel indices, chunked outer product + index_add_),
each forward+backward in train mode and forward-only under no_grad. Lift+pool is also run with other
chunk sizes and against a "materialised" variant (the released data flow: the whole [B, N, D, fH, fW, C]
lifted tensor, boolean filtering of the kept points, then a sum per voxel) to show what chunking saves.

Peak memory is the growth of the process' resident set over the stage on CPU (Linux: the high-water mark
is reset through /proc/self/clear_refs, and glibc returns large blocks to the OS on free), and
``torch.cuda.max_memory_allocated`` growth on CUDA.

    python benchmarks/bench_image_to_voxel.py [--preset spotocc_nusc_256] [--device cpu] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large blocks via mmap, so freed memory leaves the RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from spotocc.config import get_config  # noqa: E402
from spotocc.models.backbones import ImageBackbone  # noqa: E402
from spotocc.models.image_neck import SECONDFPN  # noqa: E402
from spotocc.models.view_transform import (  # noqa: E402
    ViewTransformer,
    camera_parameter_vector,
    image_aug_transform,
    lift_and_pool,
    voxel_indices,
)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory above the level before ``fn`` (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark
    base = _rss_mib()
    fn()
    return _hwm_mib() - base


def time_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)  # best of reps: the least disturbed by other processes on a shared machine


def _train_step(module: torch.nn.Module, make_inputs: Callable[[], tuple]) -> Callable[[], None]:
    """Forward + backward with a fixed random upstream gradient (dense, in the output's memory layout,
    as a real loss would give; made on the first call, which is the warm-up)."""
    upstream: list[torch.Tensor] = []

    def run() -> None:
        module.zero_grad(set_to_none=True)
        out = module(*make_inputs())
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if not upstream:
            upstream.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, upstream)

    return run


def _infer(module: torch.nn.Module, make_inputs: Callable[[], tuple]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(*make_inputs())

    return run


def materialised_pool(depth_prob, context, index, inside, grid_size):
    """The released data flow (for comparison): whole lifted tensor, boolean filtering, sum per voxel."""
    b, n, d, fh, fw = depth_prob.shape
    c = context.shape[2]
    lifted = depth_prob.unsqueeze(2) * context.unsqueeze(3)  # [B, N, C, D, fH, fW]
    lifted = lifted.permute(0, 1, 3, 4, 5, 2).reshape(-1, c)  # [B*N*D*fH*fW, C]
    kept = inside.reshape(-1)
    volume = lifted.new_zeros(b * grid_size[0] * grid_size[1] * grid_size[2], c)
    volume.index_add_(0, index.reshape(-1)[kept], lifted[kept])
    return volume.view(b, *grid_size, c).permute(0, 4, 1, 2, 3).contiguous()


def discard_row_pool(depth_prob, context, index, inside, grid_size, chunk_elements=1 << 23):
    """An earlier spotocc variant (for comparison): chunked, dropped points summed into an extra row that is
    sliced off, and a [B, C, X, Y, Z]-contiguous copy at the end."""
    b, n, d, fh, fw = depth_prob.shape
    c = context.shape[2]
    num_voxels = b * grid_size[0] * grid_size[1] * grid_size[2]
    index = torch.where(inside, index, torch.full_like(index, num_voxels))
    context = context.permute(0, 1, 3, 4, 2).unsqueeze(2)  # [B, N, 1, fH, fW, C]
    volume = depth_prob.new_zeros(num_voxels + 1, c)
    step = max(1, chunk_elements // (b * n * fh * fw * c))
    for d0 in range(0, d, step):
        lifted = depth_prob[:, :, d0 : d0 + step, :, :, None] * context
        volume.index_add_(0, index[:, :, d0 : d0 + step].reshape(-1), lifted.reshape(-1, c))
    return volume[:-1].view(b, *grid_size, c).permute(0, 4, 1, 2, 3).contiguous()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="spotocc_nusc_256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the stages whose name contains this text")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = get_config(args.preset)
    h, w = cfg.data.input_size
    b, n = args.batch, len(cfg.data.cameras)
    threads = torch.get_num_threads()
    print(f"preset {args.preset}: batch {b} x {n} cameras at {h}x{w}, device {device}, threads {threads}")

    backbone = ImageBackbone.from_config(cfg.model.image_backbone, load_weights=False).to(device).train()
    neck = SECONDFPN.from_config(cfg.model.image_neck).to(device).train()
    vt = ViewTransformer.from_config(cfg.model.view_transformer, cfg.grid, (h, w)).to(device).train()
    img = torch.randn(b * n, 3, h, w, device=device)
    with torch.no_grad():
        feats = backbone(img)
        fused = neck(feats)  # [B*N, C, fH, fW]
    fh, fw = fused.shape[-2:]

    # cameras looking outwards around the car, with a flip/rotation augmentation
    yaw = torch.arange(n, dtype=torch.float32) * (2 * torch.pi / n)
    cam_to_lidar = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    rz = torch.zeros(n, 3, 3)
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1], rz[:, 2, 2] = (
        yaw.cos(),
        -yaw.sin(),
        yaw.sin(),
        yaw.cos(),
        1,
    )
    rots = (rz @ cam_to_lidar).expand(b, n, 3, 3).to(device)
    trans = torch.tensor([0.5, 0.0, 1.6]).expand(b, n, 3).to(device)
    intrins = torch.zeros(b, n, 4, 4, device=device)
    intrins[..., 0, 0] = intrins[..., 1, 1] = 1260.0
    intrins[..., 0, 2], intrins[..., 1, 2], intrins[..., 2, 2], intrins[..., 3, 3] = 800.0, 450.0, 1.0, 1.0
    post_rot, post_tran = image_aug_transform(
        resize=w / 1600, crop=(0.0, 900 * w / 1600 - h), flip=True, rotate=3.0, input_size=(h, w)
    )
    post_rots, post_trans = post_rot.expand(b, n, 3, 3).to(device), post_tran.expand(b, n, 3).to(device)
    bda = torch.eye(4, device=device).expand(b, 4, 4)
    cams = (rots, trans, intrins, post_rots, post_trans, bda)
    camera = camera_parameter_vector(*cams, layout=vt.camera_params).flatten(0, 1)
    num_points = b * n * vt.num_bins * fh * fw
    print(
        f"features {fh}x{fw}, lifted points {num_points:,} x {vt.context_channels} channels "
        f"= {num_points * vt.context_channels * 4 / 2**20:.0f} MiB in fp32; grid {vt.grid_size}"
    )

    def backbone_inputs():
        return (img,)

    def neck_inputs():
        return ([f.detach().requires_grad_() for f in feats],)

    def depth_inputs():
        return (fused.detach().requires_grad_(), camera)

    _, inside = voxel_indices(vt.geometry(*cams), vt.bx - vt.dx / 2, vt.dx, vt.grid_size)
    print(f"points inside the grid: {inside.float().mean():.1%}")
    depth_prob = torch.randn(b, n, vt.num_bins, fh, fw, device=device).softmax(dim=2)
    context = torch.randn(b, n, vt.context_channels, fh, fw, device=device)

    class LiftPool(torch.nn.Module):
        def __init__(self, chunk: int | None, variant: str = "spotocc") -> None:
            super().__init__()
            self.chunk, self.variant = chunk, variant

        def forward(self, depth, ctx):
            geom = vt.geometry(*cams)
            idx, inside = voxel_indices(geom, vt.bx - vt.dx / 2, vt.dx, vt.grid_size)
            if self.variant == "materialised":
                return materialised_pool(depth, ctx, idx, inside, vt.grid_size)
            if self.variant == "discard-row":
                return discard_row_pool(depth, ctx, idx, inside, vt.grid_size)
            return lift_and_pool(depth, ctx, idx, inside, vt.grid_size, chunk_elements=self.chunk)

    def pool_inputs():
        return (depth_prob.detach().requires_grad_(), context.detach().requires_grad_())

    stages = [
        ("backbone", backbone, backbone_inputs),
        ("neck", neck, neck_inputs),
        ("depth net", vt.depth_net, depth_inputs),
        (
            f"lift+pool (chunk 2^{vt.pool_chunk_elements.bit_length() - 1}, default)",
            LiftPool(vt.pool_chunk_elements),
            pool_inputs,
        ),
    ]
    pool_variants = [
        ("lift+pool (chunk 2^21)", LiftPool(1 << 21), pool_inputs),
        ("lift+pool (chunk 2^25)", LiftPool(1 << 25), pool_inputs),
        ("lift+pool (one chunk: all bins)", LiftPool(1 << 40), pool_inputs),
        ("lift+pool (earlier: discard row + copy)", LiftPool(None, "discard-row"), pool_inputs),
        ("lift+pool (materialised + filter)", LiftPool(None, "materialised"), pool_inputs),
    ]
    header = f"{'stage':44s} {'train s':>8s} {'train MiB':>10s} {'infer s':>8s} {'infer MiB':>10s}"
    print(header)
    print("-" * len(header))
    for name, module, inputs in stages + pool_variants:
        if args.only not in name:
            continue
        train, infer = _train_step(module, inputs), _infer(module, inputs)
        train(), infer()  # warm-up
        mem_train = peak_extra_mib(train, device)
        mem_infer = peak_extra_mib(infer, device)
        t_train = time_s(train, device, args.reps)
        t_infer = time_s(infer, device, args.reps)
        print(f"{name:44s} {t_train:8.3f} {mem_train:10.0f} {t_infer:8.3f} {mem_infer:10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
