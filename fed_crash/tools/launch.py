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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

APP = Path(__file__).resolve().parents[2] / "simulations" / "alpaca"


def toml_value(value: Any) -> str:
    """A run-config value as TOML (strings quoted; JSON escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_arg(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def app_run_config(app: Path = APP) -> dict[str, Any]:
    """A Flower app's default run config, flat (``section.key``), from its pyproject.toml."""
    from flwr.common.config import flatten_dict

    return flatten_dict(tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def check_run_config(values: Mapping[str, Any] | str, app: Path = APP) -> dict[str, Any]:
    """Run-config overrides checked before ``flwr run`` sees them: Flower refuses a key its
    app's pyproject does not list with only "Invalid run configuration", so an unknown or
    mistyped key is named here, with the closest keys; for this project's app the values are
    then parsed as the server will (types, choices, bounds). Returns the overrides as a dict."""
    from flwr.common.config import parse_config_args

    from fed_crash.config import parse_run_config, unknown_key

    overrides = parse_config_args([values]) if isinstance(values, str) else dict(values)
    defaults = app_run_config(app)
    for key in overrides:
        if key not in defaults:
            raise unknown_key(key, sorted(defaults))
    if app.resolve() == APP.resolve():
        parse_run_config({**defaults, **overrides})
    return overrides


def flower_env(flwr_home: Path, *, port_base: int | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``flwr run``: our own FLWR_HOME, no per-run ``uv sync``, this
    interpreter's scripts first on PATH (the SuperLink starts its helpers by name), and the
    SuperExec asking for a new run every 0.2 s instead of every 1 s (Flower's default), which a
    run waited for half of on average before its ServerApp process started."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"),
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


def _flwr_run_command(app: Path, run_config: Mapping[str, Any] | str, connection: str | None, federation_config: str) -> list[str]:
    """``flwr run <app> [connection | --federation-config ...] --stream [--run-config ...]``,
    with this environment's ``flwr`` when there is one."""
    flwr = Path(sys.executable).parent / "flwr"
    cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(app)]
    cmd += [connection] if connection else ["--federation-config", federation_config]
    cmd.append("--stream")
    if run_config:
        cmd += ["--run-config", run_config if isinstance(run_config, str) else run_config_arg(run_config)]
    return cmd


def flwr_run(
    run_config: Mapping[str, Any] | str,
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
    connection: str | None = None,
    kill_when: Callable[[str], bool] | None = None,
    keep_superlink: bool = False,
) -> FlowerRun:
    """``flwr run <app> [connection] --stream`` with overrides; returns the run's final status
    and output. Without ``connection`` it is a local simulation of ``num_supernodes`` nodes.
    The overrides are checked first (:func:`check_run_config`). ``kill_when`` (local
    simulations): a predicate on each output line; when it holds, the SuperLink and everything
    it started are killed (SIGKILL), as a crash would, and the status is ``killed`` (tests and
    scripts use it to interrupt a run and resume it; ``flwr stop`` only marks a simulation
    stopped while its ServerApp runs on). ``keep_superlink``: leave the local SuperLink running
    for the next run with the same ``flwr_home`` and ports (experiments: one SuperLink for all
    cells; the caller stops it with :func:`stop_local_superlink`)."""
    if kill_when is not None and connection:
        raise ValueError("kill_when kills a local simulation's processes; it cannot reach a deployment")
    check_run_config(run_config, app)
    flwr_home.mkdir(parents=True, exist_ok=True)
    full_env = flower_env(flwr_home, port_base=port_base, extra=env)
    cmd = _flwr_run_command(app, run_config, connection, f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
                            f"client-resources-num-gpus={gpus_per_client}")
    if "RAY_ADDRESS" not in full_env:
        clear_stale_ray_cluster()
    result, proc = None, None
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, run_id, killed = _follow(proc, flwr_home=flwr_home, timeout=timeout, echo=echo, kill_when=kill_when)
        returncode = proc.wait()
        status, details = ("killed", "") if killed else run_status(run_id, full_env, connection) if run_id else ("not-started", "")
        result = FlowerRun(returncode, run_id, status, details, "".join(lines))
        return result
    finally:  # a SuperLink is kept only after a run that ended by itself: one killed or timed out may have left its ServerApp running
        if proc is not None and proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): `flwr run --stream` would go on waiting
            proc.kill()
            proc.wait()
        if not keep_superlink or result is None or not result.status.startswith("finished"):
            stop_local_superlink(flwr_home)




