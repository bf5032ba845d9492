"""The Flower app end to end (``flwr run`` with real SuperLink and Ray processes) on a tiny
model, plus the pieces it is made of: run-config parsing and client partitioning."""

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from fed_crash.config import ConfigError, FederationConfig, parse_run_config
from fed_crash.core.data import DataError
from fed_crash.tools.launch import flwr_run, free_port, toml_value
from fed_crash.federation.partition import client_shard, client_table, derived_labels, make_partitioner, partition_rows, partition_size, server_and_client_rows


@pytest.fixture(scope="module")
def fl_files(tmp_path_factory, tokenizer):
    from tests.conftest import write_run_files

    root = write_run_files(tmp_path_factory.mktemp("fl"), tokenizer, copies=8)
    mc = [{"query": f"Question: what is {i} plus one?", "choices": [str(i + 1), str(i + 2), "blue"], "gold": 0} for i in range(6)]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in mc))
    return root


def test_run_config_sections_and_errors():
    cfg = parse_run_config({"num-server-rounds": 5, "data": "x.json", "emulator.method": "crash", "train.lr": 1, "train.seed": 3, "seed": 1})
    assert cfg.fed.num_server_rounds == 5 and cfg.data.data == "x.json" and cfg.emulator.method == "crash"
    assert cfg.train.lr == 1.0 and cfg.train.seed == 3 and cfg.data.seed == 1
    with pytest.raises(ConfigError, match="unknown key 'num-server-round'; did you mean 'num-server-rounds'"):
        parse_run_config({"num-server-round": 3})
    with pytest.raises(ConfigError, match=r"\[emulator\]: 'keep' must be int, got str"):
        parse_run_config({"emulator.keep": "ten"})
    with pytest.raises(ConfigError, match="must be one of"):
        parse_run_config({"partitioner": "random"})
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        parse_run_config({"optim.lr": 0.1})


