"""The compute dtype (bf16 autocast) and the wire dtype (bf16 on the wire): resolution, exact
restoring of fp32 weights, parity with fp32, and a federated run whose tensors travel as bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fed_crash.config import ConfigError, parse_run_config
from fed_crash.core.data import pad_id, tokenize
from fed_crash.core.emulator import build_emulator
from fed_crash.core.precision import compute_dtype, linear_weights_in
from fed_crash.core.train import evaluate, train_adapters
from fed_crash.federation import protocol as P
from fed_crash.selection import make_spec
from fed_crash.tools.tiny import tiny_gemma3, tiny_llama
from tests.conftest import ROWS, LocalGrid


def test_compute_dtype_follows_the_hardware_unless_forced():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags  # read here independently of fed_crash.core.precision
    assert compute_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype("bf16", "cpu") == torch.bfloat16 and compute_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ConfigError, match="'compute-dtype' must be one of"):
        parse_run_config({"compute-dtype": "fp16"})


def test_linear_weights_are_bf16_inside_the_block_and_the_same_fp32_tensors_after():
    model = tiny_llama(layers=2)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    with linear_weights_in(torch.bfloat16, model, frozen_only=False):
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.float32  # tied to the embedding: the residual stream stays fp32
        assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_bf16_training_on_a_cpu_attends_eagerly_and_every_other_pass_with_the_models_own(tokenizer, monkeypatch, make):
    """Training in bf16 on a CPU uses transformers' eager attention (faster there than torch's
    fused kernel, whose bf16 backward is slow) and computes the same loss as the fused kernel
    (Gemma 3's sliding windows included: an attention that ignores them moves it 35x the tolerance);
    evaluation and multiple-choice scoring keep the model's SDPA, as does fp32 training; every
    pass leaves the model with its own implementation."""
    from fed_crash.config import TrainConfig
    from fed_crash.core import precision
    from fed_crash.evaluation.mc import score_mc

    model = make(layers=4)
    own = model.config._attn_implementation
    assert own == "sdpa"
    emulator = build_emulator(model, make_spec("uniform", 4, bottom=1, top=1, keep=1, share=False))
    start = {k: v.clone() for k, v in emulator.adapter_state().items()}
    seen: list[str] = []
    for m in (model, emulator.model):
        m.model.layers[0].self_attn.register_forward_pre_hook(lambda module, args, m=m: seen.append(m.config._attn_implementation))
    examples = tokenize(ROWS, tokenizer, max_length=256, template="alpaca")
    pad = pad_id(tokenizer)

    def attended(run) -> tuple[set[str], object]:
        seen.clear()
        result = run()
        return set(seen), result

    def first_loss(dtype) -> float:
        emulator.load_adapters(start)
        return train_adapters(emulator, examples, pad, TrainConfig(steps=1, batch_size=2), progress=False, dtype=dtype).first_loss

    used, eager = attended(lambda: first_loss(torch.bfloat16))
    assert used == {"eager"}
    assert attended(lambda: first_loss(torch.float32))[0] == {own}
    monkeypatch.setattr(precision, "CPU_BF16_TRAINING_ATTENTION", own)
    used, fused = attended(lambda: first_loss(torch.bfloat16))
    assert used == {own} and eager == pytest.approx(fused, rel=2e-4)
    for dtype in (torch.bfloat16, torch.float32):
        assert attended(lambda: evaluate(model, examples, pad, progress=False, dtype=dtype))[0] == {own}
        assert attended(lambda: score_mc(model, tokenizer, [{"query": "Q: which?", "choices": ["a", "b c"], "gold": 0}], dtype=dtype))[0] == {own}
    assert model.config._attn_implementation == own and emulator.model.config._attn_implementation == own


def test_bf16_training_and_evaluation_agree_with_fp32_and_keep_fp32_weights(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(layers=6)
    examples = tokenize(ROWS * 3, tokenizer, max_length=256, template="alpaca")
    pad = pad_id(tokenizer)
    fp32, bf16 = (evaluate(model, examples, pad, progress=False, dtype=d)["loss"] for d in (torch.float32, torch.bfloat16))
    assert bf16 == pytest.approx(fp32, rel=0.01) and bf16 != fp32  # bf16 really ran, and stays within 1%
    from fed_crash.config import TrainConfig

    emulator = build_emulator(model, make_spec("uniform", 6, bottom=1, top=1, keep=2, share=False))
    stats = train_adapters(emulator, examples, pad, TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_ratio=0.0), progress=False,
                           dtype=torch.bfloat16)
    assert stats.train_loss < stats.first_loss
    assert all(p.dtype == torch.float32 for p in emulator.model.parameters())  # adapters and frozen middle back in fp32


def test_wire_round_trip_is_exact_in_bf16_and_untouched_in_fp32():
    tensors = {"w": torch.randn(3, 4), "i": torch.arange(3)}
    wired = P.to_wire(tensors, "bf16")
    assert wired["w"].dtype == "uint16" and wired.count_bytes() < P.to_wire(tensors, "fp32").count_bytes()
    back = P.from_wire(wired)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], tensors["w"].to(torch.bfloat16)) and torch.equal(back["i"], tensors["i"])
    assert torch.equal(P.from_wire(P.to_wire(tensors, "fp32"))["w"], tensors["w"])
    assert torch.equal(P.from_wire(P.to_wire(tensors, "auto"))["w"], tensors["w"])  # auto sends adapters as they are
    mixed = {"m": tensors["w"].to(torch.bfloat16), "n": tensors["w"]}  # an auto emulator: bf16 matrices beside fp32 tensors
    back = P.from_wire(P.to_wire(mixed, "fp32"))
    assert back["m"].dtype == torch.bfloat16 and torch.equal(back["m"], mixed["m"]) and torch.equal(back["n"], mixed["n"])
    with pytest.raises(ConfigError, match="wire-dtype 'auto' or 'fp32'"):
        parse_run_config({"dp-clipping-norm": 1.0, "wire-dtype": "bf16"})
    assert parse_run_config({"dp-clipping-norm": 1.0, "wire-dtype": "auto"}).fed.wire_dtype == "auto"


def test_layer_matrices_in_bf16_change_nothing_a_bf16_pass_computes(tokenizer):
    """The ``auto`` wire's claim: rounding the decoder layers' matrices (kept layers and frozen
    copies) to bf16 leaves a bf16 evaluation of the emulator bit for bit the same; rounding the
    embedding too does not (the control that shows the comparison can tell)."""
    from fed_crash.core.emulator import adapter_state, assemble, emulator_state, layer_matrix_keys

    torch.manual_seed(0)
    model = tiny_llama(layers=6)
    spec = make_spec("uniform", 6, bottom=1, top=1, keep=2, share=True)
    weights = emulator_state(model, spec)
    matrices = layer_matrix_keys(model, weights)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    layers = {".".join(k.split(".")[:3]) for k in weights if k.startswith("model.layers.")}
    layers |= {".".join(k.split(".")[:2]) for k in weights if k.startswith("frozen_copy.")}
    assert matrices == {f"{layer}.{name}.weight" for layer in layers for name in names}  # 7 per layer, every kept layer and frozen copy
    assert not any("norm" in k or "embed" in k for k in matrices)
    adapters = adapter_state(model, spec)
    examples = tokenize(ROWS * 2, tokenizer, max_length=256, template="alpaca")

    def loss(rounded: set[str]) -> float:
        state = {k: v.to(torch.bfloat16).float() if k in rounded else v.clone() for k, v in weights.items()}
        emulator = assemble(model.config, {**state, **{k: v.clone() for k, v in adapters.items()}}, spec)
        return evaluate(emulator.model, examples, pad_id(tokenizer), progress=False, dtype=torch.bfloat16)["loss"]

    exact = loss(set())
    assert loss(matrices) == exact
    assert loss(matrices | {"model.embed_tokens.weight"}) != exact


@pytest.fixture
def run_files(tmp_path, tokenizer):
    from tests.conftest import write_run_files

    return write_run_files(tmp_path / "files", tokenizer, copies=2)


def _run(run_files, tmp_path, name: str, wire: str, compute: str = "auto") -> list[dict]:
    from alpaca.server_app import main

    config = {"model": str(run_files / "model"), "data": str(run_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
              "run-name": name, "eval-examples": 8, "max-length": 256, "num-server-rounds": 2, "min-available-nodes": 2,
              "max-client-examples": 8, "emulator.keep": 2, "emulator.share": False, "train.steps": 2, "save-model": False,
              "wire-dtype": wire, "compute-dtype": compute}
    main(LocalGrid(2, run_config=config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return [json.loads(line) for line in (tmp_path / "results" / name / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_bf16_on_the_wire_sends_half_the_bytes_and_trains(run_files, tmp_path, monkeypatch, server_identity):
    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    fp32, bf16 = _run(run_files, tmp_path, "fp32", "fp32"), _run(run_files, tmp_path, "bf16", "bf16")
    assert bf16[1]["bytes_up"] == pytest.approx(fp32[1]["bytes_up"] / 2, rel=0.05)  # the adapters in half the bytes (the metrics are the rest)
    assert [len(line["clients"]) for line in bf16] == [0, 2, 2] and not any(line["failures"] for line in bf16)
    assert bf16[-1]["server"]["plugin_loss"] == pytest.approx(fp32[-1]["server"]["plugin_loss"], rel=0.02)
    weights = load_file(tmp_path / "results" / "bf16" / "emulator" / "emulator.safetensors")
    manifest = json.loads((tmp_path / "results" / "bf16" / "emulator" / "emulator.json").read_text())
    assert {t.dtype for t in weights.values()} == {torch.bfloat16} and manifest["weights_dtype"] == "bf16"
    # the emulator message: the same small files, its tensors in half the bytes (2 per value, not 4), to each of two nodes
    assert fp32[1]["emulator_bytes_down"] - bf16[1]["emulator_bytes_down"] == 2 * sum(2 * t.numel() for t in weights.values())
    stored = [p for p in (tmp_path / "nodes").rglob("emulator.safetensors")]
    assert stored and all({t.dtype for t in load_file(p).values()} <= {torch.bfloat16, torch.float32} for p in stored)
    adapters = load_file(tmp_path / "results" / "bf16" / "adapters" / "final.safetensors")
    assert {t.dtype for t in adapters.values()} == {torch.float32}  # the server aggregates and plugs in fp32


def test_the_auto_wire_sends_bf16_layer_matrices_under_bf16_compute_and_changes_no_result(run_files, tmp_path, monkeypatch, server_identity):
    """``wire-dtype = "auto"`` under bf16 compute: the emulator's layer matrices travel and are
    stored in bf16, the rest and the adapters in fp32, and every loss of the run (clients'
    training, plug-in, emulator) is exactly that of the fp32 wire; under fp32 compute it is the
    fp32 wire."""
    from fed_crash.core.emulator import layer_matrix_keys
    from fed_crash.core.models import load_model

    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    fp32, auto = _run(run_files, tmp_path, "fp32", "fp32", "bf16"), _run(run_files, tmp_path, "auto", "auto", "bf16")
    assert not any(line["failures"] for line in auto) and [len(line["clients"]) for line in auto] == [0, 2, 2]
    assert [line["server"] for line in auto] == [line["server"] for line in fp32]  # bit for bit: plug-in and emulator losses
    def train_losses(lines):
        return [sorted(c["train-loss"] for c in line["clients"]) for line in lines]

    assert train_losses(auto) == train_losses(fp32)  # each client's training too
    folder = tmp_path / "results" / "auto" / "emulator"
    weights, manifest = load_file(folder / "emulator.safetensors"), json.loads((folder / "emulator.json").read_text())
    matrices = layer_matrix_keys(load_model(str(run_files / "model")).model, weights)
    assert manifest["weights_dtype"] == "bf16-matrices" and matrices
    assert {k for k, v in weights.items() if v.dtype == torch.bfloat16} == matrices
    longer_manifest = len((folder / "emulator.json").read_bytes()) - len((tmp_path / "results" / "fp32" / "emulator" / "emulator.json").read_bytes())
    saved = sum(2 * weights[k].numel() for k in matrices) - longer_manifest  # 2 bytes of 4 per matrix value; "bf16-matrices" is not "fp32"
    assert fp32[1]["emulator_bytes_down"] - auto[1]["emulator_bytes_down"] == 2 * saved  # to each of two nodes
    assert auto[1]["bytes_up"] == fp32[1]["bytes_up"]  # the adapters travel in fp32 both ways
    _run(run_files, tmp_path, "auto-fp32", "auto", "fp32")
    assert json.loads((tmp_path / "results" / "auto-fp32" / "emulator" / "emulator.json").read_text())["weights_dtype"] == "fp32"


def test_round_0_is_evaluated_after_round_1_train_messages_left_and_cached_for_the_next_run(run_files, tmp_path, monkeypatch, server_identity,
                                                                                           caplog):
    from alpaca.server_app import main

    from fed_crash.federation.server import RoundEvaluator

    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    seen: list[int] = []
    original = RoundEvaluator.zero_shot_scores

    def spy(self, adapters):
        seen.append(sum(m.metadata.message_type == P.TRAIN for m in grid.sent))  # train messages already sent when round 0 is scored
        return original(self, adapters)

    monkeypatch.setattr(RoundEvaluator, "zero_shot_scores", spy)
    lines = {}
    for name in ("a", "b"):
        config = {"model": str(run_files / "model"), "data": str(run_files / "rows.jsonl"), "results-dir": str(tmp_path / "results"),
                  "run-name": name, "eval-examples": 8, "max-length": 256, "num-server-rounds": 1, "min-available-nodes": 2,
                  "max-client-examples": 8, "emulator.keep": 2, "emulator.share": False, "train.steps": 1, "save-model": False,
                  "cache-dir": str(tmp_path / "cache")}
        grid = LocalGrid(2, run_config=config)
        with caplog.at_level("INFO", logger="fed_crash"):
            main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        lines[name] = [json.loads(line) for line in (tmp_path / "results" / name / "metrics.jsonl").read_text().splitlines()]
    assert seen == [2, 2]  # both nodes sampled (min-train-nodes 2): round 0 was scored after round 1's two messages had left
    assert [line["round"] for line in lines["a"]] == [0, 1]  # and is still the first metrics line
    assert lines["b"][0]["server"] == lines["a"][0]["server"] and len(list((tmp_path / "cache" / "scores").glob("*.json"))) == 1
    assert caplog.text.count("round 0 scores (full model and emulator zero-shot) from the cache") == 1  # the second run read it
