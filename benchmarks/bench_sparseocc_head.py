"""The SparseOcc baseline head beside the SPOT-Occ head, at the real grid sizes.

Three measurements, each after warm-up, median of interleaved repeats in one process:

1. Mask assembly, spotocc vs a transcription of the released one. spotocc replaces the unselected
   feature columns by the empty token once per forward and then computes every stage's masks with
   one dense product over all voxels; the release gathers the selected voxels' features once, and per
   stage computes their logits, fills a [B, Q, N0] volume with the empty-token logit and scatters.
   The script first checks both give the same masks and gradients, then times the 10 stages of one
   forward (forward only, and forward + backward).
2. The whole head in eval mode (``predict_logits``), SPOT vs baseline, with the baseline's time
   split into its cost drivers: occ_pred_conv + selection, the 10 mask heads, the 9 attention-mask
   poolings, and the rest (decoder layers).
3. The coarse voxel losses (GT downsampling + four losses, forward + backward).

Peak memory: on CUDA the allocator's peak per call; on CPU the rise of the peak resident set size
(VmHWM after a reset) over the resident size before the call, a rough number.

    python benchmarks/bench_sparseocc_head.py                     # nuScenes sizes, CPU
    python benchmarks/bench_sparseocc_head.py --dataset kitti --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spotocc.config import get_config  # noqa: E402
from spotocc.models.heads.coarse_losses import coarse_voxel_losses  # noqa: E402
from spotocc.models.heads.sparseocc import SparseOccHead, masked_attention_mask  # noqa: E402
from spotocc.models.heads.spot import SpotOccHead  # noqa: E402

SIZES = {  # finest mask features first, then memories fine to coarse; GT grid
    "nusc": ([(128, 128, 10), (64, 64, 5), (32, 32, 3), (16, 16, 2)], (512, 512, 40), "sparseocc_nusc_256"),
    "kitti": ([(128, 128, 16), (64, 64, 8), (32, 32, 4), (16, 16, 2)], (256, 256, 32), "sparseocc_kitti"),
}


class NoCriterion(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise RuntimeError("not used")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory of one call above what was in use before it (MiB)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def timed(cases: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per case; cases run interleaved so drifting load hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------------
# 1. mask assembly


def released_mask_stages(embeds, mask_feats, selected_index, empty_token):
    """Released assembly, per stage: gathered features -> logits, empty-token fill, scatter."""
    batch, channels = mask_feats.shape[:2]
    num_voxels = mask_feats[0, 0].numel()
    gathered = mask_feats.flatten(2).gather(2, selected_index[:, None].expand(-1, channels, -1))  # [B, C, K]
    outs = []
    for embed in embeds:  # [B, Q, C]
        nonempty = torch.bmm(embed, gathered)  # [B, Q, K]
        empty = (embed @ empty_token.view(-1, 1)).expand(-1, -1, num_voxels)  # [B, Q, N0]
        full = empty.clone().scatter_(2, selected_index[:, None].expand(-1, embed.shape[1], -1), nonempty)
        outs.append(full)
    return outs


def spotocc_mask_stages(embeds, mask_feats, selected, empty_token):
    channels = mask_feats.shape[1]
    source = torch.where(selected[:, None], mask_feats.flatten(2), empty_token.view(1, channels, 1))
    return [torch.bmm(embed, source) for embed in embeds]


def bench_mask_assembly(feat_size, args, device) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    num_voxels = math.prod(feat_size)
    k = int(num_voxels * 0.6)
    mask_feats = torch.randn(1, args.channels, *feat_size, generator=gen).to(device)
    embeds = [torch.randn(1, args.queries, args.channels, generator=gen).to(device) for _ in range(10)]
    token = torch.randn(args.channels, generator=gen).to(device)
    selected_index = torch.randperm(num_voxels, generator=gen)[:k].to(device)[None]
    selected = torch.zeros(1, num_voxels, dtype=torch.bool, device=device)
    selected[0, selected_index[0]] = True

    def run(impl, backward):
        feats = mask_feats.detach().requires_grad_(backward)
        emb = [e.detach().requires_grad_(backward) for e in embeds]
        tok = token.detach().requires_grad_(backward)
        if impl == "spotocc":
            outs = spotocc_mask_stages(emb, feats, selected, tok)
        else:
            outs = released_mask_stages(emb, feats, selected_index, tok)
        if backward:
            sum(o.sigmoid().mean() for o in outs).backward()
            return outs, [feats.grad, tok.grad, *[e.grad for e in emb]]
        return outs, []

    with torch.no_grad():
        a, _ = run("spotocc", False)
        b, _ = run("released", False)
    out_err = max((x - y).abs().max().item() for x, y in zip(a, b))
    _, ga = run("spotocc", True)
    _, gb = run("released", True)
    grad_err = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(ga, gb))
    print(f"mask assembly, {args.queries} queries x {num_voxels} voxels ({k} selected), 10 stages")
    print(f"  spotocc vs released: max |mask diff| {out_err:.2e}, max relative gradient diff {grad_err:.2e}")
    for backward in (False, True):

        def case(impl, backward=backward):
            if backward:
                return lambda: run(impl, True)
            return lambda: torch.no_grad()(run)(impl, False)

        t = timed(
            {"spotocc": case("spotocc"), "released": case("released")}, device, args.warmup, args.repeats
        )
        mem = {impl: peak_mib(case(impl), device) for impl in ("spotocc", "released")}
        label = "forward + backward" if backward else "forward"
        print(
            f"  {label:19s} spotocc {t['spotocc'] * 1e3:8.1f} ms ({mem['spotocc']:7.0f} MiB peak)   "
            f"released {t['released'] * 1e3:8.1f} ms ({mem['released']:7.0f} MiB peak)   "
            f"released / spotocc {t['released'] / t['spotocc']:.2f}"
        )


# --------------------------------------------------------------------------------------------------
# 2. whole heads, eval


def bench_heads(sizes, preset, args, device) -> None:
    cfg = get_config(preset).model.head
    torch.manual_seed(0)
    baseline = SparseOccHead.from_config(cfg, criterion=NoCriterion()).to(device).eval()
    spot_cfg = get_config(preset.replace("sparseocc", "spotocc")).model.head
    spot = SpotOccHead.from_config(spot_cfg, criterion=NoCriterion()).to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    feats = [torch.randn(1, cfg.embed_dims, *s, generator=gen).to(device) for s in sizes]

    # the baseline's cost drivers, each timed on its own with the inputs it sees in the head
    with torch.no_grad():
        coarse = baseline.coarse_occupancy(feats[0])
        selected = baseline.select_voxels(coarse)
        token = baseline.empty_token.weight.view(1, -1, 1)
        source = torch.where(selected[:, None], feats[0].flatten(2), token)
        queries = baseline.query_content.weight[None]
        _, masks = baseline._predict(queries, source, sizes[0])

    def coarse_and_selection():
        baseline.select_voxels(baseline.coarse_occupancy(feats[0]))

    cases = {
        "spot head": lambda: spot.predict_logits(feats),
        "baseline head": lambda: baseline.predict_logits(feats),
        "occ_pred_conv + top-k": coarse_and_selection,
        "one mask head": lambda: baseline._predict(queries, source, sizes[0]),
        "one mask pooling": lambda: masked_attention_mask(masks, sizes[3], baseline.num_heads),
    }
    with torch.no_grad():
        t = timed(cases, device, args.warmup, args.repeats)
        mem = {name: peak_mib(cases[name], device) for name in ("spot head", "baseline head")}
    num_layers = len(baseline.layers)
    parts = {
        "occ_pred_conv + top-k": t["occ_pred_conv + top-k"],
        f"{num_layers + 1} mask heads": (num_layers + 1) * t["one mask head"],
        f"{num_layers} mask poolings": num_layers * t["one mask pooling"],
    }
    rest = t["baseline head"] - sum(parts.values())
    print(f"whole head, eval, B=1, {preset} sizes {sizes}")
    print(f"  SPOT head      {t['spot head'] * 1e3:8.1f} ms ({mem['spot head']:7.0f} MiB peak)")
    print(f"  baseline head  {t['baseline head'] * 1e3:8.1f} ms ({mem['baseline head']:7.0f} MiB peak)")
    print(f"  baseline / SPOT {t['baseline head'] / t['spot head']:.2f}")
    for name, value in parts.items():
        print(f"    {name:24s} {value * 1e3:8.1f} ms  {100 * value / t['baseline head']:5.1f}%")
    print(f"    {'decoder layers + rest':24s} {rest * 1e3:8.1f} ms  {100 * rest / t['baseline head']:5.1f}%")


# --------------------------------------------------------------------------------------------------
# 3. coarse losses


def bench_coarse_losses(sizes, gt_size, preset, args, device) -> None:
    cfg = get_config(preset).model.head
    gen = torch.Generator(device="cpu").manual_seed(2)
    gt = torch.randint(0, cfg.num_classes, gt_size, generator=gen)
    gt[torch.rand(gt_size, generator=gen) < 0.9] = 0  # mostly empty, like the real grids
    gt[torch.rand(gt_size, generator=gen) < 0.05] = 255
    gt = gt[None].to(torch.uint8).to(device)
    logits = torch.randn(1, cfg.num_classes, *sizes[0], generator=gen).to(device)

    def run():
        x = logits.detach().requires_grad_()
        sum(coarse_voxel_losses(x, gt).values()).backward()

    t = timed({"coarse losses": run}, device, args.warmup, args.repeats)
    print(
        f"coarse losses (downsampling {gt_size} -> {sizes[0]} + 4 losses, fwd + bwd): "
        f"{t['coarse losses'] * 1e3:.1f} ms ({peak_mib(run, device):.0f} MiB peak)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(SIZES), default="nusc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["masks", "heads", "losses"], nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes, gt_size, preset = SIZES[args.dataset]
    only = set(args.only or ["masks", "heads", "losses"])
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    if "masks" in only:
        bench_mask_assembly(sizes[0], args, device)
    if "heads" in only:
        bench_heads(sizes, preset, args, device)
    if "losses" in only:
        bench_coarse_losses(sizes, gt_size, preset, args, device)


if __name__ == "__main__":
    main()
