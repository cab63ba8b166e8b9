"""``spotocc <command>``: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``main(args) -> int``; it is imported only
when its command runs, so ``spotocc --help`` stays fast and a command's heavy imports cost nothing
to the others.

User and data errors (:class:`spotocc.errors.SpotoccError` and bad arguments) print one line,
``spotocc <command>: error: <message>``, and exit with status 2; ``--debug`` (anywhere on the command
line) or ``SPOTOCC_DEBUG=1`` adds their traceback. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from spotocc.errors import SpotoccError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("spotocc.commands.quickstart", "synthesise scenes, train synthetic_tiny, evaluate, draw"),
    "train": ("spotocc.commands.train", "train a preset or config (single process or torchrun)"),
    "eval": ("spotocc.commands.eval", "SSC or Occ3D metrics of a checkpoint or of saved predictions"),
    "predict": ("spotocc.commands.predict", "write one .npz of labels per sample"),
    "benchmark": ("spotocc.commands.benchmark", "time and memory per stage, or compare two presets"),
    "info": ("spotocc.commands.info", "a preset's resolved config and parameter counts per module"),
    "synth": ("spotocc.commands.synth", "generate synthetic scenes in a real dataset layout"),
    "prepare": ("spotocc.commands.prepare", "write dataset info files (nuScenes-Occupancy, Occ3D-nuScenes)"),
    "check-data": ("spotocc.commands.check_data", "report missing, truncated or unreadable dataset files"),
    "visualize": ("spotocc.commands.visualize", "render predictions / ground truth / cameras to PNG or GIF"),
    "convert-checkpoint": ("spotocc.commands.convert_checkpoint", "convert a released .pth to safetensors"),
    "doctor": ("spotocc.commands.doctor", "versions, known-bad combinations and self-checks of this install"),
    "diagnose": (
        "spotocc.commands.diagnose",
        "lift coverage, oracle memorisation ablations, per-class depth accuracy",
    ),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``<prog>: error: <message>``, exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spotocc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


_DEBUG_HELP = "on a user or data error, also show its traceback (or set SPOTOCC_DEBUG=1)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _take_debug_flag(argv) or os.environ.get("SPOTOCC_DEBUG", "") not in ("", "0")
    parser = build_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / version / the unknown-command error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = _Parser(prog=f"spotocc {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    command_parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)  # taken out above
    try:
        try:
            args = command_parser.parse_intermixed_args(rest)  # key=value overrides may follow options
        except TypeError:  # argparse cannot intermix a command that has sub-commands
            args = command_parser.parse_args(rest)
        return int(module.main(args) or 0)
    except SpotoccError as err:
        if debug:
            traceback.print_exc()
            if err.worker_traceback:  # raised in a DataLoader worker: where it happened there
                print(err.worker_traceback, file=sys.stderr)
        print(f"spotocc {name}: error: {err.message}", file=sys.stderr)
        return 2


def _take_debug_flag(argv: list[str]) -> bool:
    """Remove every ``--debug`` before a ``--`` from ``argv``; whether there was one."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:end]
    argv[:end] = [a for a in argv[:end] if a != "--debug"]
    return found


def _version() -> str:
    from spotocc import __version__

    return f"spotocc {__version__}"


if __name__ == "__main__":
    sys.exit(main())