def rows(n):
    verbs = ["give", "write", "describe", "name"]
    return [{"instruction": f"{verbs[i % 4]} thing {i}", "input": "", "output": "word " * (i % 7 + 1)} for i in range(n)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_client_shards_are_disjoint_and_cover_the_pool(partitioner):
    pool = rows(200)
    fed = FederationConfig(partitioner=partitioner, dirichlet_alpha=0.3, classes_per_partition=1)
    shards = [client_shard(pool, fed, i, 4) for i in range(4)]
    seen = [r["instruction"] for shard in shards for r in shard]
    assert len(seen) == len(set(seen)) == 200
    assert client_shard(pool, fed, 1, 4) == shards[1]  # deterministic
    if partitioner == "pathological":  # one label per client
        assert all(len({r["instruction"].split()[0] for r in shard}) == 1 for shard in shards)


@pytest.mark.parametrize("cap", [0, 7, 500])
def test_partition_size_is_the_length_of_the_rows_without_reading_them(cap):
    fed = FederationConfig(partitioner="dirichlet", dirichlet_alpha=0.3, max_client_examples=cap)
    partitioner = make_partitioner(client_table(rows(200), fed), fed, 4)
    sizes = [partition_size(partitioner, fed, i) for i in range(4)]
    assert sizes == [len(partition_rows(partitioner, fed, i)) for i in range(4)]
    assert sum(sizes) == 200 if cap in (0, 500) else max(sizes) == cap
    with pytest.raises(DataError, match="partition-id 4 is outside 0..3"):
        partition_size(partitioner, fed, 4)


def test_labels_and_server_slices():
    assert derived_labels(rows(8), "first-word")[:4] == ["give", "write", "describe", "name"]
    assert set(derived_labels(rows(40), "length")) == {"q1", "q2", "q3", "q4"}
    parts = server_and_client_rows(rows(50), FederationConfig(eval_examples=10), parse_run_config({}).data, calib=5)
    assert [len(parts[k]) for k in ("eval", "calibration", "clients")] == [10, 5, 35]
    from fed_crash.federation.partition import calibration_slice

    assert calibration_slice(parse_run_config({"emulator.method": "crash", "emulator.calib-samples": 7})) == 7
    assert calibration_slice(parse_run_config({"emulator.method": "crash", "calib-data": "public.json"})) == 0
    assert calibration_slice(parse_run_config({"emulator.method": "uniform"})) == 0
    with pytest.raises(DataError, match="5 clients but only 3 client examples"):
        client_shard(rows(3), FederationConfig(), 0, 5)


def test_the_emulator_is_evaluated_at_round_0_at_the_last_round_and_every_nth_round_the_plug_in_every_round():
    from fed_crash.federation.server import emulator_evaluated, round_summary, rounds_table

    assert [r for r in range(6) if emulator_evaluated(r, 5, 0)] == [0, 5]
    assert [r for r in range(6) if emulator_evaluated(r, 5, 2)] == [0, 2, 4, 5]
    assert [r for r in range(6) if emulator_evaluated(r, 5, 1)] == [0, 1, 2, 3, 4, 5]
    line = {"round": 1, "clients": [], "failures": [], "aggregated": True, "bytes_down": 0, "bytes_up": 0, "bytes_down_per_client": {},
            "bytes_up_per_client": {}, "full_model_bytes": 1, "elapsed_seconds": 9.0, "server": {"plugin_loss": 2.0476, "plugin_ppl": 7.75}}
    assert "| plug-in loss 2.0476 | emulator loss - |" in round_summary(line, 3)
    assert rounds_table([line]).splitlines()[-1].startswith("| 1 | 0 | - | 2.0476 | 7.75 | - |")
    line["server"] |= {"emulator_loss": 4.2386, "emulator_ppl": 69.3}
    assert "| emulator loss 4.2386 |" in round_summary(line, 3) and "| 4.2386 |" in rounds_table([line])


@pytest.mark.slow
def test_secure_deployment_with_tls_node_authentication_and_one_shard_file_per_node(fl_files, tmp_path):
    """Flower's deployment runtime: a SuperLink and two SuperNodes as separate processes, TLS on
    every connection and SuperNode authentication (``fed-crash simulate --deployment --secure``),
    one round. Each message starts its own ``flwr-clientapp`` process there, so training reads
    the emulator that an earlier process stored in the node's cache on disk. A third SuperNode,
    whose key nobody registered, is refused and the run trains without it. The data is split
    with ``fed-crash shards``: the server holds its slices, each SuperNode its own shard file
    (node config ``shard-file``), and every client process opens that file and no other data
    file; the run config's ``data`` does not even exist."""
    from fed_crash.federation.client import OPEN_LOG
    from fed_crash.tools.cli import main
    from fed_crash.tools.launch import local_deployment

    config = {"model": str(fl_files / "model"), "data": str(tmp_path / "nobody-has-this.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": "dep", "eval-examples": 8, "max-length": 256, "num-server-rounds": 1, "emulator.keep": 2,
              "emulator.method": "crash", "calib-data": str(fl_files / "rows.jsonl"), "train.steps": 2, "save-model": False}
    split = tmp_path / "split"
    cut = {**config, "data": str(fl_files / "rows.jsonl")}  # the data owner side: cut once, hand out the files
    assert main(["shards", str(split), "--num-partitions", "2", "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in cut.items())]) == 0
    shard_files = []
    for i in range(2):  # each data owner's machine holds its own file
        (tmp_path / f"owner-{i}").mkdir()
        shard_files.append((split / f"shard-{i}.jsonl").rename(tmp_path / f"owner-{i}" / f"shard-{i}.jsonl"))
    home, opens = tmp_path / "flwr", tmp_path / "opens.log"
    with local_deployment(home, num_supernodes=2, port=free_port(), env={"FED_CRASH_NODE_CACHE": str(tmp_path / "nodes"), OPEN_LOG: str(opens)},
                          secure=True, unregistered=1, shard_files=shard_files) as connection:
        result = flwr_run({**config, "shards": str(split)}, flwr_home=home, connection=connection, timeout=600)
    assert result.ok, result.output[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results" / "dep" / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["clients"]) for line in lines] == [0, 2]
    assert sorted(c["num-examples"] for c in lines[1]["clients"]) == sorted(json.loads((split / "split.json").read_text())["files"][f"shard-{i}.jsonl"]["rows"] for i in range(2))
    assert json.loads((tmp_path / "results" / "dep" / "emulator/emulator.json").read_text())["spec"]["method"] == "crash"
    assert 'root-certificates = "' in (home / "config.toml").read_text() and "insecure" not in (home / "config.toml").read_text().split("[superlink.deployment]")[1]
    logs = home / "deployment-logs"
    assert "Failed to activate SuperNode" in (logs / "supernode-unregistered-0.log").read_text()
    assert all("Received successfully" in (logs / f"supernode-{i}.log").read_text() for i in range(2))
    data_files: dict[str, set[str]] = {}  # client process -> the data files it opened (not the emulator's, not installed packages')
    for pid, path in (line.split(" ", 1) for line in opens.read_text().splitlines()):
        if not path.startswith((str(tmp_path / "nodes"), sys.prefix, str(home))):
            data_files.setdefault(pid, set()).add(path)
    assert set().union(*data_files.values()) == {str(f) for f in shard_files}, data_files
    assert all(len(paths) == 1 for paths in data_files.values())  # no process opened both shards, nor anything else


def test_data_source_local_path_or_hub_name(tmp_path, monkeypatch):
    from fed_crash.federation.partition import data_source

    monkeypatch.setenv("FED_CRASH_ROOT", str(tmp_path))
    assert data_source(parse_run_config({"data": ""})) == "tatsu-lab/alpaca"  # no path: the hub
    assert data_source(parse_run_config({"data": "someone/dataset"})) == "someone/dataset"
    assert data_source(parse_run_config({"data": "rows.jsonl"})) == str(tmp_path / "rows.jsonl")  # relative: to the root


@pytest.mark.slow
def test_fed_crash_simulate_twenty_supernodes_a_quarter_sampled_on_the_ray_dashboard(fl_files, tmp_path):
    """What users run, ``fed-crash simulate --dashboard``: a real ``flwr run`` of 20 supernodes
    (Dirichlet shards, a quarter sampled per round, a CRaSh emulator) for 2 rounds on a Ray head
    with the dashboard, whose state API lists the ClientAppActor workers while the run goes on;
    nothing of Ray is left afterwards. The emulator goes to each node once, the first time it is
    sampled. The exit code follows the run's final status, and a run that fails at start writes
    nothing."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from fed_crash.tools.launch import RAY_CLUSTER_FILE, _pids_with

    def simulate(home, overrides, *extra):
        args = [sys.executable, "-m", "fed_crash.tools.cli", "simulate", "--flwr-home", str(tmp_path / home), "--num-supernodes", "20", *extra,
                "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in {**config, **overrides}.items())]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    config = {"model": str(fl_files / "model"), "data": str(fl_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": "t", "eval-examples": 8, "max-length": 256, "num-server-rounds": 2, "fraction-train": 0.25,
              "min-train-nodes": 1, "min-available-nodes": 20, "max-client-examples": 16, "partitioner": "dirichlet",
              "dirichlet-alpha": 1.0, "emulator.keep": 2, "emulator.calib-samples": 8,
              "emulator.method": "crash", "train.steps": 4, "train.lr": 0.003, "mc-task": str(fl_files / "mc.jsonl"), "mc-samples": 4}
    # a node cache the user names is kept after the run (simulate removes only its own): what the nodes received is read below
    env = {**os.environ, "FED_CRASH_NODE_CACHE": str(tmp_path / "home" / "nodes")}
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port := free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(port + 2))
    dashboard, answers = free_port(), []
    clusters_before = set(_pids_with("gcs_server"))  # another Ray cluster on the machine is not this run's to stop
    proc = simulate("home", {}, "--dashboard", "--dashboard-port", str(dashboard))
    while proc.poll() is None:  # the dashboard answers while the run goes on
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/v0/actors?limit=100", timeout=5) as reply:
                answers.append(json.load(reply)["data"]["result"]["result"])
        except OSError:
            pass
        time.sleep(0.5)
    output = proc.stdout.read()
    assert proc.returncode == 0 and "finished:completed" in output, output[-3000:]
    actors = [a for answer in answers for a in answer if a.get("class_name") == "ClientAppActor"]
    assert actors, f"no ClientAppActor in the dashboard's answers: {answers[-1:]}"
    assert {"actor_id", "state", "pid"} <= set(actors[0])
    assert not RAY_CLUSTER_FILE.exists() and set(_pids_with("gcs_server")) <= clusters_before  # the head is gone, its cluster file too

    run_dir = tmp_path / "results" / "t"
    assert "round 2/2 | clients 5 ok 0 failed" in output  # one readable line per round
    for name in ("config.json", "metrics.jsonl", "rounds.png", "emulator/emulator.json", "adapters/round-0.safetensors",
                 "adapters/round-2.safetensors", "adapters/final.safetensors", "plugin-model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all(line["server"]["plugin_loss"] > 0 for line in lines)  # the plug-in every round; the emulator at round 0 and the last
    assert [line["server"].get("emulator_loss", 0) > 0 for line in lines] == [True, False, True]
    assert all(0 <= line["server"]["plugin_acc"] <= 1 and "plugin_acc_norm" in line["server"] for line in lines)
    assert [len(line["clients"]) for line in lines] == [0, 5, 5]
    assert all(0 < c["num-examples"] <= 16 and c["steps"] == 4 for c in lines[1]["clients"])
    assert len({c["num-examples"] for line in lines[1:] for c in line["clients"]}) > 1  # Dirichlet shards differ in size
    # the emulator goes down once per node, the first time it is sampled; adapters every round, and they change
    sampled = [set(line["bytes_down_per_client"]) for line in lines[1:]]
    per_node = lines[1]["emulator_bytes_down"] / 5
    assert per_node > 0 and lines[2]["emulator_bytes_down"] == per_node * len(sampled[1] - sampled[0])
    assert lines[2]["bytes_up"] > 0
    first, final = load_file(run_dir / "adapters/round-0.safetensors"), load_file(run_dir / "adapters/final.safetensors")
    assert any(not torch.equal(first[k], final[k]) for k in first)

    # What a client received holds no weight of a removed layer (by content, under any name).
    central = load_file(fl_files / "model" / "model.safetensors")
    spec = json.loads((run_dir / "emulator/emulator.json").read_text())["spec"]
    removed = [i for i in range(2, 6) if i not in spec["kept"]]
    digest = lambda t: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()  # noqa: E731  (bf16 too)
    removed_matrices = [v for k, v in central.items() if v.dim() == 2 and int(k.split(".")[2] if k.startswith("model.layers.") else -1) in removed]
    removed_hashes = {digest(v.to(dtype)) for v in removed_matrices for dtype in (torch.float32, torch.bfloat16)}  # the auto wire sends bf16 matrices
    received = list((tmp_path / "home" / "nodes").glob("node-*/*/emulator.safetensors"))
    assert len(received) == len(sampled[0] | sampled[1])  # one cached emulator per node sampled, under the run home
    for path in received:
        assert not removed_hashes & {digest(v) for v in load_file(path).values()}
        assert not list(path.parent.glob("model*.safetensors"))  # no full-model checkpoint

    written = sorted(tmp_path.joinpath("results").rglob("*"))
    bad = simulate("home2", {"run-name": "bad", "emulator.keep": 99})
    output = bad.communicate(timeout=600)[0]
    assert bad.returncode == 1 and "finished:failed" in output
    assert "cannot keep 99 layers" in output  # the message names the problem
    assert sorted(tmp_path.joinpath("results").rglob("*")) == written  # a failed start writes nothing


def test_sigterm_to_fed_crash_simulate_stops_everything_it_started(fl_files, tmp_path):
    """``kill <pid>`` of a ``fed-crash simulate`` mid-run (a scheduler's stop, a shell's
    ``kill %1``) ends it as Ctrl-C would: the SuperLink, the simulation with its ServerApp and the
    Ray processes are stopped, the run's node cache is removed, and the exit status says SIGTERM
    (without the handler Python died at once and left all of them running)."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    from fed_crash.tools.launch import _descendants, _pids_with, _running

    home = tmp_path / "home"
    config = {"model": str(fl_files / "model"), "data": str(fl_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": "t", "eval-examples": 8, "max-length": 256, "num-server-rounds": 50, "min-available-nodes": 2,
              "max-client-examples": 8, "emulator.keep": 2, "train.steps": 2}
    env = {**os.environ}
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port := free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(port + 2))
    proc = subprocess.Popen([sys.executable, "-m", "fed_crash.tools.cli", "simulate", "--flwr-home", str(home), "--num-supernodes", "2",
                             "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline and not any("train messages sent to" in line for line in seen[-1:]):  # mid-run: Ray and the clients up
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
    assert proc.poll() is None, "".join(seen[-50:])
    superlink = _pids_with(f"{home}/local-superlink/")
    started = superlink + _descendants(superlink) + _descendants([proc.pid])
    assert superlink and any("flwr-simulation" in (Path("/proc") / str(p) / "cmdline").read_text(errors="replace") for p in started if _running(p))
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    left = [p for p in started if _running(p)]
    assert not left, [(Path("/proc") / str(p) / "cmdline").read_text(errors="replace") for p in left]
    assert not list((home / "nodes").glob("run-*"))  # the run's own node cache is gone


@pytest.mark.slow
def test_a_ray_head_stops_only_its_own_cluster():
    """Two heads at once (two experiments, or a test beside an experiment): leaving the inner
    block ends the inner head's processes, and the outer head keeps running and answering; no
    head writes /tmp/ray's cluster file, which a plain ``ray.init()`` would attach to."""
    from fed_crash.tools.launch import RAY_CLUSTER_FILE, _pids_with, free_port, ray_head, wait_for_port

    before = set(_pids_with("gcs_server"))
    had_cluster_file = RAY_CLUSTER_FILE.exists()
    with ray_head(dashboard_port=free_port(), num_cpus=1) as outer:
        outer_gcs = set(_pids_with("gcs_server")) - before
        with ray_head(dashboard_port=free_port(), num_cpus=1) as inner:
            assert inner != outer
            inner_gcs = set(_pids_with("gcs_server")) - before - outer_gcs
            assert len(outer_gcs) == 1 and len(inner_gcs) == 1
        assert not set(_pids_with("gcs_server")) & inner_gcs  # the inner head is gone
        assert outer_gcs <= set(_pids_with("gcs_server"))  # the outer one runs on
        wait_for_port(int(outer.rsplit(":", 1)[1]), timeout=5)  # and answers
        assert RAY_CLUSTER_FILE.exists() == had_cluster_file
    assert set(_pids_with("gcs_server")) <= before
