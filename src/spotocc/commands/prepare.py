"""``spotocc prepare nuscenes|occ3d``: write nuScenes-Occupancy or Occ3D info files with nuscenes-devkit.

    spotocc prepare nuscenes --data-root data/nuscenes --version v1.0-trainval --out-dir data/nuscenes
    spotocc prepare occ3d --data-root data/nuscenes --version v1.0-trainval --out-dir data/nuscenes

writes ``<out-dir>/nuscenes_occ_infos_train.pkl`` and ``..._val.pkl`` (``..._test.pkl`` for
``v1.0-test``), or for Occ3D ``bevdetv2-nuscenes_infos_<split>.pkl`` with an ``occ_path`` per
sample (``./data/nuscenes/gts/<scene>/<token>``: put Occ3D's ``gts`` folder there);
:mod:`spotocc.data.nuscenes_infos` says what they hold. Occ3D's own ``annotations.json`` needs no
preparing: point ``data.train_info`` / ``data.val_info`` at it.
"""

from __future__ import annotations

import argparse

from spotocc.data.nuscenes_infos import VERSIONS, create_nuscenes_infos


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    nusc = sub.add_parser("nuscenes", help="nuScenes-Occupancy info files (needs nuscenes-devkit)")
    nusc.add_argument("--data-root", required=True, help="nuScenes root (holds samples/ and v1.0-*/)")
    nusc.add_argument("--version", default="v1.0-trainval", choices=VERSIONS)
    nusc.add_argument("--out-dir", required=True, help="where to write the info .pkl files")
    nusc.add_argument("--prefix", default="nuscenes_occ", help="file name prefix (default: nuscenes_occ)")
    occ3d = sub.add_parser("occ3d", help="Occ3D-nuScenes info files, BEVDet style (needs nuscenes-devkit)")
    occ3d.add_argument("--data-root", required=True, help="nuScenes root (holds samples/ and v1.0-*/)")
    occ3d.add_argument("--version", default="v1.0-trainval", choices=VERSIONS)
    occ3d.add_argument("--out-dir", required=True, help="where to write the info .pkl files")
    occ3d.add_argument(
        "--prefix", default="bevdetv2-nuscenes", help="file name prefix (default: bevdetv2-nuscenes)"
    )


def main(args: argparse.Namespace) -> int:
    if args.dataset not in ("nuscenes", "occ3d"):
        print(f"error: unknown dataset {args.dataset!r}")
        return 2
    try:
        create_nuscenes_infos(
            args.data_root, args.version, args.out_dir, args.prefix, occ3d_paths=args.dataset == "occ3d"
        )
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 2
    return 0
