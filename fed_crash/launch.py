"""Run a Flower app with ``flwr run`` as a user does, from Python: scripts, tests, experiments.

``flwr run`` starts a local SuperLink in the background when none answers; that process keeps
the environment of the first run and outlives it. :func:`flwr_run` therefore gives each run a
known ``FLWR_HOME`` (and ports), turns off runtime dependency installation, waits for the run,
reads its final status (``flwr run --stream`` exits 0 even when the run failed), and stops the
SuperLink it started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

APP = Path(__file__).resolve().parents[1] / "simulations" / "alpaca"


def toml_value(value: Any) -> str:
    """A run-config value as TOML (strings quoted; JSON escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_arg(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def flower_env(flwr_home: Path, *, port_base: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``flwr run``: our own FLWR_HOME, no per-run ``uv sync``, this
    interpreter's scripts first on PATH (the SuperLink starts its helpers by name)."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    if port_base:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port_base)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(port_base + 2)
    env.update(extra or {})
    return env


@dataclass
class FlowerRun:
    returncode: int
    run_id: str | None
    status: str  # e.g. "finished:completed", "finished:failed"
    details: str
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "finished:completed"


def flwr_run(
    run_config: Mapping[str, Any],
    *,
    app: Path = APP,
    num_supernodes: int = 2,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    flwr_home: Path,
    port_base: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600,
    echo: bool = False,
) -> FlowerRun:
    """``flwr run <app> --stream`` with overrides; returns the run's final status and output."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    full_env = flower_env(flwr_home, port_base=port_base, extra=env)
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} client-resources-num-gpus={gpus_per_client}"
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config", federation]
    if run_config:
        cmd += ["--run-config", run_config_arg(run_config)]
    flwr = Path(sys.executable).parent / "flwr"
    cmd[0] = str(flwr) if flwr.exists() else "flwr"
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.monotonic() + timeout
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                lines.append(f"\n[fed-crash] flwr run killed after {timeout}s\n")
                break
        returncode = proc.wait()
        output = "".join(lines)
        match = re.search(r"Successfully started run (\d+)", output)
        run_id = match.group(1) if match else None
        status, details = run_status(run_id, full_env) if run_id else ("not-started", "")
        return FlowerRun(returncode, run_id, status, details, output)
    finally:
        stop_local_superlink(flwr_home)


def run_status(run_id: str, env: Mapping[str, str]) -> tuple[str, str]:
    flwr = Path(sys.executable).parent / "flwr"
    out = subprocess.run([str(flwr) if flwr.exists() else "flwr", "ls", "--run-id", run_id, "--format", "json"],
                         env=dict(env), capture_output=True, text=True, timeout=60).stdout
    try:
        run = json.loads(out)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", out[-500:]


def _pids_with(fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if fragment in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def stop_local_superlink(flwr_home: Path, grace_s: float = 10.0) -> None:
    """Stop the background SuperLink that ``flwr run`` started for this FLWR_HOME (Linux)."""
    marker = f"{flwr_home}/local-superlink/"
    pids = _pids_with(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pids_with(marker):
        time.sleep(0.2)
    for pid in _pids_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
