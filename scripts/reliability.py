"""Try the failures a federation meets against the real system and write the table of
docs/reliability.md: what was tried, what happened, the message, and whether anything was lost.

    .venv/bin/python scripts/reliability.py [--doc docs/reliability.md] [--work DIR]

About 12 minutes on 2 idle CPU cores (27 with other jobs running). Every scenario is a real ``flwr run`` (a local SuperLink,
Ray-simulated clients; :func:`fed_crash.tools.launch.flwr_run`) of the test suite's tiny random Llama
on 64 Alpaca-style rows, in a temporary folder (``--work`` keeps it); only the table between the
markers in the doc is rewritten.

* faults: one 4-round FedAdam run of 3 clients with every injected fault (crash, timeout,
  dropout, a garbage update over the norm bound; one round in which every client fails), the
  same run killed (SuperLink, ServerApp and Ray processes, SIGKILL) once round 2 is logged, and
  resumed with ``resume=true``;
* bad updates: one 1-round run per kind of bad update, one client of 3 sending it; and a
  garbage update with no norm bound under FedAvg and under FedMedian;
* bad inputs: each bad key, value, file, spec, client count or checkpoint, started like a user
  starts a run, against a results folder that already holds the runs above;
* attacks (``--only attacks``, the attacks table): one malicious client per run
  (``faults.attack``: a chosen weight, odd metrics, skipped DP clipping, a claim to another
  partition), a robust strategy over too small a sample, DP accounting of a real run, late and
  bad inputs, a resume after a torn metrics line, and a SuperNode of a secure deployment (TLS,
  node authentication, one shard file per node) killed after round 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's tiny model and rows

from fed_crash.config import FaultConfig  # noqa: E402
from fed_crash.errors import FedCrashError  # noqa: E402
from fed_crash.federation.client import OPEN_LOG  # noqa: E402
from fed_crash.federation.faults import KINDS, FaultPlan, find_seed, telling  # noqa: E402
from fed_crash.federation.server import reproducible  # noqa: E402
from fed_crash.tools.launch import FlowerRun, _descendants, _pids_with, flwr_run, free_port, local_deployment  # noqa: E402
from fed_crash.tools.tiny import ROWS, build_tokenizer, tiny_llama  # noqa: E402

log = logging.getLogger("reliability")
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
ATTACK_START, ATTACK_END = "<!-- attacks-table:start -->", "<!-- attacks-table:end -->"
BAD_UPDATES = ("garbage", "nan", "inf", "shape", "dtype", "missing-key", "extra-key")
ERROR = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Fault)): ([^\n]+)")


class Lab:
    """The tiny model, the rows and the results folder every scenario shares."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.results = work / "results"
        self.model = self.tiny_model(work / "model", seed=0)
        rows = [dict(r, instruction=f"{r['instruction']} ({i})") for i, r in enumerate(ROWS * 2)]
        self.data = work / "rows.jsonl"
        self.data.write_text("\n".join(json.dumps(r) for r in rows))
        self.configs: dict[str, dict] = {}
        self.launched = 0
        self.base = {"model": str(self.model), "data": str(self.data), "results-dir": str(self.results), "eval-examples": 8,
                     "max-length": 256, "fraction-train": 1.0, "max-client-examples": 16, "emulator.keep": 2, "emulator.share": False,
                     "train.steps": 4, "train.lr": 0.003, "save-model": False}

    @staticmethod
    def tiny_model(folder: Path, seed: int) -> Path:
        tiny_llama(seed=seed).save_pretrained(folder, safe_serialization=True)
        build_tokenizer().save_pretrained(folder)
        return folder

    def run(self, name: str, supernodes: int = 3, kill_when=None, **overrides: Any) -> tuple[FlowerRun, Path]:
        """A run of the base config with ``overrides``; its full config is kept in :attr:`configs`."""
        config = {**self.base, "run-name": name, "min-available-nodes": supernodes, "min-train-nodes": min(supernodes, 2), **overrides}
        self.configs[name] = config
        return self.launch(config, supernodes, kill_when)

    def launch(self, config: dict, supernodes: int, kill_when=None) -> tuple[FlowerRun, Path]:
        name = config["run-name"]
        start = time.perf_counter()
        self.launched += 1  # every run its own SuperLink state and node caches
        result = flwr_run(config, num_supernodes=supernodes, flwr_home=self.work / "flwr" / str(self.launched), port_base=free_port(),
                          env={"FED_CRASH_NODE_CACHE": str(self.work / "nodes" / str(self.launched))}, timeout=600, kill_when=kill_when)
        log.info("%s: %s in %.0fs", name, result.status, time.perf_counter() - start)
        return result, self.results / name


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_adapters(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def short(text: str, limit: int = 150) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rows_for_faults(lab: Lab) -> list[list[str]]:
    faults = FaultConfig(crash_rate=0.2, timeout_rate=0.1, dropout_rate=0.15, dropout_rounds=2, bad_update_rate=0.2)

    faults = dataclasses.replace(faults, seed=find_seed(faults, 3, 4, telling))
    config = {"num-server-rounds": 4, "strategy": "fedadam", "fedopt-eta": 0.003, "round-timeout": 15.0, "max-update-norm": 50.0,
              **{f"faults.{f.name.replace('_', '-')}": getattr(faults, f.name) for f in dataclasses.fields(faults)}}
    result, a = lab.run("faults", **config)
    lines = metrics(a) if (a / "metrics.jsonl").exists() else []
    complete = result.ok and all((a / f"adapters/round-{r}.safetensors").is_file() for r in range(5)) and (a / "adapters/final.safetensors").is_file()
    kept = "run finished; adapters, metrics and checkpoint of every round written" if complete else f"NO: run {result.status}"
    rates = {"crash": faults.crash_rate, "timeout": faults.timeout_rate, "dropout": faults.dropout_rate, "bad-update": faults.bad_update_rate}
    option = {"crash": "faults.crash-rate", "timeout": "faults.timeout-rate (round-timeout 15 s)", "dropout": "faults.dropout-rate, dropout-rounds 2",
              "bad-update": "faults.bad-update-rate, garbage x100, max-update-norm 50"}
    seen = {"crash": "error", "timeout": "timeout", "dropout": "offline", "bad-update": "rejected"}
    plan = FaultPlan(faults)
    rows = []
    for kind in KINDS:
        hits = [(line, f) for line in lines[1:] for f in line["failures"] if f["kind"] == seen[kind]]
        planned = [(p, r) for p in range(3) for r in range(1, 5) if plan.fault(p, r) == kind]
        if not hits:
            rows.append(["fault", f"{kind} ({option[kind]} {rates[kind]})", "flwr run, 3 clients, 4 rounds", f"NOT SEEN (planned {planned})", "", kept])
            continue
        line, failure = hits[0]
        others = len(line["clients"])
        outcome = (f"round {line['round']}: client {failure['partition']} recorded as `{failure['kind']}` in metrics.jsonl; "
                   + (f"the round aggregated the other {others} client(s)" if line["aggregated"] else "the round kept the previous adapters"))
        rows.append(["fault", f"{kind} ({option[kind]} {rates[kind]}; hit clients/rounds {planned})", "flwr run, 3 clients, 4 rounds",
                     outcome, short(failure["reason"]), kept])
    for line in lines[1:]:
        if not line["clients"]:
            r = line["round"]
            unchanged = same_adapters(a / f"adapters/round-{r - 1}.safetensors", a / f"adapters/round-{r}.safetensors")
            rows.append(["fault", f"every client fails in round {r} ({', '.join(f['kind'] for f in line['failures'])})", "same run",
                         f"previous adapters kept (round {r} = round {r - 1}, bitwise: {'yes' if unchanged else 'NO'}); the run went on",
                         short(line.get("note", "")), kept])

    killed, b = lab.run("killed", kill_when=lambda text: "round 2/4 |" in text, **config)
    at = json.loads((b / "checkpoint.json").read_text())["round"] if (b / "checkpoint.json").exists() else None
    same = at is not None and [reproducible(x) for x in metrics(b)[: at + 1]] == [reproducible(x) for x in lines[: at + 1]]
    rows.append(["determinism", "the same run config and seed again (the run killed below)", "flwr run",
                 f"rounds 0-{at} of metrics.jsonl identical to the first run's (wall-clock times and node ids aside): {'yes' if same else 'NO'}",
                 "", "-"])
    resumed, c = lab.run("killed", **config, resume=True)
    equal = resumed.ok and same_adapters(a / "adapters/final.safetensors", c / "adapters/final.safetensors")
    rows.append(["resume", "server killed (SuperLink, ServerApp, Ray: SIGKILL) once round 2 of 4 is logged, then the same command with resume=true",
                 "flwr run x2", f"killed after round {at} ({killed.status}); resumed run {resumed.status}; final adapters equal the "
                 f"uninterrupted run's, bitwise: {'yes' if equal else 'NO'}", "", "yes: continues from checkpoint.json" if equal else "NO"])
    return rows


def rows_for_bad_updates(lab: Lab) -> list[list[str]]:
    rows = []
    one_bad = FaultConfig(bad_update_rate=0.3)
    seed = find_seed(one_bad, 3, 1, lambda t: [t[p, 1] for p in range(3)].count("bad-update") == 1 and None in {t[p, 1] for p in range(3)})
    for kind in BAD_UPDATES:
        result, run = lab.run(f"bad-{kind}", **{"num-server-rounds": 1, "max-update-norm": 50.0, "faults.bad-update-rate": 0.3,
                                                 "faults.seed": seed, "faults.bad-update": kind})
        line = metrics(run)[1] if result.ok else None
        rejected = [f for f in line["failures"] if f["kind"] == "rejected"] if line else []
        outcome = (f"rejected before aggregation; the round aggregated the other {len(line['clients'])} client(s)" if rejected
                   else f"NOT REJECTED ({result.status})")
        rows.append(["bad update", f"{kind} (faults.bad-update, 1 client of 3)", "flwr run, fedavg, max-update-norm 50", outcome,
                     short(rejected[0]["reason"]) if rejected else "", "run finished" if result.ok else "NO"])
    for strategy in ("fedavg", "fedmedian"):
        result, run = lab.run(f"byzantine-{strategy}", **{"num-server-rounds": 1, "strategy": strategy, "faults.bad-update-rate": 0.3,
                                                           "faults.seed": seed, "faults.bad-update": "garbage"})
        lines = metrics(run) if result.ok else []
        outcome = (f"aggregated ({len(lines[1]['clients'])} clients); plug-in loss {lines[0]['server']['plugin_loss']:.3f} -> "
                   f"{lines[1]['server']['plugin_loss']:.3f}" if lines else f"failed: {result.status}")
        rows.append(["bad update", f"garbage x100 from 1 client of 3, no norm bound, {strategy}", "flwr run", outcome,
                     "", "run finished" if result.ok else "NO"])
    return rows


def rows_for_bad_inputs(lab: Lab) -> list[list[str]]:
    bad = lab.work / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(ROWS[0]), json.dumps(ROWS[1]), json.dumps({"instruction": "no output"})]))
    # a finished 1-round run whose model folder is then overwritten with other weights
    moved = lab.tiny_model(lab.work / "model-later-replaced", seed=0)
    lab.run("other-model", supernodes=2, **{"num-server-rounds": 1, "model": str(moved)})
    lab.tiny_model(moved, seed=1)
    new = {**lab.base, "run-name": "bad-input", "min-available-nodes": 2, "min-train-nodes": 2}
    cases = [  # (case, what is shown as tried, run config, clients)
        ("unknown key", "emulator.keep-ration=0.5", {**new, "emulator.keep-ration": 0.5}, 2),
        ("key outside its section", "keep-ratio=0.5", {**new, "keep-ratio": 0.5}, 2),
        ("wrong type", "train.lr='fast'", {**new, "train.lr": "fast"}, 2),
        ("value out of range", "faults.crash-rate=1.5", {**new, "faults.crash-rate": 1.5}, 2),
        ("missing data file", "data=<work>/no-such.jsonl", {**new, "data": str(lab.work / "no-such.jsonl")}, 2),
        ("missing model", "model=<work>/no-such-model", {**new, "model": str(lab.work / "no-such-model")}, 2),
        ("missing multiple-choice file", "mc-task=<work>/no-such-mc.jsonl", {**new, "mc-task": str(lab.work / "no-such-mc.jsonl")}, 2),
        ("malformed data row", "data=<work>/bad.jsonl (row 2 has no output)", {**new, "data": str(bad)}, 2),
        ("more clients than examples", "60 clients, 56 client rows", {**new, "min-available-nodes": 60}, 60),
        ("emulator spec that does not fit", "emulator.keep=99 (4 middle layers)", {**new, "emulator.keep": 99}, 2),
        ("emulator that keeps every middle layer (the full model)", "emulator.keep=4", {**new, "emulator.keep": 4}, 2),
        ("run-name of an existing run", "run-name='faults'", {**new, "run-name": "faults"}, 2),
        ("resume without a checkpoint", "resume=true run-name='never-ran'", {**new, "run-name": "never-ran", "resume": True}, 2),
        ("resume with another setting", "resume=true, the run's config but train.lr=0.01", {**lab.configs["bad-nan"], "resume": True, "train.lr": 0.01}, 3),
        ("resume after the model folder changed (adapters of another model)", "resume=true, same config, other weights in the model folder",
         {**lab.configs["other-model"], "resume": True, "num-server-rounds": 2}, 2),
    ]
    rows = []
    for case, tried, config, supernodes in cases:
        before = snapshot(lab.results)
        try:
            result, _ = lab.launch(config, supernodes)
        except FedCrashError as err:
            happened, message = "refused by the launcher: flwr run not started", f"{type(err).__name__}: {err}"
        else:
            found = ERROR.findall(result.output + "\n" + result.details)
            ours = [m for m in found if m[0] in ("ConfigError", "DataError", "ModelError", "SpecError", "ArtifactError", "PrivacyError", "AdapterError")]
            happened = f"run {result.status} before any training" if "round 1/" not in result.output else f"NO: training started ({result.status})"
            message = f"{ours[-1][0]}: {ours[-1][1]}" if ours else f"(no fed-crash error found) {result.details}"
        unchanged = snapshot(lab.results) == before
        rows.append(["bad input", f"{case}: `{tried}`", "flwr run" if supernodes == 2 else f"flwr run, {supernodes} clients", happened,
                     short(message.replace(str(lab.work), "<work>"), 200), "yes: results/ unchanged" if unchanged else "NO: results/ changed"])
    return rows


