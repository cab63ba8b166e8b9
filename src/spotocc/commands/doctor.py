"""``spotocc doctor``: prove that this installation works, on the CPU or the GPU.

    spotocc doctor                          # the GPU if torch sees one, else the CPU
    spotocc doctor --device cuda --json doctor.json
    spotocc doctor --spconv-wheel           # the spconv build to install for this torch

Prints the versions of python, torch (CUDA, cuDNN), the GPU, torchvision, timm, spconv, cumm and numpy;
the combinations known not to work, each with the pip command that fixes it; and self-checks on the
device, each PASS / FAIL / SKIP with its time: the sparse convolutions (both backends), deformable conv
and SpotCrossAttention against float64, and a training step and a prediction of ``synthetic_tiny`` in
float32 and under bf16 autocast (fp16 on GPUs without bf16). Exit status 0 only when every check
passed and no known-bad combination was found; 1 otherwise. See :mod:`spotocc.diagnostics.doctor`.
"""

from __future__ import annotations

import argparse
import json

from spotocc.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines())
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the self-checks run (default: cuda if torch sees a GPU, else cpu)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON (atomically)")
    parser.add_argument(
        "--spconv-wheel",
        action="store_true",
        help="print the spconv distribution that matches the installed torch (e.g. spconv-cu126) and exit",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from spotocc.diagnostics.environment import recommended_spconv_wheel, torch_cuda_version

    if args.spconv_wheel:
        wheel = recommended_spconv_wheel(torch_cuda_version())
        if wheel is None:
            raise UsageError(
                f"no spconv wheel is built for torch's CUDA {torch_cuda_version()}; build spconv from source"
            )
        print(wheel)
        return 0
    device = torch.device(_device_name(args.device))

    from spotocc.diagnostics.doctor import run_doctor

    report = run_doctor(device, log=print)
    if args.json:
        from spotocc.engine.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report.ok else 1


def _device_name(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise UsageError(
                f"--device cuda, but torch {torch.__version__} is a CPU-only build: install torch's CUDA "
                "build for your driver, then the matching spconv (spotocc doctor --spconv-wheel)"
            )
        raise UsageError(
            f"--device cuda, but torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no "
            "GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        )
    return requested
