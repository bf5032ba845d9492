"""The ``fed-crash`` CLI end to end on a tiny model folder: in a subprocess as a user runs it,
and, for the many follow-up calls of one scenario and the bad-input cases, through the same
``main`` in this process (an interpreter start-up that imports torch costs seconds each)."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fed_crash.core.artifacts import ADAPTERS, WEIGHTS
from tests.conftest import ROWS


def fed_crash(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "fed_crash.tools.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"fed-crash {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def fed_crash_here(capsys):
    """``fed_crash`` without the subprocess: the same argument parsing, handler and exit code."""
    from fed_crash.tools.cli import main

    def run(*args, check=True):
        try:
            code = main(list(map(str, args)))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        captured = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"fed-crash {' '.join(map(str, args))} failed:\n{captured.out}\n{captured.err}")
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def test_emulator_build_prints_the_layer_map_and_writes_files(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "emu"
    result = fed_crash("emulator", "build", "--model", tiny_model_dir, "--data", data_file, "--method", "crash",
                       "--keep", "2", "--calib-samples", "16", "--out", out, "--no-progress")
    assert "crash: 2+2+2 of 8 layers, depth 8" in result.stdout
    assert "clusters: [" in result.stdout
    assert len({k.split(".")[2] for k in load_file(out / WEIGHTS) if k.startswith("model.layers.")}) == 2
    assert len({k.split(".")[2] for k in load_file(out / ADAPTERS)}) == 4
    report = fed_crash("emulator", "inspect", out).stdout
    assert "distinct decoder layers: 6; removed layers stored: none" in report


def test_tune_method_full_is_the_centralised_ceiling(tiny_model_dir, data_file, tmp_path, fed_crash_here):
    """OFT's "FT" row: with every middle layer kept the emulator is the model, so its zero-shot and
    fine-tuned losses are the full model's and the plug-in's, and tuning lowers them."""
    out = tmp_path / "ceiling"
    fed_crash_here("tune", "--model", tiny_model_dir, "--data", data_file, "--method", "full", "--steps", "10", "--lr", "3e-3",
                   "--train-examples", "24", "--eval-examples", "8", "--out", out, "--no-progress", "--compute-dtype", "fp32")
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["method"] == "full" and report["spec"]["kept"] == [2, 3, 4, 5]
    assert report["emulator_zero_shot"]["loss"] == pytest.approx(report["full_zero_shot"]["loss"], abs=1e-6)
    assert report["emulator_fine_tuned"]["loss"] == pytest.approx(report["plug_in"]["loss"], abs=1e-6)
    assert report["plug_in"]["loss"] < report["full_zero_shot"]["loss"]


def test_tune_writes_the_four_model_report_and_plugin_uses_it(tiny_model_dir, data_file, tmp_path, fed_crash_here):
    out = tmp_path / "tune"
    result = fed_crash("tune", "--model", tiny_model_dir, "--data", data_file, "--method", "uniform", "--keep", "2",
                       "--steps", "20", "--lr", "3e-3", "--train-examples", "24", "--eval-examples", "8", "--out", out, "--no-progress",
                       "--compute-dtype", "fp32")  # fp32: the report below batches the same rows differently, and must agree to 1e-4
    report = json.loads((out / "report.json").read_text())
    for name in ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in"):
        assert report[name]["loss"] > 0 and name in result.stdout
    assert report["emulator_fine_tuned"]["loss"] < report["emulator_zero_shot"]["loss"]
    assert report["training"]["steps"] == 20

    # the four-model table on a multiple-choice file and held-out instructions
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"query": f"Question: {r['instruction']}", "choices": [r["output"], "no idea"], "gold": 0}) for r in ROWS[:6]))
    result = fed_crash_here("report", "--model", tiny_model_dir, "--emulator", out / "emulator", "--adapters", out / "adapters.safetensors",
                       "--task", mc, "--data", data_file, "--instruct-examples", "8", "--generate", "2", "--max-new-tokens", "3",
                       "--out", tmp_path / "report", "--no-progress", "--compute-dtype", "fp32")
    table = json.loads((tmp_path / "report" / "report.json").read_text())["models"]
    assert list(table) == ["full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in"]
    # the same held-out rows as tune's report, so the losses agree
    for name in table:
        assert table[name]["instruct"]["loss"] == pytest.approx(report[name]["loss"], abs=1e-4)
        assert set(table[name]["tasks"]["mc"]) >= {"acc", "acc_norm", "acc_bytes"} and 0 <= table[name]["instruct"]["rougeL"] <= 1
    assert "| plug_in |" in result.stdout and (tmp_path / "report" / "report.md").is_file()
    assert len((tmp_path / "report" / "generations-plug_in.jsonl").read_text().splitlines()) == 2

    # comparing emulators: the full model's scores are reused, and only for the same tasks and rows
    again = fed_crash_here("report", "--model", tiny_model_dir, "--emulator", out / "emulator", "--adapters", out / "adapters.safetensors",
                      "--task", mc, "--data", data_file, "--instruct-examples", "8", "--generate", "2", "--max-new-tokens", "3",
                      "--out", tmp_path / "report2", "--full-from", tmp_path / "report" / "report.json", "--no-progress", "--compute-dtype", "fp32")
    def scores(models):
        return {m: {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in {**s["tasks"], "instruct": s["instruct"]}.items()} for m, s in models.items()}

    reused = json.loads((tmp_path / "report2" / "report.json").read_text())["models"]
    assert reused["full_zero_shot"] == table["full_zero_shot"] and scores(reused) == scores(table) and "| plug_in |" in again.stdout
    other = fed_crash_here("report", "--model", tiny_model_dir, "--emulator", out / "emulator", "--adapters", out / "adapters.safetensors",
                      "--task", mc, "--limit", "3", "--out", tmp_path / "report3", "--full-from", tmp_path / "report" / "report.json", check=False)
    assert other.returncode == 2 and "full zero-shot scores cannot be reused" in other.stderr

    single = fed_crash_here("eval", "--emulator", out / "emulator", "--adapters", out / "adapters.safetensors", "--task", mc,
                       "--out", tmp_path / "eval", "--no-progress", "--compute-dtype", "fp32")
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())["tasks"]["mc"]
    assert scores == {**table["emulator_fine_tuned"]["tasks"]["mc"], "seconds": scores["seconds"], "samples_file": "samples-emulator+adapters-mc.jsonl"}
    # per-question records (lm-eval's --log_samples), lm-eval's stderr, and the report's paired intervals read from them
    records = [json.loads(line) for line in (tmp_path / "eval" / scores["samples_file"]).read_text().splitlines()]
    assert len(records) == 6 and sum(r["correct"]["acc"] for r in records) / 6 == scores["acc"] and len(records[0]["lls"]) == 2
    paired = json.loads((tmp_path / "report" / "report.json").read_text())["paired"]["mc"]
    assert set(paired) == {"plug_in - full_zero_shot", "emulator_fine_tuned - emulator_zero_shot"}
    diff = table["plug_in"]["tasks"]["mc"]["acc"] - table["full_zero_shot"]["tasks"]["mc"]["acc"]
    assert paired["plug_in - full_zero_shot"]["acc"]["difference"] == pytest.approx(diff)
    assert "paired bootstrap 95% intervals" in (tmp_path / "report" / "report.md").read_text()
    printed = fed_crash_here("paired", tmp_path / "report" / "samples-plug_in-mc.jsonl", tmp_path / "report" / "samples-full_zero_shot-mc.jsonl").stdout
    assert f"acc: {100 * diff:+.2f} points, 95% interval [" in printed and "over 6 questions" in printed
    other_sample = fed_crash_here("paired", tmp_path / "report" / "samples-plug_in-mc.jsonl", tmp_path / "eval" / "samples-emulator+adapters-mc.jsonl")
    assert other_sample.returncode == 0  # the same six questions: it pairs
    assert "| emulator+adapters |" in single.stdout

    # the landscape from the tuned adapters to the untuned ones: end points are the two plug-ins
    fed_crash_here("landscape", "--model", tiny_model_dir, "--a", out / "adapters.safetensors", "--b", out / "emulator" / "adapters.safetensors",
              "--points", "3", "--data", data_file, "--eval-examples", "8", "--out", tmp_path / "land", "--no-progress")
    curve = json.loads((tmp_path / "land" / "landscape.json").read_text())["curve"]
    assert [p["t"] for p in curve] == [0, 0.5, 1]
    assert curve[0]["loss"] == pytest.approx(report["plug_in"]["loss"], abs=1e-4)
    assert curve[-1]["loss"] == pytest.approx(report["full_zero_shot"]["loss"], abs=1e-4)
    assert (tmp_path / "land" / "landscape.png").read_bytes()[:4] == b"\x89PNG"

    plugged = tmp_path / "plugged"
    fed_crash_here("plugin", "--model", tiny_model_dir, "--adapters", out / "adapters.safetensors", "--out", plugged)
    weights = load_file(plugged / "model.safetensors")
    adapters = load_file(out / "adapters.safetensors")
    assert all((weights[k] == v).all() for k, v in adapters.items())


def test_similarity_writes_a_heatmap_and_clusters(tiny_model_dir, data_file, tmp_path):
    fed_crash("similarity", "--model", tiny_model_dir, "--data", data_file, "--calib-samples", "16", "--keep", "2",
              "--pooling", "last", "--out", tmp_path, "--no-progress")
    assert (tmp_path / "cka.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "clusters.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((tmp_path / "cka.json").read_text())
    assert len(info["cka"]) == 8 and len(info["clusters"]) == 2
    assert info["cka"][3][3] == pytest.approx(1.0, abs=1e-5)


def test_emulator_compare_writes_a_table_and_plot_with_every_method(tiny_model_dir, data_file, tmp_path):
    result = fed_crash("emulator", "compare", "--model", tiny_model_dir, "--data", data_file, "--budgets", "2", "4",
                       "--calib-samples", "8", "--search-samples", "4", "--compare-eval-examples", "8", "--tune-budget", "2",
                       "--steps", "3", "--train-examples", "8", "--out", tmp_path, "--no-progress")
    info = json.loads((tmp_path / "compare.json").read_text())
    rows = {(r["budget"], r["share"], r["method"]): r for r in info["rows"]}
    assert len(rows) == 2 * 2 * 4
    assert rows[(2, True, "uniform")]["depth"] == 8 and rows[(2, False, "uniform")]["depth"] == 2 + 2 + 2
    for (budget, share, method), row in rows.items():
        assert len(row["kept"]) == budget and row["emulator_loss"] > 0
        assert ("plugin_loss" in row) == (budget == 2)
    full = [row for row in rows.values() if row["budget"] == 4]  # every middle layer kept: the full model, after all the tuning
    assert all(row["emulator_loss"] == pytest.approx(info["full_loss"], abs=1e-5) for row in full)
    # search starts from the better of uniform and crash and only goes down from there
    for budget in (2, 4):
        assert rows[(budget, False, "search")]["search_steps"] >= 0
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | off | search |" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["tune", "--model", "/no/such/model", "--out", "x"], "model path '/no/such/model' does not exist"),
    (["emulator", "build", "--keep", "99", "--out", "x"], "cannot keep 99 layers"),
    (["emulator", "compare", "--budgets", "3", "99", "--out", "x"], "cannot keep 99 layers"),
    (["eval", "--task", "arc_eazy", "--out", "x"], "'arc_eazy' is neither a .jsonl file nor one of"),
    (["eval", "--out", "x"], "nothing to evaluate: give --task and/or --instruct-examples"),
    (["eval", "--task", "/no/such.jsonl", "--out", "x"], "multiple-choice file /no/such.jsonl does not exist"),
    (["eval", "--task", "t.jsonl", "--fields", "question={q}", "--out", "x"], "expected KEY=VALUE with KEY in"),
    (["plugin", "--adapters", "/no/a.safetensors", "--out", "x"], "adapter file /no/a.safetensors does not exist"),
])
def test_bad_input_is_one_clear_line(tiny_model_dir, args, message, fed_crash_here, tmp_path):
    """One line naming the problem, no traceback, and nothing written (``--out`` included)."""
    out = tmp_path / "out"
    args = [str(out) if a == "x" else a for a in args]
    if "--model" not in args:
        args = args + ["--model", str(tiny_model_dir)]
    result = fed_crash_here(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_help_explains_every_option():
    text = fed_crash("tune", "--help").stdout
    for flag in ("--method", "--keep-ratio", "--share", "--edge-fill", "--pooling", "--lora-rank", "--steps", "--template"):
        assert flag in text
