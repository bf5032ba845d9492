"""GPU scheduling without a GPU: Ray schedules client actors by *logical* GPUs, so the layout a
user with GPUs relies on (``client-resources-num-gpus=0.25``: four clients per GPU) can be run
for real on this CPU machine. A client that Ray gave a GPU torch cannot use trains on the CPU
and says so; the server's device is its own setting."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from fed_crash.core.models import ModelError, resolve_device
from fed_crash.federation.client import assigned_gpus, client_device
from fed_crash.tools.launch import free_port, toml_value


def test_a_client_given_an_unusable_gpu_trains_on_the_cpu_and_says_so(monkeypatch, caplog):
    import fed_crash.federation.client as client

    monkeypatch.setattr(client, "_WARNED", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what torch says on this machine anyway
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # what Ray sets for an actor given a share of GPU 1
    with caplog.at_level(logging.WARNING, logger="fed_crash.federation.client"):
        assert assigned_gpus() == [1] and client_device() == torch.device("cpu")
        client_device()
    assert [r.getMessage() for r in caplog.records] == [
        f"Ray assigned GPU 1 to this client (CUDA_VISIBLE_DEVICES=1) but torch cannot use CUDA (built for CUDA: {torch.version.cuda or 'no'}): training on the CPU"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU share: the CPU, nothing to warn about
    assert assigned_gpus() == [] and client_device() == torch.device("cpu")


def test_the_server_device_is_checked_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ModelError, match=r"device 'cuda:1' was asked for, but torch sees 0 usable CUDA device\(s\)"):
        resolve_device("cuda:1")
    with pytest.raises(ModelError, match="device 'gpu' is not a device name"):
        resolve_device("gpu")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one time (an end and a start at the same instant do not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_max_overlap_by_hand():
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2 and max_overlap([(0, 1), (1, 2)]) == 1 and max_overlap([(0, 5)] * 3) == 3


@pytest.mark.slow
def test_two_logical_gpus_at_a_quarter_each_run_eight_client_actors_at_once(tmp_path, tokenizer):
    """``fed-crash simulate --dashboard --head-cpus 16 --head-gpus 2 --gpus-per-client 0.25`` with
    10 clients, all sampled: Ray makes 8 actors (2 GPUs / 0.25; the 16 logical CPUs would allow
    16), each with GPU 0 or 1 in CUDA_VISIBLE_DEVICES, at most four per GPU; the train handlers'
    start and end times never have more than 8 open at once, nor more than Flower's thread pool
    runs (6 on 2 cores), and more than the 2 real cores would give; every client trained on the
    CPU, torch having no CUDA here."""
    from tests.conftest import write_run_files

    files = write_run_files(tmp_path / "files", tokenizer, copies=10)
    config = {"model": str(files / "model"), "data": str(files / "rows.jsonl"), "results-dir": str(tmp_path / "results"), "run-name": "gpus", "max-length": 256,
              "eval-examples": 8, "num-server-rounds": 2, "fraction-train": 1.0, "min-train-nodes": 10, "min-available-nodes": 10,
              "max-client-examples": 16, "emulator.keep": 2, "train.steps": 25, "save-model": False, "server-device": "cpu"}
    env = {k: v for k, v in os.environ.items() if k != "FED_CRASH_NODE_CACHE"}
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port := free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(port + 2))
    result = subprocess.run([sys.executable, "-m", "fed_crash.tools.cli", "simulate", "--flwr-home", str(tmp_path / "home"), "--dashboard",
                             "--dashboard-port", str(free_port()), "--head-cpus", "16", "--head-gpus", "2", "--num-supernodes", "10",
                             "--cpus-per-client", "1", "--gpus-per-client", "0.25",
                             "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 and "finished:completed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "results" / "gpus" / "metrics.jsonl").read_text().splitlines()]
    clients = [c for line in lines for c in line["clients"]]
    assert len(clients) == 20 and not any(line["failures"] for line in lines)
    actors = {c["worker-pid"]: c["gpu-id"] for c in clients}
    assert set(actors.values()) <= {0, 1} and 3 <= len(actors) <= 8, actors  # Ray made min(16 CPUs / 1, 2 GPUs / 0.25) = 8 actors
    assert all(sum(g == gpu for g in actors.values()) <= 4 for gpu in (0, 1)), actors  # at most four share a GPU
    assert {c["on-cuda"] for c in clients} == {int(torch.cuda.is_available())}
    # Flower runs client jobs from a thread pool of min(32, cores + 4) threads: on 2 cores 6 of the 8 actors work at once
    threads = min(32, (os.cpu_count() or 1) + 4)
    overlap = max_overlap([(c["start-time"], c["end-time"]) for c in clients])
    assert 2 < overlap <= min(8, threads), overlap
    for gpu in (0, 1):
        assert max_overlap([(c["start-time"], c["end-time"]) for c in clients if c["gpu-id"] == gpu]) <= 4
    assert json.loads((tmp_path / "results" / "gpus" / "config.json").read_text())["compute"]["server_device"] == "cpu"
    # the nodes cached the emulator under <flwr-home>/nodes/run-<pid>/node-<id> during the run; their ids are new in
    # every run, so simulate removed them afterwards
    assert (tmp_path / "home" / "nodes").is_dir() and not list((tmp_path / "home" / "nodes").rglob("node-*"))
