"""``import spotocc.models`` loads model code only: no benchmarking scaffolding, no command-line code."""

import json
import subprocess
import sys

FORBIDDEN = ("spotocc.benchmarking", "spotocc.commands", "spotocc.cli")


def test_importing_the_models_imports_no_benchmarking_or_command_line_code():
    # a fresh interpreter: this test process has imported everything the other tests use
    code = "import json, sys, spotocc.models; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = json.loads(out.splitlines()[-1])
    assert "spotocc.models" in modules
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == []
