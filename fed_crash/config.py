"""The config schema: dataclasses whose fields carry their help text.

The same dataclasses feed the CLI (one ``--flag`` per field, help from the field) and flat
key/value configs such as Flower's run config (:func:`from_mapping`, which rejects unknown
keys and wrong types by name), so an option is defined once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping
from .data import DEFAULT_HUB_DATASET
from .errors import FedCrashError


class ConfigError(FedCrashError):
    """An unknown key or a value of the wrong type; the message names the key."""


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    data: str = opt(DEFAULT_HUB_DATASET, "Alpaca-format instruction data: a local .json/.jsonl file or a hub dataset name")
    template: str = opt("alpaca", "prompt template: 'alpaca' or the model's 'chat' template", choices=("alpaca", "chat"))
    max_length: int = opt(256, "truncate each example to this many tokens")
    skip_malformed: bool = opt(False, "skip and count malformed rows instead of failing on the first one")
    seed: int = opt(0, "seed of the shuffle that splits data into held-out, calibration and training slices")


@dataclass
class EmulatorConfig:
    method: str = opt("uniform", "how to choose the kept middle layers: 'uniform' (OFT) or 'crash' (CKA clusters)", choices=("uniform", "crash"))
    bottom: int = opt(2, "adapter layers at the bottom (trained by data owners)")
    top: int = opt(2, "adapter layers at the top (trained by data owners)")
    keep: int = opt(0, "middle layers to keep; 0 means use --keep-ratio")
    keep_ratio: float = opt(0.4, "fraction of the middle span to keep when --keep is 0 (0.4: 10 of 26 for a 30-layer model)")
    share: bool = opt(True, "fill removed positions with the nearest kept layer (tied), keeping full depth")
    edge_fill: str = opt("nearest", "fill removed positions next to an adapter with the 'nearest' kept layer or a frozen copy of the 'adapter'", choices=("nearest", "adapter"))
    calib_samples: int = opt(512, "calibration samples for CRaSh's CKA (formatted like training data)")
    pooling: str = opt("mean", "how a layer's token states become one vector per sample", choices=("mean", "last", "weighted"))
    skip_first: int = opt(0, "leave the first N tokens out of pooling (1 removes the attention-sink token)")
    calib_batch_size: int = opt(8, "batch size of the calibration forward passes")


@dataclass
class TrainConfig:
    steps: int = opt(200, "optimizer steps; 0 means --epochs passes over the training data")
    epochs: float = opt(1.0, "passes over the training data when --steps is 0")
    batch_size: int = opt(4, "training batch size")
    lr: float = opt(1e-4, "peak AdamW learning rate (cosine schedule)")
    warmup_ratio: float = opt(0.05, "fraction of steps with linear warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the gradient norm to this value (0: off)")
    lora_rank: int = opt(0, "LoRA rank on the adapter layers through peft (0: train the adapters fully)")
    lora_alpha: int = opt(16, "LoRA alpha")
    seed: int = opt(0, "seed of the batch order and any dropout")


@dataclass
class TuneSizes:
    train_examples: int = opt(2000, "training examples (the data owner's data)")
    eval_examples: int = opt(200, "held-out examples for the four-model report")
    eval_batch_size: int = opt(8, "batch size of held-out evaluation")


@dataclass
class EvalConfig:
    limit: int = opt(0, "questions per multiple-choice task (0: all)")
    first: bool = opt(False, "take the first --limit questions (like lm-eval's --limit) instead of a seeded sample")
    fields: str = opt("", "field mapping for --task files not in the {query, choices, gold} layout: 'query=Q: {q}\\nA:;choices=options;gold=answer;labels=letters'")
    batch_size: int = opt(32, "continuations (multiple choice) or examples (loss, generation) per forward pass")
    instruct_examples: int = opt(0, "held-out instructions from --data for loss/perplexity: the first slice of its seeded split, as 'tune' holds out (0: none)")
    generate: int = opt(0, "answer this many of them greedily, write generations.jsonl next to the references, and score ROUGE-L (0: none)")
    max_new_tokens: int = opt(64, "longest greedy answer, in tokens")


@dataclass
class FederationConfig:
    model: str = opt("smollm2", "central model: 'smollm2' (embedded), a local folder/file, or a hub name")
    cache_dir: str = opt("", "model cache folder ('' = $FED_CRASH_CACHE or ~/.cache/fed-crash)")
    num_server_rounds: int = opt(3, "federated rounds")
    strategy: str = opt("fedavg", "aggregation strategy, by name from the strategies package: fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum")
    proximal_mu: float = opt(0.01, "FedProx: clients add (mu/2) * ||adapters - round-start adapters||^2 to their loss")
    fedbiot_lambda: float = opt(0.0, "FedBiOT-style regulariser (any strategy): clients add lambda * ||adapters - round-start adapters||^2 to their loss (0 = off)")
    fedbiot_align_steps: int = opt(0, "FedBiOT server alignment: after each round (and before the first) distil the emulator's middle toward the full model's on the server's public rows for this many steps, then resend the emulator (0 = off)")
    fedbiot_align_lr: float = opt(1e-5, "FedBiOT server alignment: AdamW learning rate of the emulator's middle layers")
    server_lr: float = opt(1.0, "FedAvgM: server learning rate on the averaged update (1.0 with momentum 0 is plain FedAvg)")
    server_momentum: float = opt(0.9, "FedAvgM: server momentum")
    fedopt_eta: float = opt(1e-3, "FedAdam/FedYogi/FedAdagrad: server learning rate; each adapter weight moves about this much per round, so keep it near lr * local steps")
    fedopt_beta1: float = opt(0.9, "FedAdam/FedYogi: first-moment decay of the server optimizer")
    fedopt_beta2: float = opt(0.99, "FedAdam/FedYogi: second-moment decay of the server optimizer")
    fedopt_tau: float = opt(1e-6, "FedAdam/FedYogi/FedAdagrad: adaptivity (epsilon); must stay well below the size of a round's adapter update")
    trimmed_beta: float = opt(0.2, "FedTrimmedAvg: fraction of the lowest and of the highest values cut per weight, in [0, 0.5)")
    krum_malicious: int = opt(0, "Krum: number of malicious nodes assumed")
    dp_clipping_norm: float = opt(0.0, "differential privacy: clients clip their adapter update to this L2 norm and the server adds Gaussian noise to the mean (0 = off; fedavg or fedprox only)")
    dp_noise_multiplier: float = opt(1.0, "differential privacy: noise standard deviation as a multiple of the clipping norm (divided by the sampled clients)")
    dp_delta: float = opt(1e-5, "differential privacy: the delta at which the spent epsilon is reported each round")
    fraction_train: float = opt(1.0, "fraction of connected nodes sampled for training each round")
    min_train_nodes: int = opt(2, "sample at least this many nodes each round")
    min_available_nodes: int = opt(2, "wait until this many nodes are connected before a round starts")
    round_timeout: float = opt(3600.0, "seconds to wait for replies in a round")
    partitioner: str = opt("iid", "how client shards are drawn: 'iid', 'dirichlet' or 'pathological'", choices=("iid", "dirichlet", "pathological"))
    partition_by: str = opt("first-word", "derived label for non-IID splits: the instruction's 'first-word' (its verb, top 16 else 'other') or the response 'length' bucket (quartiles)", choices=("first-word", "length"))
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration (smaller = more skewed label mix per client)")
    classes_per_partition: int = opt(2, "labels per client for the pathological partitioner")
    max_client_examples: int = opt(0, "cap on each client's shard (0 = the whole shard)")
    eval_examples: int = opt(64, "server-held held-out examples for the per-round plug-in loss")
    calib_data: str = opt("", "public instruction data for CRaSh calibration ('' = a server-held slice of 'data' that clients never get)")
    eval_batch_size: int = opt(8, "batch size of server-side evaluation")
    mc_task: str = opt("", "multiple-choice task for per-round plug-in accuracy: a {query, choices, gold} JSONL or a hub task name such as 'arc_easy' ('' = off)")
    mc_samples: int = opt(50, "questions sampled from mc-task for per-round accuracy")
    run_name: str = opt("", "results/<run-name>/ ('' = <method>-<strategy>-<timestamp>)")
    results_dir: str = opt("results", "folder that holds one sub-folder per run")
    save_model: bool = opt(True, "save the final plug-in model (safetensors) in the run folder")
    progress: bool = opt(False, "progress bars in server and client logs")


@dataclass
class ExperimentConfig:
    """The ``[experiment]`` table of an experiment file (see :mod:`fed_crash.experiment`)."""

    name: str = opt("", "the experiment's name: results go to <results-dir>/<name>/ ('' = the file's stem)")
    results_dir: str = opt("results", "folder that holds one sub-folder per experiment")
    num_supernodes: int = opt(4, "simulated clients in every cell")
    cpus_per_client: int = opt(1, "CPU cores Ray reserves per client actor")
    gpus_per_client: float = opt(0.0, "GPU share per client actor")
    timeout: float = opt(3600.0, "seconds one cell may take before it is stopped and counted as failed")


@dataclass
class RunConfig:
    """A federated run's whole configuration, parsed from a flat Flower run config: top-level
    keys are federation and data options, ``emulator.*`` and ``train.*`` (local training) are
    sections."""

    fed: FederationConfig
    data: DataConfig
    emulator: EmulatorConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"fed": to_dict(self.fed), "data": to_dict(self.data), "emulator": to_dict(self.emulator), "train": to_dict(self.train)}


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """Split a flat run config into its sections, each checked by :func:`from_mapping`."""
    top_fields = {f.name for f in dataclasses.fields(FederationConfig)}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    parts: dict[str, dict[str, Any]] = {"fed": {}, "data": {}, "emulator": {}, "train": {}}
    for key, value in values.items():
        section, dot, name = key.partition(".")
        if dot:
            if section not in ("emulator", "train"):
                raise ConfigError(f"run config: unknown section {section!r} in key {key!r}; sections are 'emulator' and 'train'")
            parts[section][name] = value
        elif key.replace("-", "_") in data_fields:
            parts["data"][key] = value
        elif key.replace("-", "_") in top_fields:
            parts["fed"][key] = value
        else:
            known = [n.replace("_", "-") for n in sorted(top_fields | data_fields)]
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"run config: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    cfg = RunConfig(
        from_mapping(FederationConfig, parts["fed"], where="run config"),
        from_mapping(DataConfig, parts["data"], where="run config"),
        from_mapping(EmulatorConfig, parts["emulator"], where="run config [emulator]"),
        from_mapping(TrainConfig, parts["train"], where="run config [train]"),
    )
    if cfg.train.lora_rank > 0 and (cfg.fed.fedbiot_lambda > 0 or (cfg.fed.strategy.lower() == "fedprox" and cfg.fed.proximal_mu > 0)):
        # with LoRA the adapter weights are frozen and the term would be a constant: no effect
        raise ConfigError("run config: proximal terms (fedprox's proximal-mu, fedbiot-lambda) need full adapter training (train.lora-rank = 0)")
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


def from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def from_mapping(cls: type, values: Mapping[str, Any], *, where: str = "config") -> Any:
    """Build ``cls`` from a flat mapping, rejecting unknown keys (with a suggestion), values of
    the wrong type and values outside the field's choices, each by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        f = fields[name]
        tp = _base_type(f.type)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ConfigError(f"{where}: {key!r} must be one of {list(f.metadata['choices'])}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)