# Attacks of docs/reliability.md's attacks table: (finding, tried, run-config overrides, clients, what the code at
# 1b4bed6 did, measured in-process where marked (the script in docs/reliability.md) or read from the code).
ATTACKS = [
    ("5 weight", "a client claims num-examples = 1e300", {"faults.attack": "weight-huge"}, 3,
     "aggregated: the attacker took all the weight, the mean was its update (measured)"),
    ("3 DP weight", "under DP a client claims unit-weight = 1e-9", {"faults.attack": "weight-tiny", **{"dp-clipping-norm": 1.0}}, 3,
     "aggregated: the mean was the other two's, the noise calibrated to three (measured)"),
    ("3 DP clipping", "under DP a client skips the clipping mod (update far above the clip)", {"faults.attack": "skip-clipping", "dp-clipping-norm": 0.01}, 3,
     "aggregated unclipped: its update moved the mean by more than the noise was calibrated to (read)"),
    ("4 metrics", "a reply with an extra metric `partition`", {"faults.attack": "extra-metric"}, 3,
     "rejected by name (unknown metric), since #15 (read)"),
    ("4 metrics", "a reply without `train-loss`", {"faults.attack": "missing-metric"}, 3,
     "the server raised InconsistentMessageReplies: the run failed (measured)"),
    ("4 metrics", "a reply whose `train-loss` is a list", {"faults.attack": "list-metric"}, 3, "rejected by name, since #15 (read)"),
    ("7 identity", "a node claims its neighbour's partition (min-available-nodes 1)", {"faults.attack": "claim-partition", "min-available-nodes": 1}, 3,
     "both trained one shard, the attacker's own was never trained (measured)"),
    ("7 identity", "a node says there are 5 more partitions (min-available-nodes 1)", {"faults.attack": "num-partitions", "min-available-nodes": 1}, 3,
     "the server took the largest count: 8 partitions over 3 nodes (measured)"),
    ("8 hang", "two nodes claim one partition, the run needs all 3 (min-available-nodes 3), node-timeout 10",
     {"faults.attack": "claim-partition", "node-timeout": 10.0}, 3,
     "Flower's sampler waited for a third node without end (measured: this run hung until the script's 600 s limit)"),
    ("6 robust", "fedmedian over a sample of 2", {"strategy": "fedmedian"}, 2, "ran: the median of two updates is their mean (read)"),
]


