"""Every benchmark script answers --help with the common options (the runs themselves are not
part of the suite: docs/benchmarks.md records them)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = ["overhead", "communication", "memory", "emulator_build", "scaling", "model_load"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(option in out.stdout for option in ("--repeats", "--out", "--work")), out.stdout
    assert "Goal" in out.stdout or name == "scaling", "each script states its goal"
