"""Experiment files: grid expansion and checks, the resumable runner and its summary (with a
stand-in for ``flwr run``), and configs/smoke.toml for real on a tiny model."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest

from fed_crash.config import ConfigError
from fed_crash.tools.experiment import load_experiment, run_experiment
from fed_crash.tools.launch import FlowerRun
from tests.conftest import REPO
from tests.test_strategies import rdp_gaussian_epsilon

GRID = """
[experiment]
name = "exp"
results-dir = "{results}"
num-supernodes = 3

[base]
num-server-rounds = 2
strategy = "fedavg"
[base.train]
steps = 3

[grid]
strategy = ["fedavg", "fedadam"]
[grid.split]
iid = {{ partitioner = "iid" }}
"dir-0.1" = {{ partitioner = "dirichlet", dirichlet-alpha = 0.1, train = {{ steps = 5 }} }}
"""


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(results=tmp_path / "results"))
    return path


def test_grid_cells_are_the_product_of_the_axes_with_variants_over_the_base(tmp_path):
    exp = load_experiment(write(tmp_path, GRID), {"model": "m"})
    assert [c.name for c in exp.cells] == ["fedavg_iid", "fedavg_dir-0.1", "fedadam_iid", "fedadam_dir-0.1"]
    assert exp.axes == ["strategy", "split"] and exp.cells[3].axes == {"strategy": "fedadam", "split": "dir-0.1"}
    assert exp.cells[3].run_config == {"num-server-rounds": 2, "strategy": "fedadam", "train.steps": 5, "model": "m",
                                       "partitioner": "dirichlet", "dirichlet-alpha": 0.1}
    assert exp.cells[0].run_config["train.steps"] == 3 and exp.folder == tmp_path / "results" / "exp"


@pytest.mark.parametrize("change, message", [
    (('strategy = ["fedavg", "fedadam"]', 'strategy = ["fedavg", "fedsgd"]'), "cell 'fedsgd_iid': run config: 'strategy' must be one of .*got 'fedsgd'"),
    (("partitioner = \"iid\"", "partitoner = \"iid\""), "cell 'fedavg_iid': run config: unknown key 'partitoner'; did you mean 'partitioner'"),
    (("num-supernodes = 3", "supernodes = 3"), r"\[experiment\]: unknown key 'supernodes'"),
    (("[base]", "[base]\nrun-name = 'x'"), "are set by the runner"),
    (("[grid]", "[grids]\n[grid]"), r"unknown table\(s\) \['grids'\]"),
    (('strategy = ["fedavg", "fedadam"]', "strategy = []"), "axis 'strategy' must be a non-empty list"),
    (('name = "exp"', 'name = "../up"'), "name '../up' may hold letters"),
    (('"dir-0.1" = ', '"dir/0.1" = '), "variant names may hold"),
])
def test_bad_experiment_files_fail_before_anything_runs(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, GRID.replace(*change)))


def test_cli_prints_a_bad_experiment_as_one_line(tmp_path, capsys):
    from fed_crash.tools.cli import main

    assert main(["experiment", str(write(tmp_path, GRID.replace('"fedadam"]', '"fedsgd"]')))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fed-crash: error: experiment cell 'fedsgd_iid'")
    # --set values are TOML; what is not TOML stays a string, and the cell check names the key
    assert main(["experiment", str(write(tmp_path, GRID)), "--set", "train.steps=abc"]) == 2
    assert "[train]: 'steps' must be int, got str 'abc'" in capsys.readouterr().err


def fake_history(loss: list[float], acc: float) -> list[dict]:
    return [{"round": r, "server": {"plugin_loss": l, "plugin_acc": acc}, "bytes_down": 3_000_000 * r, "bytes_up": 1_000_000 * r}
            for r, l in enumerate(loss)]


def test_runner_skips_finished_cells_retries_failed_ones_and_summarises(tmp_path, monkeypatch):
    exp = load_experiment(write(tmp_path, GRID.replace('"fedavg", "fedadam"', '"fedavg"')))
    calls: list[str] = []
    losses = {"fedavg_iid": [2.0, 1.5, 1.7], "fedavg_dir-0.1": [2.0, 1.9, 1.8]}
    fail = {"fedavg_dir-0.1"}

    def fake_flwr_run(run_config, **kw):
        name = run_config["run-name"]
        calls.append(name)
        run_dir = Path(run_config["results-dir"]) / name
        run_dir.mkdir(parents=True)
        if name in fail:  # a run that died after writing part of its folder
            (run_dir / "metrics.jsonl").write_text("")
            return FlowerRun(0, "7", "finished:failed", "boom", "output of a failed run")
        assert kw["num_supernodes"] == 3 and kw["env"] == {"RAY_ADDRESS": "head:1"} and kw["keep_superlink"]  # the experiment's one federation
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(h) for h in fake_history(losses[name], 0.25)))
        return FlowerRun(0, "8", "finished:completed", "", "output")

    @contextlib.contextmanager
    def fake_ray_head(**kw):  # the runner's logic, not Ray: the smoke test below runs the real one
        assert "FED_CRASH_NODE_CACHE" in kw["env"]
        yield "head:1"

    monkeypatch.setattr("fed_crash.tools.launch.flwr_run", fake_flwr_run)
    monkeypatch.setattr("fed_crash.tools.launch.ray_head", fake_ray_head)
    assert run_experiment(exp, flwr_home=tmp_path / "home") == {"fedavg_iid": "finished:completed", "fedavg_dir-0.1": "finished:failed"}
    summary = (exp.folder / "summary.md").read_text()
    # final loss 1.7, best round 1 (1.5), traffic (3+6) MB down and (1+2) MB up over the rounds
    assert "| fedavg_iid | fedavg | iid | 1.7000 | 0.250 | 1 (1.5000) | 9.0 | 3.0 |" in summary
    assert "Not finished: fedavg_dir-0.1" in summary and (exp.folder / "loss.png").is_file() and (exp.folder / "accuracy.png").is_file()
    assert (exp.folder / "logs" / "fedavg_dir-0.1.log").read_text() == "output of a failed run"

    fail.clear()
    calls.clear()
    assert run_experiment(exp, flwr_home=tmp_path / "home") == {"fedavg_iid": "skipped", "fedavg_dir-0.1": "finished:completed"}
    assert calls == ["fedavg_dir-0.1"]  # the finished cell did not run again; the failed one's folder was cleared
    summary = (exp.folder / "summary.md").read_text()
    assert "2 of 2 cells finished" in summary and "| fedavg_dir-0.1 | fedavg | dir-0.1 | 1.8000 | 0.250 | 2 (1.8000) |" in summary

    # a cell stopped after a round (its checkpoint is there) resumes instead of starting over
    (exp.folder / "fedavg_dir-0.1" / "cell.json").unlink()
    (exp.folder / "fedavg_dir-0.1" / "checkpoint.json").write_text("{}")
    calls.clear()
    resumed: list[dict] = []
    monkeypatch.setattr("fed_crash.tools.launch.flwr_run", lambda run_config, **kw: resumed.append(run_config) or FlowerRun(0, "9", "finished:completed", "", "resumed"))
    assert run_experiment(exp, flwr_home=tmp_path / "home")["fedavg_dir-0.1"] == "finished:completed"
    assert [r["resume"] for r in resumed] == [True] and (exp.folder / "fedavg_dir-0.1" / "metrics.jsonl").is_file()
    assert (exp.folder / "logs" / "fedavg_dir-0.1.log").read_text() == "outputresumed"  # the log goes on

    # --cells: only the matching cells run; the others are "not selected"
    (exp.folder / "fedavg_dir-0.1" / "cell.json").unlink()
    (exp.folder / "fedavg_dir-0.1" / "checkpoint.json").unlink()
    calls.clear()
    fail.clear()
    monkeypatch.setattr("fed_crash.tools.launch.flwr_run", fake_flwr_run)
    assert run_experiment(exp, flwr_home=tmp_path / "home", only=["*_dir-*"]) == {"fedavg_iid": "not selected", "fedavg_dir-0.1": "finished:completed"}
    assert calls == ["fedavg_dir-0.1"]
    with pytest.raises(ConfigError, match=r"no cell of experiment exp matches \['nope'\]; its cells: fedavg_iid, fedavg_dir-0.1"):
        run_experiment(exp, flwr_home=tmp_path / "home", only=["nope"])

    changed = load_experiment(write(tmp_path, GRID.replace('"fedavg", "fedadam"', '"fedavg"').replace("steps = 3", "steps = 4")))
    with pytest.raises(ConfigError, match="cell 'fedavg_iid' finished with another run config"):
        run_experiment(changed, flwr_home=tmp_path / "home")


@pytest.mark.slow
def test_smoke_experiment_on_a_tiny_model(tmp_path, monkeypatch, tiny_model_dir, data_file):
    """configs/smoke.toml through real `flwr run` simulations (3 cells: FedAvg, FedAdam, FedProx +
    FedBiOT + DP), then again: nothing runs."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)  # results/ and the run home land here
    overrides = {"model": str(tiny_model_dir), "data": str(data_file), "max-length": 256, "train.lr": 0.003}
    exp = load_experiment(REPO / "configs" / "smoke.toml", overrides)
    statuses = run_experiment(exp, flwr_home=tmp_path / "home")
    cells = ["fedavg", "fedadam", "fedbiot-dp"]
    logs = "".join((exp.folder / "logs" / f"{c}.log").read_text()[-2000:] for c in cells if (exp.folder / "logs" / f"{c}.log").exists())
    assert statuses == dict.fromkeys(cells, "finished:completed"), logs
    summary = (exp.folder / "summary.md").read_text()
    assert "3 of 3 cells finished" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| fed")]
    assert [r.split(" | ")[0] for r in rows] == [f"| {c}" for c in cells]
    history = {c: [json.loads(x) for x in (exp.folder / c / "metrics.jsonl").read_text().splitlines()] for c in cells}
    for cell in cells:
        assert f"| {cell} | {cell} | {history[cell][-1]['server']['plugin_loss']:.4f} |" in summary
    # DP: every update was clipped on the client by Flower's fixedclipping_mod (what the server
    # received has the clipping norm, 0.01, what the client trained had more), unit weights;
    # epsilon grows per round and is in the summary
    dp = history["fedbiot-dp"]
    clients = [c for h in dp[1:] for c in h["clients"]]
    assert len(clients) == 4 and all(c["unit-weight"] == 1 and c["update-norm"] > 0.01 for c in clients)
    assert all(c["received-norm"] == pytest.approx(0.01, rel=1e-3) for c in clients)
    assert "privacy" not in dp[0] and 0 < dp[1]["privacy"]["epsilon"] < dp[2]["privacy"]["epsilon"]
    assert f"{dp[2]['privacy']['epsilon']:.2f} (1e-05) |" in summary and "privacy" not in history["fedavg"][2]
    # both nodes sampled, noise multiplier 1: two Gaussian releases at sigma/2 over the sensitivity
    assert dp[2]["privacy"]["epsilon"] == pytest.approx(rdp_gaussian_epsilon(1.0 / 2, 2, 1e-5), rel=0.01)
    # FedBiOT alignment after rounds 0 and 1: a new emulator folder each time, sent again to every node
    assert [h["alignment"]["steps"] for h in dp[:2]] == [2, 2] and "alignment" not in dp[2]
    assert (exp.folder / "fedbiot-dp" / "emulator-round-1" / "emulator.safetensors").is_file()
    # a re-aligned emulator names the owner's model as its source, not the model with that round's adapters plugged in
    first, aligned = (json.loads((exp.folder / "fedbiot-dp" / f / "emulator.json").read_text())["source"]["sha256"] for f in ("emulator", "emulator-round-1"))
    assert aligned == first
    assert dp[2]["emulator_bytes_down"] > 0 and history["fedavg"][2]["emulator_bytes_down"] == 0
    # FedAdam's server moments are checkpointed with the adapters, one entry per adapter tensor each
    adapters = load_file(exp.folder / "fedadam" / "adapters" / "round-2.safetensors")
    moments = load_file(exp.folder / "fedadam" / "adapters" / "round-2.optimizer.safetensors")
    assert set(moments) == {f"{m}/{k}" for m in ("m_t", "v_t") for k in adapters}
    assert not (exp.folder / "fedavg" / "adapters" / "round-2.optimizer.safetensors").exists()
    assert not list((tmp_path / "home" / "nodes").glob("*/node-*"))  # node caches removed after each cell
    # one federation for the experiment: the first cell started the SuperLink, the others used it
    starts = [(exp.folder / "logs" / f"{c}.log").read_text().count("Starting local SuperLink") for c in cells]
    assert starts == [1, 0, 0] and len({re.search(r"Using SuperLink: local \((\S+)\)", (exp.folder / "logs" / f"{c}.log").read_text()).group(1) for c in cells}) == 1

    monkeypatch.setattr("fed_crash.tools.launch.flwr_run", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert run_experiment(exp, flwr_home=tmp_path / "home") == dict.fromkeys(cells, "skipped")


def test_stop_process_group_ends_the_group_and_only_it():
    """How a Ray head is stopped: SIGTERM to its process group, SIGKILL for what ignores it
    (Ray's GCS may), and nothing outside the group is touched."""
    import os
    import signal
    import subprocess
    import sys

    from fed_crash.tools.launch import stop_process_group

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    group = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert group.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
        stop_process_group(group.pid, grace=0.5)
        assert group.wait(timeout=5) == -signal.SIGKILL  # it outlived SIGTERM, not SIGKILL
        assert bystander.poll() is None  # another group runs on
        stop_process_group(group.pid)  # an empty group: nothing to do, no error
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait()