def rows_for_attacks(lab: Lab) -> list[list[str]]:
    """Each attack against a real 1-round run of 3 clients (partition 0 the attacker), against a
    results folder holding the runs of the other tables."""
    rows = []
    for i, (finding, tried, overrides, clients, before) in enumerate(ATTACKS):
        snap = snapshot(lab.results)
        result, run = lab.run(f"attack-{i}", supernodes=clients, **{"num-server-rounds": 1, "min-train-nodes": 1, **overrides})
        lines = metrics(run) if (run / "metrics.jsonl").is_file() else []
        if result.ok and lines:
            line = lines[1]
            failures = [f for f in line["failures"] if f["partition"] in (0, 1) or f["kind"] == "excluded"]
            clients_line = {c["partition"]: c for c in line["clients"]}
            if overrides.get("faults.attack") == "skip-clipping":
                norm = clients_line.get(0, {}).get("received-norm")
                after = (f"its update arrived with norm {norm:.3g} (clip 0.01); the server clipped it to 0.01 before the mean; "
                         f"{'released' if line['aggregated'] else 'no release'}") if norm else "attacker rejected"
                message = ""
            else:
                outcome = ", ".join(f"client {f['partition']} {f['kind']}" for f in failures) or "nothing rejected"
                released = f"aggregated {len(line['clients'])} client(s)" if line["aggregated"] else "no release: previous adapters kept"
                after = f"{outcome}; {released}"
                message = failures[0]["reason"] if failures else ""
        else:
            after, message = f"stopped: {result.status}", (ERROR.search(result.output or "") or ["", ""])[0]
        lost = "yes: results/ unchanged" if {k: v for k, v in snapshot(lab.results).items() if k in snap} == snap else "NO"
        rows.append([finding, tried, f"flwr run, {clients} clients", before, after, short(message), lost])
    return rows + rows_for_careless_use(lab) + rows_for_a_lost_node(lab) + rows_for_a_changed_emulator(lab)


