"""``spotocc info PRESET``: a preset's resolved config and its parameter count per top-level module.

Counts are exact and, beside them, rounded the way the released logs' parameter tables round them
(``8.2M``, ``19.2K``, ``0.1G``). The released models stored the view transformer's geometry (``dx``,
``bx``, ``nx``, ``frustum``) as parameters, spotocc as buffers: the view transformer and the total are
printed both without and with them (the latter is the released count)::

    spotocc info spotocc_nusc_256
    spotocc info spotocc_kitti head.pruning_ratio=0.1 --full-config

The model is built on the ``meta`` device: no memory, no weights, about a second.
"""

from __future__ import annotations

import argparse

from spotocc.config import get_config
from spotocc.models.summary import build_meta_model, config_summary, count_table, parameter_counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", metavar="PRESET", help="preset name or config .json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--full-config", action="store_true", help="print the whole resolved config as JSON")


def main(args: argparse.Namespace) -> int:
    cfg = get_config(args.preset, args.overrides)
    if args.full_config:
        print(cfg.to_json())
    print(config_summary(cfg))
    print()
    print(count_table(parameter_counts(build_meta_model(cfg))))
    return 0
