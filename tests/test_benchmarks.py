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


def test_cpu_shares_attributes_busy_intervals_to_processes(tmp_path):
    """The sampler on a real busy process named like a client actor: it finds the busy span
    and gives that process most of a core; hand-made samples give the hand-computed shares."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cpu_shares import shares

    spin = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_shares.py"), "--busy", "0.25", "--out", str(tmp_path / "s.json"),
                          "--", sys.executable, "-c", spin, "ClientAppActor"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    record = __import__("json").loads((tmp_path / "s.json").read_text())
    assert record["busy_seconds"] >= 1.5  # of the 3 s it spun (shared cores may slow it, hence the low thresholds)
    assert max(v for k, v in record["shares"].items() if "ClientAppActor" in k) > 0.3

    samples = [{"t": 0.0, "procs": {"1": (0.0, "ray::ClientAppActor.run"), "2": (0.0, "flower-superlink")}, "threads": {}},
               {"t": 1.0, "procs": {"1": (1.8, "ray::ClientAppActor.run"), "2": (0.1, "flower-superlink")}, "threads": {}},
               {"t": 2.0, "procs": {"1": (1.9, "ray::ClientAppActor.run"), "2": (0.6, "flower-superlink")}, "threads": {}}]
    span, use, _ = shares(samples, busy=0.8)  # only the first second counts: the actor was idle in the second
    assert span == 1.0 and use == pytest.approx({"ray::ClientAppActor.run": 1.8, "flower-superlink": 0.1})