def rows_for_a_changed_emulator(lab: Lab) -> list[list[str]]:
    """Two runs on one loopback deployment (the SuperNodes, their ids and caches persist): the
    model owner changes the tokenizer's config between them, the weights stay the same."""
    home, cache = lab.work / "flwr-files", lab.work / "nodes-files"
    model = lab.tiny_model(lab.work / "model-files", seed=0)
    config = {**lab.base, "model": str(model), "num-server-rounds": 1, "min-available-nodes": 2, "min-train-nodes": 2}
    with local_deployment(home, num_supernodes=2, port=free_port(), env={"FED_CRASH_NODE_CACHE": str(cache)}) as connection:
        first = flwr_run({**config, "run-name": "files-a"}, flwr_home=home, connection=connection, timeout=600)
        tokenizer_config = model / "tokenizer_config.json"
        tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 321}))
        second = flwr_run({**config, "run-name": "files-b"}, flwr_home=home, connection=connection, timeout=600)
    manifests = [json.loads((lab.results / name / "emulator" / "emulator.json").read_text()) for name in ("files-a", "files-b")]
    same_weights = manifests[0]["weights_sha256"] == manifests[1]["weights_sha256"]
    stored = {node.name: [json.loads((f / "tokenizer_config.json").read_text()).get("model_max_length") for f in sorted(node.iterdir())]
              for node in sorted(cache.glob("node-*"))}
    ok = first.ok and second.ok and same_weights and len(stored) == 2 and all(len(v) == 2 and 321 in v for v in stored.values())
    after = (f"both runs {second.status}; same weights: {'yes' if same_weights else 'no'}; each node stored the second emulator apart "
             f"(model_max_length of its cached emulators: {stored}) and trained on it" if ok else f"NOT stored apart: {stored} ({second.status})")
    return [["11 emulator files", "the model owner changes the tokenizer's config between two runs, weights unchanged; one deployment, "
             "its SuperNodes' caches kept", "deployment x2 runs",
             "the cache was keyed by the weights' hash: the second run's nodes found the first run's folder and trained with its old "
             "tokenizer files (read)", after, "", "yes" if ok else "NO"]]


