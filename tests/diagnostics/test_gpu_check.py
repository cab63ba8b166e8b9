"""benchmarks/gpu_check.sh: it parses, and run against a stand-in python it calls what it should.

The stand-in records every command line it is given and succeeds (or fails, for the doctor, when
asked), so the script's real branch runs here without a GPU, a network or a new environment. The
commands it would give spotocc are then parsed by spotocc's own argument parsers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from spotocc import cli
from spotocc.config import get_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = [
    "venv",
    "install",
    "spconv-uninstall-cpu",
    "spconv-cuda",
    "doctor",
    "pytest-cuda",
    "benchmark-infer-none",
    "benchmark-infer-bf16",
    "benchmark-train-none",
    "benchmark-train-bf16",
]
STAND_IN = """#!/usr/bin/env bash
echo "$*" >>"$STAND_IN_LOG"
case "$*" in
    *"doctor --spconv-wheel"*) echo spconv-cu126 ;;
    *"doctor --device cuda"*) exit "${STAND_IN_DOCTOR_STATUS:-0}" ;;
esac
exit 0
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses_and_is_executable():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def run_script(tmp_path: Path, **env_extra: str) -> tuple[int, str, list[str]]:
    """Run the script with a stand-in python; (exit status, summary, the stand-in's command lines)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    stand_in = venv / "bin" / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(stand_in), "VENV": str(venv), "STAND_IN_LOG": str(log), **env_extra}
    env.pop("OUT", None)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done.returncode, (out / "summary.txt").read_text(), calls


def statuses(summary: str) -> dict[str, str]:
    lines = [line.split() for line in summary.splitlines()]
    return {words[0]: words[1] for words in lines if words and words[0] in STEPS}


def parse_spotocc(call: str) -> tuple[str, argparse.Namespace]:
    """A stand-in command line ``-m spotocc.cli COMMAND ARGS`` parsed by that command's own parser."""
    words = shlex.split(call)
    assert words[:2] == ["-m", "spotocc.cli"], call
    name = words[2]
    assert name in cli.COMMANDS, name
    parser = cli._Parser(prog=f"spotocc {name}")
    importlib.import_module(cli.COMMANDS[name][0]).add_arguments(parser)
    return name, parser.parse_args(words[3:])


def test_every_step_runs_and_passes(tmp_path):
    code, summary, calls = run_script(tmp_path)
    assert code == 0, summary
    assert statuses(summary) == dict.fromkeys(STEPS, "PASS") and "OK: every step passed" in summary
    assert f"-m venv --system-site-packages {tmp_path / 'venv'}" in calls
    assert "-m pip install --disable-pip-version-check -e .[dev]" in calls
    assert calls.index("-m pip uninstall -y spconv") < calls.index(
        "-m pip install --disable-pip-version-check spconv-cu126"
    )  # the CPU build of the dev extra goes first
    assert any(c.startswith("-m pytest -m cuda tests ") for c in calls)
    spotocc_calls = [parse_spotocc(c) for c in calls if c.startswith("-m spotocc.cli ")]
    assert [name for name, _ in spotocc_calls] == ["doctor", "doctor"] + ["benchmark"] * 4
    assert spotocc_calls[0][1].spconv_wheel and spotocc_calls[1][1].device == "cuda"
    assert spotocc_calls[1][1].json.endswith("gpu_check/doctor.json")
    benchmarks = [args for name, args in spotocc_calls if name == "benchmark"]
    assert [(a.mode, a.amp) for a in benchmarks] == [
        ("infer", "none"),
        ("infer", "bf16"),
        ("train", "none"),
        ("train", "bf16"),
    ]
    for args in benchmarks:
        assert args.compare == ["spotocc_nusc_256", "sparseocc_nusc_256"] and args.device == "cuda"
    for preset in benchmarks[0].compare:
        assert get_config(preset).name == preset
    assert (tmp_path / "out" / "gpu_check.tar.gz").stat().st_size > 0
    # the marker that pytest -m cuda selects is registered
    assert '"cuda: needs a CUDA GPU' in (ROOT / "pyproject.toml").read_text()


def test_a_failed_step_fails_the_script_and_the_rest_still_runs(tmp_path):
    code, summary, calls = run_script(tmp_path, STAND_IN_DOCTOR_STATUS="1")
    assert code == 1
    assert statuses(summary)["doctor"] == "FAIL" and statuses(summary)["benchmark-train-bf16"] == "PASS"
    assert "FAILED: see the steps above" in summary
    assert sum(c.startswith("-m spotocc.cli benchmark ") for c in calls) == 4


def test_the_deadline_skips_what_is_left(tmp_path):
    code, summary, calls = run_script(tmp_path, GPU_CHECK_BUDGET_S="0")
    assert code == 1
    assert set(statuses(summary).values()) == {"SKIP"} and len(statuses(summary)) == len(STEPS)
    # only which wheel would fit, and what is installed, for the logs
    assert calls == ["-m spotocc.cli doctor --spconv-wheel", "-m pip list --disable-pip-version-check"]


def test_usage_error(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "a", "b"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: benchmarks/gpu_check.sh")