def _follow(proc: subprocess.Popen, *, flwr_home: Path, timeout: float, echo: bool,
            kill_when: Callable[[str], bool] | None) -> tuple[list[str], str | None, bool]:
    """Read a ``flwr run --stream`` to its end: ``(output lines, run id, killed by kill_when)``;
    past ``timeout`` the command is killed (the run itself is left to the caller)."""
    lines, run_id = [], None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
        started = re.search(r"Successfully started run (\d+)", line)
        run_id = started.group(1) if started else run_id
        if kill_when is not None and kill_when(line):
            stop_local_superlink(flwr_home, kill=True)
            proc.kill()
            lines.append("\n[fed-crash] killed the run: its SuperLink, ServerApp and Ray processes\n")
            return lines, run_id, True
        if time.monotonic() > deadline:
            proc.kill()
            lines.append(f"\n[fed-crash] flwr run killed after {timeout}s\n")
            break
    return lines, run_id, False


def run_status(run_id: str, env: Mapping[str, str], connection: str | None = None) -> tuple[str, str]:
    flwr = Path(sys.executable).parent / "flwr"
    where = [connection] if connection else []
    out = subprocess.run([str(flwr) if flwr.exists() else "flwr", "ls", *where, "--run-id", run_id, "--format", "json"],
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


def _descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], list(pids)
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(send: Callable[[int], object], alive: Callable[[], bool], grace: float, *, kill: bool = False) -> None:
    """SIGTERM through ``send``, wait up to ``grace`` seconds for ``alive()`` to turn false,
    then SIGKILL what is left and wait again; ``kill``: SIGKILL at once."""
    for sig in (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            return
        send(sig)
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_local_superlink(flwr_home: Path, grace_s: float = 10.0, *, kill: bool = False) -> None:
    """Stop the background SuperLink that ``flwr run`` started for this FLWR_HOME and everything
    it started (the simulation process with the ServerApp, Ray's processes), which a SuperLink
    alone does not take down (Linux). SIGTERM, then SIGKILL what is left after ``grace_s``;
    ``kill``: SIGKILL at once, as a crash of the server machine would."""
    superlinks = _pids_with(f"{flwr_home}/local-superlink/")
    pids = superlinks + _descendants(superlinks)
    _terminate(lambda sig: _signal(pids, sig), lambda: any(map(_running, pids)), grace_s, kill=kill)


RAY_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


def clear_stale_ray_cluster() -> None:
    """``ray.init()`` attaches to the cluster named in /tmp/ray/ray_current_cluster; when that
    cluster is gone the file makes a new simulation hang. Remove it if no Ray head runs."""
    if RAY_CLUSTER_FILE.exists() and not _pids_with("gcs_server"):
        log.warning("removing stale %s (no Ray cluster is running)", RAY_CLUSTER_FILE)
        RAY_CLUSTER_FILE.unlink(missing_ok=True)


@contextmanager
def ray_head(*, dashboard_port: int = 8265, gcs_port: int | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A local Ray head with the dashboard for the duration of the block; yields its address.
    ``env`` is added to its environment: the client actors of a simulation attached to it are
    the head's workers and see the head's environment, not the ``flwr run`` one (the node cache
    folder, for one).

    The head is private to the block: its own GCS port (a free one unless given), its own temp
    folder (so its cluster file is not /tmp/ray's, which a plain ``ray.init()`` would attach to)
    and its own process group, which Ray's daemons and workers inherit. Stopping it ends that
    group only, where ``ray stop`` would end every Ray cluster on the machine: another
    experiment or a test beside this one keeps running."""
    ray = str(Path(sys.executable).parent / "ray")
    clear_stale_ray_cluster()
    temp = Path(tempfile.mkdtemp(prefix="ray-fc-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = gcs_port or free_port()
    cmd = [ray, "start", "--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
           f"--dashboard-port={dashboard_port}", f"--port={port}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    start = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                             start_new_session=True)
    output, _ = start.communicate()
    try:
        if start.returncode:
            raise subprocess.CalledProcessError(start.returncode, cmd, output)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_group(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def stop_process_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM every process of group ``pgid``, SIGKILL what is left after ``grace`` seconds
    (Ray's GCS and raylet may outlive a SIGTERM), and return once the group is empty."""
    def send(sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    _terminate(send, lambda: send(0), grace)


def free_port() -> int:
    """A TCP port nothing listens on now (for a run's own SuperLink ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
    """Block until something accepts connections on host:port."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answered on {host}:{port} within {timeout:.0f}s") from None
            time.sleep(0.2)


@dataclass(frozen=True)
class Credentials:
    """What a secure loopback deployment needs: a CA, the SuperLink's certificate and key (for
    127.0.0.1 and localhost), and one EC key pair per SuperNode in OpenSSH format."""

    ca: Path
    server_cert: Path
    server_key: Path
    nodes: list[tuple[Path, Path]]  # (private key, public key) per SuperNode


def make_credentials(folder: Path, num_nodes: int) -> Credentials:
    """Create a self-signed CA, a server certificate it signs and ``num_nodes`` SuperNode keys
    (P-384, as Flower's node authentication expects) with the ``cryptography`` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, names: list | None = None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_key(path: Path, key, fmt) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = certificate("fed-crash loopback CA", ca_key, "fed-crash loopback CA", ca_key, ca=True)
    server_cert = certificate("127.0.0.1", server_key, "fed-crash loopback CA", ca_key, ca=False,
                              names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(folder / "server.key", server_key, serialization.PrivateFormat.PKCS8)
    nodes = []
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = write_key(folder / f"supernode-{i}.key", key, serialization.PrivateFormat.OpenSSH)
        public = folder / f"supernode-{i}.pub"
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        nodes.append((private, public))
    return Credentials(folder / "ca.crt", folder / "server.pem", folder / "server.key", nodes)


@contextmanager
def local_deployment(flwr_home: Path, *, num_supernodes: int = 2, port: int = 9092, env: Mapping[str, str] | None = None,
                     secure: bool = False, unregistered: int = 0, shard_files: list[Path] | None = None) -> Iterator[str]:
    """Flower's deployment runtime on loopback: one SuperLink and ``num_supernodes`` SuperNodes
    as separate processes (each node gets ``partition-id``/``num-partitions``), and a
    ``deployment`` connection in ``$FLWR_HOME/config.toml``. Yields the connection name.

    ``secure``: TLS on every API (a CA and certificates from :func:`make_credentials`) and
    SuperNode authentication: the SuperLink admits only SuperNodes whose public key was
    registered (``flwr supernode register``); ``unregistered`` more SuperNodes with keys nobody
    registered try to join (their logs, ``supernode-unregistered-<i>.log``, say why they are refused).
    ``shard_files``: SuperNode i reads its data from ``shard_files[i]`` alone (node config
    ``shard-file``; runs with ``shards``, see :mod:`fed_crash.federation.shards`)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    full_env = flower_env(flwr_home, extra=env)
    bin_dir = Path(sys.executable).parent
    logs = flwr_home / "deployment-logs"
    logs.mkdir(exist_ok=True)
    creds = make_credentials(flwr_home / "credentials", num_supernodes + unregistered) if secure else None
    tls = ["--ssl-ca-certfile", str(creds.ca), "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
           "--enable-supernode-auth"] if creds else ["--insecure"]
    procs = [subprocess.Popen(
        [str(bin_dir / "flower-superlink"), *tls, "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
         "--port", str(port), "--database", str(flwr_home / "deployment.db")],
        env=full_env, stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT)]
    try:
        wait_for_port(port)
        config = flwr_home / "config.toml"
        text = config.read_text() if config.exists() else '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        if "[superlink.deployment]" not in text:
            where = f'root-certificates = "{creds.ca}"' if creds else "insecure = true"
            config.write_text(text + f'\n[superlink.deployment]\naddress = "127.0.0.1:{port}"\n{where}\n')
        for i in range(num_supernodes + unregistered):
            if creds and i < num_supernodes:
                subprocess.run([str(bin_dir / "flwr"), "supernode", "register", str(creds.nodes[i][1]), "deployment"],
                               env=full_env, check=True, capture_output=True, text=True, timeout=120)
            auth = ["--root-certificates", str(creds.ca), "--auth-supernode-private-key", str(creds.nodes[i][0])] if creds else ["--insecure"]
            name = f"supernode-{i}" if i < num_supernodes else f"supernode-unregistered-{i - num_supernodes}"
            pid = min(i, num_supernodes - 1)
            own = f' shard-file="{shard_files[pid]}"' if shard_files else ""
            procs.append(subprocess.Popen(
                [str(bin_dir / "flower-supernode"), *auth, "--superlink", f"127.0.0.1:{port}", "--port", str(port + 10 + i),
                 "--node-config", f"partition-id={pid} num-partitions={num_supernodes}{own}"],
                env=full_env, stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT))
        yield "deployment"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