def rows_for_a_lost_node(lab: Lab) -> list[list[str]]:
    """A secure loopback deployment (TLS, node authentication, one shard file per node) of two
    SuperNodes, three rounds; SuperNode 1 and its processes are killed (SIGKILL) once round 1
    is logged. Every wait is bounded: the run must end, with the lost node recorded."""
    import signal
    import threading

    from fed_crash.config import parse_run_config
    from fed_crash.federation.shards import write_split

    name, home, port = "lost-node", lab.work / "flwr-deployment", free_port()
    config = {**lab.base, "run-name": name, "num-server-rounds": 3, "min-available-nodes": 1, "min-train-nodes": 1,
              "round-timeout": 20.0, "node-timeout": 30.0}
    split = write_split(parse_run_config(config), 2, lab.work / "split").parent
    run_dir, killed = lab.results / name, []

    def kill_node_after_round_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
            if len(lines) >= 2:  # rounds 0 and 1
                node = _pids_with(f"--port {port + 11} ")  # SuperNode 1's own port
                for pid in node + _descendants(node):
                    os.kill(pid, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=kill_node_after_round_1, daemon=True)
    start = time.monotonic()
    opens = lab.work / "opens.log"
    owners = []
    for i in range(2):  # each data owner's machine holds its own shard file, and nothing else of the data
        (lab.work / f"owner-{i}").mkdir(exist_ok=True)
        owners.append((split / f"shard-{i}.jsonl").rename(lab.work / f"owner-{i}" / f"shard-{i}.jsonl"))
    with local_deployment(home, num_supernodes=2, port=port, env={"FED_CRASH_NODE_CACHE": str(lab.work / "nodes-deployment"), OPEN_LOG: str(opens)},
                          secure=True, unregistered=1, shard_files=owners) as connection:
        watcher.start()
        result = flwr_run({**config, "shards": str(split)}, flwr_home=home, connection=connection, timeout=900)
    wall = time.monotonic() - start
    lines = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    rounds = "; ".join(f"round {line['round']}: {len(line['clients'])} trained" + "".join(f", client {f['partition']} {f['kind']}" for f in line["failures"])
                       for line in lines[1:])
    after = (f"node killed {killed[0] - start:.0f}s into the run; {rounds}; {result.status} after {wall:.0f}s" if killed
             else f"NOT killed ({result.status})")
    message = next((f["reason"] for line in lines for f in line["failures"]), "") or (ERROR.search(result.output or "") or ["", ""])[0]
    refused = "Failed to activate SuperNode" in (home / "deployment-logs" / "supernode-unregistered-0.log").read_text()
    opened: dict[str, set[str]] = {}  # client process -> data files it opened (not the emulator's, not installed packages')
    for pid, path in (line.split(" ", 1) for line in (opens.read_text().splitlines() if opens.is_file() else [])):
        if not path.startswith((str(lab.work / "nodes-deployment"), sys.prefix, str(home))):
            opened.setdefault(pid, set()).add(path)
    own_only = opened and all(len(paths) == 1 for paths in opened.values()) and set().union(*opened.values()) == {str(f) for f in owners}
    return [
        ["8 lost node", "SuperNode 1 of 2 killed (SIGKILL) after round 1 of 3; secure deployment, one shard file per node, "
         "round-timeout 20, node-timeout 30, min-available-nodes 1", "deployment (TLS, node auth)",
         "not run; a node that never answered was asked again every round, each time waiting up to max(round-timeout, 600 s) (read)",
         after, short(message), "yes" if result.ok else "NO"],
        ["9 TLS, node auth", "a third SuperNode with a key nobody registered joins the same deployment", "deployment (TLS, node auth)",
         "only --insecure existed: any process reaching the port joined (read)",
         "refused: 'Failed to activate SuperNode'; the run trained on the two registered nodes" if refused else "NOT refused", "", "yes"],
        ["10 shard files", "every data file each client process of the same deployment opens (FED_CRASH_OPEN_LOG)", "deployment",
         "every node read the whole data file, the server's evaluation and calibration rows included (read)",
         (f"{len(opened)} client processes, each opened its own shard file and no other data file; the run config's data was never read"
          if own_only else f"NOT only its own: {opened}"), "", "yes"],
    ]


