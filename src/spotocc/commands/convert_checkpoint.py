"""``spotocc convert-checkpoint RELEASED.pth OUT.safetensors --preset NAME``: released weights -> spotocc.

Reads a released SPOT-Occ / SparseOcc checkpoint (mmcv-era ``.pth``) without executing pickled code,
maps every tensor one to one onto the preset's model (refusing, with the names listed, anything missing,
left over or of the wrong shape) and writes a safetensors file with the resolved config embedded, so
``spotocc eval OUT.safetensors`` and ``spotocc predict OUT.safetensors`` need nothing else::

    spotocc convert-checkpoint spotocc_nusc.pth spotocc_nusc.safetensors --preset spotocc_nusc_256
    spotocc convert-checkpoint kitti_spot.pth kitti_spot.safetensors --preset spotocc_kitti \
        data.root=data/SemanticKITTI

Exit code 0 on success, 1 when the file is refused or does not fit the preset (the reason is printed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spotocc.config import get_config, list_presets
from spotocc.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("released", metavar="RELEASED.pth", help="released mmcv-era checkpoint")
    parser.add_argument("out", metavar="OUT.safetensors", help="converted weights file to write")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides embedded in OUT (e.g. data.root)"
    )
    parser.add_argument(
        "--preset", required=True, help=f"the preset the weights belong to ({', '.join(list_presets())})"
    )
    add_pickle_arguments(parser)


def add_pickle_arguments(parser: argparse.ArgumentParser) -> None:
    """``--allow-numpy-pickle`` and ``--allow-unsafe-pickle`` (shared with eval / predict)."""
    parser.add_argument(
        "--allow-numpy-pickle",
        action="store_true",
        help="accepted and ignored (no longer needed): numpy scalars/arrays/dtypes in a released .pth "
        "(e.g. in its meta) are allowed by default; anything else needs --allow-unsafe-pickle",
    )
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load a released .pth with full pickle: EXECUTES ANY CODE IN THE FILE; only for trusted files",
    )


def main(args: argparse.Namespace) -> int:
    from spotocc.engine.released_checkpoint import convert_released_checkpoint

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"OUT must end in .safetensors, got {out}")
    cfg = get_config(args.preset, args.overrides)
    # a ReleasedCheckpointError (refused pickle, names that do not map) is reported by spotocc.cli
    report = convert_released_checkpoint(
        args.released, out, cfg, allow_unsafe_pickle=args.allow_unsafe_pickle
    )
    print(report.summary())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) with the {cfg.name} config embedded")
    print(f"evaluate it with: spotocc eval {out} --data <dataset root>")
    return 0
