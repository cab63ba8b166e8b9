"""SpotCrossAttention vs a straightforward transcription of the released SPOT-CA algorithm.

The transcription gathers a [B, H, Q, k, D] tensor of top-k values per (query, head) and sums it, as
the released module does; spotocc scatters the top-k softmax weights into the similarity buffer and
applies them with one dense matmul. Both use the same weights; the script first checks that outputs
and gradients agree, then times both side by side in one process after warm-up (median of repeats,
interleaved), and measures each case's peak memory in a fresh subprocess as the rise of the peak
resident set size (VmHWM after resetting it) over the resident size just before the measured call.

    python benchmarks/bench_spot_attention.py                 # Q=100, C=192, 6 heads, rho 0.08
    python benchmarks/bench_spot_attention.py --keys 20480 --threads 2 --repeats 5

The arithmetic reference printed last is the time of the key projection alone
(LayerNorm + Linear over K x C, i.e. K * C * C multiply-adds), the floor any implementation pays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spotocc.models.heads.spot_attention import SpotCrossAttention  # noqa: E402

# --------------------------------------------------------------------------------------------------
# the released algorithm, transcribed step by step (batch-first tensors)


def released_spot_attention(
    module: SpotCrossAttention, query, key, query_pos=None, key_pos=None, attn_mask=None
):
    """The released SPOT-CA forward with ``module``'s weights: gathers [B, H, Q, k, D] values."""
    residual = query
    query = query if query_pos is None else query + query_pos
    key = key if key_pos is None else key + key_pos
    values = key
    query_proj = module.query_proj(query)
    key_proj = module.key_proj(key)
    batch, num_queries, channels = query_proj.shape
    num_keys = key_proj.shape[1]
    heads, head_dim = module.num_heads, module.head_dim
    q = F.normalize(query_proj.view(batch, num_queries, heads, head_dim), dim=-1)
    k = F.normalize(key_proj.view(batch, num_keys, heads, head_dim), dim=-1)
    v = values.view(batch, num_keys, heads, head_dim)
    sim = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Q, K]
    if attn_mask is not None:
        sim.masked_fill_(attn_mask.unsqueeze(1).expand(-1, heads, -1, -1), float("-inf"))
    top_k = max(module.min_k, min(int(math.ceil(module.pruning_ratio * num_keys)), num_keys))
    top_sim, top_index = torch.topk(sim, k=top_k, dim=3)
    weights = F.softmax(top_sim * head_dim**-0.5, dim=3)  # [B, H, Q, k]
    v_bhkd = v.permute(0, 2, 1, 3)  # [B, H, K, D]
    v_expanded = v_bhkd.unsqueeze(2).expand(-1, -1, num_queries, -1, -1)  # [B, H, Q, K, D] (view)
    index = top_index.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim)
    gathered = torch.gather(v_expanded, 3, index)  # [B, H, Q, k, D]
    selected = (weights.unsqueeze(-1) * gathered).sum(dim=3)  # [B, H, Q, D]
    merged = selected.permute(0, 2, 1, 3).reshape(batch, num_queries, channels)
    interaction = module.proj(merged * query_proj)
    out = module.final(F.normalize(interaction, dim=1) * module.alpha + merged)
    return residual + out


# --------------------------------------------------------------------------------------------------


def make_case(num_keys: int, num_queries: int, channels: int, heads: int, ratio: float, seed: int = 0):
    torch.manual_seed(seed)
    module = SpotCrossAttention(channels, heads, ratio, 10)
    for param in module.parameters():  # the head's init: xavier-normal on >= 2-dim tensors
        if param.dim() > 1:
            torch.nn.init.xavier_normal_(param)
    query = torch.randn(1, num_queries, channels)
    key = torch.randn(1, num_keys, channels)
    query_pos = torch.randn(1, num_queries, channels)
    key_pos = torch.randn(1, num_keys, channels)
    return module, query, key, query_pos, key_pos


def run_once(impl: str, module, query, key, query_pos, key_pos, backward: bool) -> None:
    if impl == "key_proj":  # the arithmetic floor: LayerNorm + Linear over the K keys
        with torch.no_grad():
            module.key_proj(key + key_pos)
        return
    fn = module if impl == "spotocc" else (lambda *a: released_spot_attention(module, *a))
    if backward:
        q, k = query.detach().requires_grad_(), key.detach().requires_grad_()
        fn(q, k, query_pos, key_pos).square().sum().backward()
        module.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            fn(query, key, query_pos, key_pos)


def check_equal(num_keys: int, args) -> tuple[float, float]:
    module, query, key, query_pos, key_pos = make_case(
        num_keys, args.queries, args.channels, args.heads, args.ratio
    )
    outs, grads = [], []
    for impl in ("spotocc", "released"):
        q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
        fn = module if impl == "spotocc" else (lambda *a: released_spot_attention(module, *a))
        out = fn(q, k, query_pos, key_pos)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(
            torch.cat([q.grad.flatten(), k.grad.flatten()] + [p.grad.flatten() for p in module.parameters()])
        )
        module.zero_grad(set_to_none=True)
    out_err = (outs[0] - outs[1]).abs().max().item()
    grad_err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    return out_err, grad_err


