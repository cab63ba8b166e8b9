"""``spotocc <command>``: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``main(args) -> int``; it is imported only
when its command runs, so ``spotocc --help`` stays fast and a command's heavy imports cost nothing
to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("spotocc.engine.quickstart", "synthesise scenes, train synthetic_tiny, evaluate, draw"),
    "train": ("spotocc.engine.train_cli", "train a preset or config (single process or torchrun)"),
    "eval": ("spotocc.engine.eval_cli", "SSC metrics of a checkpoint or of saved predictions"),
    "predict": ("spotocc.engine.predict_cli", "write one .npz of labels per sample"),
    "benchmark": ("spotocc.engine.benchmark", "time and memory per stage, or compare two presets"),
    "info": ("spotocc.tools.info", "a preset's resolved config and parameter counts per module"),
    "synth": ("spotocc.tools.synth", "generate synthetic scenes in a real dataset layout"),
    "prepare": ("spotocc.tools.prepare", "write dataset info files (nuScenes-Occupancy)"),
    "check-data": ("spotocc.tools.check_data", "report missing, truncated or unreadable dataset files"),
    "visualize": ("spotocc.tools.visualize", "render predictions / ground truth / cameras to PNG or GIF"),
    "convert-checkpoint": ("spotocc.tools.convert_checkpoint", "convert a released .pth to safetensors"),
    "diagnose": (
        "spotocc.tools.diagnose",
        "lift coverage, oracle memorisation ablations, per-class depth accuracy",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotocc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / version / the unknown-command error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"spotocc {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    try:
        args = command_parser.parse_intermixed_args(rest)  # key=value overrides may follow options
    except TypeError:  # argparse cannot intermix a command that has sub-commands
        args = command_parser.parse_args(rest)
    return int(module.main(args) or 0)


def _version() -> str:
    from spotocc import __version__

    return f"spotocc {__version__}"


if __name__ == "__main__":
    sys.exit(main())