def rows_for_careless_use(lab: Lab) -> list[list[str]]:
    """DP accounting of a real run, late and bad inputs, and a resume after a torn metrics line."""
    from dp_accounting import dp_event, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    from strategies.dp import epsilon_spent

    rows = []
    result, run = lab.run("dp", **{"num-server-rounds": 2, "dp-clipping-norm": 1.0, "dp-noise-multiplier": 1.0, "fraction-train": 1.0})
    reported = metrics(run)[-1]["privacy"]["epsilon"] if result.ok else float("nan")
    old = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    old.compose(dp_event.SampledWithoutReplacementDpEvent(3, 3, dp_event.GaussianDpEvent(1.0)), 2)  # what 1b4bed6 composed
    rows.append(["2 epsilon", "a DP run, 3 of 3 clients, sigma 1, 2 rounds, delta 1e-5", "flwr run, 3 clients",
                 f"reported epsilon {old.get_epsilon(1e-5):.2f} (noise taken as sigma, not sigma/2, times the sensitivity 2C/m)",
                 f"reported epsilon {reported:.2f} (the bound at sigma/2: {epsilon_spent([(3, 3)] * 2, 1.0, 1e-5):.2f})", "", "yes"])

    # the noise: clipped to 1e-6, the mean of 3 updates is far below the noise (std 1e-6/3 per weight, thousands of
    # weights), so what round 1 moved the adapters by is the noise; a node regenerates NumPy's draws from the run's seed
    result, run = lab.run("dp-noise", **{"num-server-rounds": 1, "dp-clipping-norm": 1e-6, "dp-noise-multiplier": 1.0, "fraction-train": 1.0})
    start, released = load_file(run / "adapters/round-0.safetensors"), load_file(run / "adapters/round-1.safetensors")
    noise = torch.cat([(released[k] - start[k]).flatten() for k in start]).double().numpy()
    np.random.seed(lab.configs["dp-noise"].get("seed", 0))
    guess = np.concatenate([np.random.normal(0.0, 1e-6 / 3, start[k].numel()) for k in start])
    corr = float(np.corrcoef(noise, guess)[0, 1])
    rows.append(["1 noise", "a node regenerates the DP noise from the run's seed (NumPy's global generator, as Flower draws it) "
                 "and correlates it with what round 1 added", "flwr run, 3 clients, clip 1e-6",
                 "correlation 1.0: the guess was the noise (measured in-process)",
                 f"correlation {corr:+.3f} over {noise.size} weights; the noise's std {noise.std():.3g} (sigma C / m = {1e-6 / 3:.3g})", "", "yes"])

    snap = snapshot(lab.results)
    outcomes = []
    for _ in range(2):
        result, run = lab.run("late-failure", **{"num-server-rounds": 1, "max-length": 8})
        outcomes.append(f"{result.status}, folder {'left' if run.exists() else 'removed'}")
    message = (ERROR.search(result.output) or ["", ""])[0]
    lost = "yes: results/ unchanged" if snapshot(lab.results) == snap else "NO"
    rows.append(["12/13 late failure", "max-length 8 (below every prompt), started twice with one run-name", "flwr run x2",
                 "the evaluation's loss read 0 over no token; a start that failed after writing left a folder that blocked a retry (read)",
                 "; ".join(outcomes), short(message), lost])
    try:
        lab.run("nan", **{"train.lr": float("nan")})
        after, message = "NOT refused", ""
    except FedCrashError as err:
        after, message = "refused by the launcher: flwr run not started", f"{type(err).__name__}: {err}"
    rows.append(["13 NaN", "train.lr = nan", "flwr run", "accepted (read)", after, short(message),
                 "yes: results/ unchanged" if snapshot(lab.results) == snap else "NO"])

    result, run = lab.run("torn", **{"num-server-rounds": 1})
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "server": {"plugin_lo')  # a crash mid-write
    result, run = lab.run("torn", **{"num-server-rounds": 2, "resume": True})
    rows.append(["14 torn line", "a run's metrics.jsonl ends in a half-written line; resume=true", "flwr run x2",
                 "the resume failed on the line's JSON (read)", f"resumed: {result.status}, rounds {[l['round'] for l in metrics(run)]}" if result.ok else f"NOT resumed: {result.status}",
                 "", "yes" if result.ok else "NO"])
    return rows


def table(rows: list[list[str]], head: tuple[str, ...] = ("kind", "tried", "how", "what happened", "message (excerpt)", "nothing lost")) -> str:
    head = ["#", *head]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join([str(i), *row]) + " |" for i, row in enumerate(rows, 1)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"), help="markdown file whose table (between the markers) is rewritten")
    parser.add_argument("--work", default="", help="keep the runs in this folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--only", choices=("faults", "attacks"), default=None, help="run one table (default: both)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fed_crash").setLevel(logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="fed-crash-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        lab = Lab(work)
        tables = {}
        if args.only in (None, "faults"):
            tables[(START, END)] = (rows_for_faults(lab) + rows_for_bad_updates(lab) + rows_for_bad_inputs(lab), ())
        if args.only in (None, "attacks"):
            tables[(ATTACK_START, ATTACK_END)] = (rows_for_attacks(lab), ("finding", "tried", "how", "before (code at 1b4bed6)", "after", "message (excerpt)", "nothing lost"))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    doc = Path(args.doc)
    text = doc.read_text()
    failed = 0
    for (start_marker, end_marker), (rows, head) in tables.items():
        if start_marker not in text or end_marker not in text:
            raise SystemExit(f"{doc} lacks the markers {start_marker} ... {end_marker}")
        command = "scripts/reliability.py" + (f" --only {args.only}" if args.only else "")
        generated = (f"{start_marker}\nProduced by `.venv/bin/python {command}` on {date.today()} ({minutes:.0f} min on this machine).\n\n"
                     f"{table(rows, *([head] if head else []))}\n{end_marker}")
        text = text[: text.index(start_marker)] + generated + text[text.index(end_marker) + len(end_marker):]
        failed += sum("NO" in row[3].split() or row[-1].startswith("NO") or "NOT" in row[3] for row in rows)
    doc.write_text(text)
    log.info("%d table(s), %d scenario(s) not handled, in %.0f min: %s", len(tables), failed, minutes, doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
