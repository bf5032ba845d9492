"""An experiment's multiple-choice report (``eval-tasks``): the four models of every cell scored
for real on a tiny model, the ``full`` cell as each cell's ceiling, gain retention and the seed
table recomputed here from the per-question records, and a second pass that scores nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fed_crash.core.artifacts import save_adapters, save_emulator
from fed_crash.core.emulator import build_emulator
from fed_crash.core.models import load_model
from fed_crash.evaluation.stats import gain_retention, paired_bootstrap, seeds_interval
from fed_crash.federation.checkpoint import StrategyState, write_checkpoint
from fed_crash.selection import make_spec
from fed_crash.tools.experiment import CELL_FILE, load_experiment, run_experiment
from fed_crash.tools.experiment_report import interval_text, kept_text
from tests.conftest import ROWS

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENT = """
[experiment]
name = "tasks"
results-dir = "{results}"
num-supernodes = 2
eval-tasks = "{mc}"
eval-limit = 0

[base]
model = "{model}"
[base.emulator]
keep = 2

[grid.emulator]
uniform = {{ emulator = {{ method = "uniform" }} }}
full = {{ emulator = {{ method = "full" }} }}

[grid]
seed = [0, 1]
"""


def finished_cell(folder, loaded, cell, nudge: float) -> None:
    """What a finished cell leaves behind: its emulator, final adapters (the model's own, moved by
    ``nudge``), checkpoint, metrics and cell.json: the report reads nothing else."""
    spec = make_spec(cell.run_config["emulator.method"], 8, bottom=2, top=2, keep=2)
    run_dir = folder / cell.name
    emulator = save_emulator(run_dir / "emulator", loaded.model, loaded.tokenizer, spec, source_id=loaded.model_id)
    generator = torch.Generator().manual_seed(int(cell.run_config["seed"]))
    adapters = {k: v + nudge * torch.randn(v.shape, generator=generator) for k, v in build_emulator(loaded.model, spec).adapter_state().items()}
    path = save_adapters(run_dir / "adapters" / "round-1.safetensors", adapters, {"round": 1})
    write_checkpoint(run_dir, 1, path, StrategyState(), emulator, 1.0)
    history = [{"round": r, "server": {"plugin_loss": 2.0 - 0.1 * r - 0.01 * int(cell.run_config["seed"])},
                "bytes_down": 4e6, "bytes_up": 2e6, "bytes_down_per_client": {"0": 3e6, "1": 1e6}, "bytes_up_per_client": {"0": 1e6, "1": 1e6},
                "clients": [{"peak-rss-mib": 100.0 + r}]} for r in (0, 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(h) for h in history))
    (run_dir / CELL_FILE).write_text(json.dumps({"status": "finished:completed", "wall_seconds": 1.0, "axes": cell.axes, "run_config": cell.run_config}))


def test_cells_are_scored_on_the_tasks_against_their_full_ceiling(tmp_path, tiny_model_dir, monkeypatch):
    mc = tmp_path / "quiz.jsonl"
    mc.write_text("\n".join(json.dumps({"query": f"Q: {r['instruction']}\nA:", "choices": ["a", "b", "c c c", "d d d"], "gold": i % 4})  # acc picks a short choice, acc_norm a long one
                            for i, r in enumerate(ROWS[:12])))
    exp = load_experiment(_write(tmp_path, mc, tiny_model_dir))
    assert [c.name for c in exp.cells] == ["uniform_0", "uniform_1", "full_0", "full_1"]
    loaded = load_model(str(tiny_model_dir))
    for cell in exp.cells:
        finished_cell(exp.folder, loaded, cell, nudge=4.0 if cell.run_config["emulator.method"] == "full" else 2.0)
    run_experiment(exp, flwr_home=tmp_path / "home")  # every cell finished: no federation starts, the report runs

    rows = json.loads((exp.folder / "tasks.json").read_text())["rows"]
    assert [(r["cell"], r["task"], r["n"]) for r in rows] == [(c.name, "quiz", 12) for c in exp.cells]

    def correct(cell: str, model: str, metric: str = "acc") -> list[int]:
        folder = exp.folder / ("uniform_0" if model == "full_zero_shot" else cell) / "report"  # the first cell scored the full model once
        return [json.loads(line)["correct"][metric] for line in (folder / f"samples-{model}-quiz.jsonl").read_text().splitlines()]

    for row in rows:
        zero_shot, plug_in = correct(row["cell"], "full_zero_shot"), correct(row["cell"], "plug_in")
        assert row["gain"] == paired_bootstrap(plug_in, zero_shot)
        ceiling = None if row["cell"].startswith("full") else correct("full_" + row["cell"][-1], "plug_in")  # uniform_<seed>'s is full_<seed>
        assert row["correct"] == {"plug_in": plug_in, "zero_shot": zero_shot, **({"ceiling": ceiling} if ceiling else {})}
        for model in ("full_zero_shot", "plug_in"):  # acc_norm beside acc, from the per-question records
            assert row["acc_norm"][model][0] == pytest.approx(sum(correct(row["cell"], model, "acc_norm")) / 12)
        if ceiling:
            assert row["acc_norm"]["ceiling"][0] == pytest.approx(sum(correct("full_" + row["cell"][-1], "plug_in", "acc_norm")) / 12)
        assert row["mb_per_client"] == pytest.approx((2 * 4e6 + 2 * 2e6) / 2 / 1e6) and row["peak_rss_mib"] == 101.0
        if row["cell"].startswith("full"):
            assert "ceiling" not in row and "retention" not in row
        else:
            assert row["ceiling"][0] == pytest.approx(sum(ceiling) / 12)
            assert json.dumps(row["retention"]) == json.dumps(gain_retention(plug_in, zero_shot, ceiling))
    text = (exp.folder / "tasks.md").read_text()
    assert "| uniform_0 | quiz | 12 |" in text and (exp.folder / "frontier.png").stat().st_size > 0
    uniform_0 = next(r for r in rows if r["cell"] == "uniform_0")
    pct = "{:.1f} ± {:.1f}".format
    assert f"| {pct(100 * uniform_0['plug_in'][0], 100 * uniform_0['plug_in'][1])} / {pct(*(100 * v for v in uniform_0['acc_norm']['plug_in']))} |" in text
    assert "| uniform | quiz | 2 |" in text and "| full | quiz | 2 |" in text  # the seeds table: two repeats each
    seeds = {s["configuration"]: s for s in json.loads((exp.folder / "tasks.json").read_text())["seeds"]}
    for method in ("uniform", "full"):  # recomputed from the per-question records of both seeds
        by_seed = [(correct(f"{method}_{seed}", "plug_in"), correct(f"{method}_{seed}", "full_zero_shot")) for seed in (0, 1)]
        got = seeds[method]
        assert got["cells"] == [f"{method}_0", f"{method}_1"] and got["n"] == 12
        assert got["gain"] == seeds_interval([paired_bootstrap(p, z)["difference"] for p, z in by_seed])
        averaged = [(a + b) / 2 for a, b in zip(by_seed[0][0], by_seed[1][0])]
        assert got["averaged_gain"] == paired_bootstrap(averaged, by_seed[0][1])
        assert got["beyond"] == sum(paired_bootstrap(p, z)["low"] > 0 for p, z in by_seed)
    averaged_ceiling = [(a + b) / 2 for a, b in zip(correct("full_0", "plug_in"), correct("full_1", "plug_in"))]
    averaged_plug_in = [(a + b) / 2 for a, b in zip(correct("uniform_0", "plug_in"), correct("uniform_1", "plug_in"))]
    assert json.dumps(seeds["uniform"]["averaged_retention"]) == json.dumps(gain_retention(averaged_plug_in, correct("uniform_0", "full_zero_shot"), averaged_ceiling))
    assert "averaged_retention" not in seeds["full"]  # the ceiling has no ceiling
    # plug-in against plug-in for cells that differ only in the emulator: within each seed, never across seeds
    pairs = json.loads((exp.folder / "tasks.json").read_text())["pairs"]
    assert [(p["a"], p["b"], p["task"]) for p in pairs] == [("uniform_0", "full_0", "quiz"), ("uniform_1", "full_1", "quiz")]
    for p in pairs:
        for metric in ("acc", "acc_norm"):
            assert p[metric] == paired_bootstrap(correct(p["a"], "plug_in", metric), correct(p["b"], "plug_in", metric))
    assert "| uniform_0 - full_0 | acc_norm |" in text
    # a ceiling scored in a later run: scripts/task_retention.py pairs the kept rows with its report alone
    out = tmp_path / "retention.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "task_retention.py"), str(exp.folder / "tasks.json"), str(exp.folder / "full_0" / "report"),
                    "--cells", "uniform_0", "--out", str(out)], check=True, capture_output=True)
    uniform_0 = next(r for r in rows if r["cell"] == "uniform_0")
    assert json.dumps(json.loads(out.read_text())["uniform_0/quiz"]["retention"]) == json.dumps(uniform_0["retention"])
    # the ceiling as a cell kept in a tasks.json, and a second plug-in to compare against
    subprocess.run([sys.executable, str(ROOT / "scripts" / "task_retention.py"), str(exp.folder / "tasks.json"), "--ceiling", "full_0",
                    "--cells", "uniform_0", "--against", "uniform_1", "--out", str(out)], check=True, capture_output=True)
    kept = json.loads(out.read_text())["uniform_0/quiz"]
    assert json.dumps(kept["retention"]) == json.dumps(uniform_0["retention"])
    assert kept["plug_in_minus_against"] == paired_bootstrap(correct("uniform_0", "plug_in"), correct("uniform_1", "plug_in"))
    # the gain and retention in acc_norm, from the same records
    printed = subprocess.run([sys.executable, str(ROOT / "scripts" / "task_metric.py"), str(exp.folder), "--ceiling", "full_0", "--cells", "uniform_0"],
                             check=True, capture_output=True, text=True).stdout
    norm = [correct("uniform_0", m, "acc_norm") for m in ("plug_in", "full_zero_shot")] + [correct("full_0", "plug_in", "acc_norm")]
    assert f"| uniform_0 | quiz | {interval_text(paired_bootstrap(norm[0], norm[1]))} | {kept_text(gain_retention(*norm))} |" in printed
    summary = (exp.folder / "summary.md").read_text()
    assert "| uniform | 2 | 1.8950 ± 0.0071 | 1.8900-1.9000 |" in summary and "[tasks.md](tasks.md)" in summary

    monkeypatch.setattr("fed_crash.tools.experiment_report.four_model_report", lambda *a, **k: pytest.fail("a scored cell was scored again"))
    run_experiment(exp, flwr_home=tmp_path / "home")
    assert json.loads((exp.folder / "tasks.json").read_text())["rows"] == rows


def test_a_missing_eval_task_fails_when_the_experiment_is_read(tmp_path, tiny_model_dir):
    from fed_crash.config import ConfigError

    with pytest.raises(ConfigError, match="eval-tasks: .*nope.jsonl does not exist"):
        load_experiment(_write(tmp_path, tmp_path / "nope.jsonl", tiny_model_dir))


def _write(tmp_path, mc, model):
    path = tmp_path / "tasks.toml"
    path.write_text(EXPERIMENT.format(results=tmp_path / "results", mc=mc, model=model))
    return path


def test_an_aligned_emulator_cell_pairs_with_the_ceiling_of_its_other_settings():
    from types import SimpleNamespace as Cell

    from fed_crash.tools.experiment_report import ceiling_of

    full = [Cell(name=f"full_{s}", run_config={"emulator.method": "full", "seed": s}) for s in (0, 1)]
    aligned = Cell(name="search-aligned_0", run_config={"emulator.method": "search", "emulator.keep": 14, "fedbiot-align-steps": 30,
                                                       "fedbiot-align-lr": 1e-4, "seed": 1})
    assert ceiling_of(aligned, full) == "full_1"  # the alignment acts on the emulator only; the seed must match
    assert ceiling_of(Cell(name="x", run_config={**aligned.run_config, "strategy": "fedprox"}), full) is None