def time_case(num_keys: int, args, backward: bool) -> dict[str, float]:
    case = make_case(num_keys, args.queries, args.channels, args.heads, args.ratio)
    impls = ["spotocc", "released"] + ([] if backward else ["key_proj"])
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.warmup):
        for impl in times:
            run_once(impl, *case, backward=backward)
    for _ in range(args.repeats):
        for impl in times:  # interleaved so drifting machine load hits both alike
            start = time.perf_counter()
            run_once(impl, *case, backward=backward)
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def op_shares(num_keys: int, args, top: int = 5) -> str:
    """Share of the spotocc forward's CPU time per aten op (torch profiler, one run after warm-up)."""
    case = make_case(num_keys, args.queries, args.channels, args.heads, args.ratio)
    run_once("spotocc", *case, backward=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_once("spotocc", *case, backward=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return ", ".join(
        f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top]
    )


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_child(impl: str, num_keys: int, backward: bool, args) -> None:
    """In a fresh process: warm up once, reset the peak RSS, run once, print the peak rise (MiB)."""
    torch.set_num_threads(args.threads)
    case = make_case(num_keys, args.queries, args.channels, args.heads, args.ratio)
    run_once(impl, *case, backward=backward)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _read_status_kib("VmRSS")
    run_once(impl, *case, backward=backward)
    peak = _read_status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_memory(impl: str, num_keys: int, backward: bool, args) -> float:
    env = dict(os.environ)
    # Fixed mmap threshold: large buffers come from mmap and go back to the OS when freed, so the
    # resident size before the measured call does not hide reusable heap from the warm-up.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", impl, "--keys", str(num_keys), "--threads", str(args.threads)]
    cmd += ["--queries", str(args.queries), "--channels", str(args.channels), "--heads", str(args.heads)]
    cmd += ["--ratio", str(args.ratio)] + (["--backward"] if backward else [])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[512, 3072, 20480])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.08)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--child", choices=["spotocc", "released"], help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_peak_child(args.child, args.keys[0], args.backward, args)
        return

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), Q={args.queries}, C={args.channels}, "
        f"H={args.heads}, rho={args.ratio}, B=1, fp32, median of {args.repeats} after {args.warmup} warm-up"
    )
    header = f"{'K':>6} {'k':>5} {'mode':>8} | {'spotocc ms':>10} {'released ms':>11} {'speedup':>7}"
    if not args.no_memory:
        header += f" | {'spotocc MiB':>11} {'released MiB':>12} {'mem ratio':>9}"
    for num_keys in args.keys:
        out_err, grad_err = check_equal(num_keys, args)
        top_k = SpotCrossAttention(args.channels, args.heads, args.ratio, 10).num_selected(num_keys)
        print(f"K={num_keys}: max |out diff| = {out_err:.2e}, max relative grad diff = {grad_err:.2e}")
        assert out_err < 1e-4 and grad_err < 1e-4, "implementations disagree"
        print(header)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            t = time_case(num_keys, args, backward)
            if not backward:
                fwd_time = t["spotocc"]
            line = (
                f"{num_keys:>6} {top_k:>5} {mode:>8} | {t['spotocc'] * 1e3:>10.1f} "
                f"{t['released'] * 1e3:>11.1f} {t['released'] / t['spotocc']:>6.2f}x"
            )
            if not args.no_memory:
                mem = {impl: peak_memory(impl, num_keys, backward, args) for impl in ("spotocc", "released")}
                line += (
                    f" | {mem['spotocc']:>11.1f} {mem['released']:>12.1f} "
                    f"{mem['spotocc'] / max(mem['released'], 1e-9):>9.2f}"
                )
            print(line)
            if not backward:
                proj = t["key_proj"]
        macs = num_keys * args.channels * args.channels
        dense = macs + 2 * args.queries * num_keys * args.channels  # + similarities + weighted sum
        rate = 2 * macs / proj / 1e9
        print(
            f"key projection alone (timed alongside): {proj * 1e3:.1f} ms, {macs / 1e6:.0f} M multiply-adds"
        )
        print(f"  ({rate:.1f} GFLOP/s); spotocc forward = {fwd_time / proj:.1f}x that")
        dense_ms = dense / macs * proj * 1e3
        print(
            f"all dense work of the layer: {dense / 1e6:.0f} M multiply-adds = {dense_ms:.1f} ms at that rate"
        )
        print(f"spotocc forward time by op: {op_shares(num_keys, args)}\n")


if __name__ == "__main__":
    main()
