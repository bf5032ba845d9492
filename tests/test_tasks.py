"""Task rows ({query, choices, gold} files) as instruction shards: the scorer's tokens, pooling
several files, and the by-task and Dirichlet-over-tasks partitions."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fed_crash.config import FederationConfig
from fed_crash.core.data import IGNORE, DataError, encode_pair, load_instructions, tokenize
from fed_crash.federation.partition import client_shard


def write_task(path, n, offset=0):
    path.write_text("\n".join(json.dumps({"query": f"Question {offset + i}: which is right?\nAnswer:", "choices": ["yes", "no way", "maybe"],
                                          "gold": i % 3}) for i in range(n)))
    return path


def test_task_rows_put_the_loss_on_the_gold_continuation_as_the_scorer_tokenizes_it(tmp_path, tokenizer):
    rows = load_instructions(write_task(tmp_path / "arc.jsonl", 3))
    assert rows[1] == {"instruction": "Question 1: which is right?\nAnswer:", "input": "", "output": "no way", "task": "arc"}
    [example] = tokenize(rows[1:2], tokenizer, max_length=256, template="scorer")
    ctx, cont = encode_pair(tokenizer, rows[1]["instruction"], " no way")  # what score_mc scores for this choice
    assert example.input_ids == ctx + cont and example.labels == [IGNORE] * len(ctx) + cont  # no EOS: the scorer scores none
    [short] = tokenize(rows[1:2], tokenizer, max_length=len(cont) + 2, template="scorer")
    assert short.input_ids == ctx[-2:] + cont  # a long context is cut from the left, as the scorer cuts it
    [alpaca] = tokenize(rows[1:2], tokenizer, max_length=256, template="alpaca")  # the option: an Alpaca-template instruction
    assert tokenizer.decode([t for t, label in zip(alpaca.input_ids, alpaca.labels) if label != IGNORE]).startswith("no way")


def test_a_line_separator_inside_a_string_does_not_split_a_jsonl_row(tmp_path):
    path = tmp_path / "sep.jsonl"  # SciQ's training file holds such characters; str.splitlines() cut its rows in two
    path.write_text(json.dumps({"query": "a\u2028b\x85c", "choices": ["x", "y"], "gold": 1}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_instructions(path) == [{"instruction": "a\u2028b\x85c", "input": "", "output": "y", "task": "sep"}]


def test_pooled_task_files_split_by_task_and_by_dirichlet_over_tasks(tmp_path):
    files = [write_task(tmp_path / f"{name}.jsonl", n, offset) for name, n, offset in (("arc", 40, 0), ("obqa", 20, 100), ("sciq", 30, 200))]
    pool = load_instructions(",".join(map(str, files)))
    assert Counter(r["task"] for r in pool) == {"arc": 40, "obqa": 20, "sciq": 30}
    shards = [client_shard(pool, FederationConfig(partitioner="by-task"), pid, 4) for pid in range(4)]
    tasks = [{r["task"] for r in shard} for shard in shards]
    assert all(len(t) == 1 for t in tasks) and tasks[0] == tasks[3] and len(set.union(*tasks)) == 3  # one task each; 4 clients over 3 tasks
    assert sum(map(len, shards)) == 90 and {len(shards[0]), len(shards[3])} == {20}  # the shared task's rows split evenly
    mixed = [client_shard(pool, FederationConfig(partitioner="dirichlet", partition_by="task", dirichlet_alpha=0.3), pid, 3) for pid in range(3)]
    assert sum(map(len, mixed)) == 90 and all("task" in r for shard in mixed for r in shard)
    with pytest.raises(DataError, match="needs task rows"):
        client_shard([{"instruction": "a", "input": "", "output": "b"}] * 4, FederationConfig(partitioner="by-task"), 0, 2)


def test_a_federated_run_on_task_shards_one_task_per_client(tmp_path, tokenizer, monkeypatch, server_identity):
    from flwr.app import Context, RecordDict

    from alpaca.server_app import main
    from tests.conftest import LocalGrid, write_run_files

    run_files = write_run_files(tmp_path / "files", tokenizer, copies=1)
    files = [write_task(tmp_path / f"{name}.jsonl", 30, offset) for name, offset in (("arc", 0), ("obqa", 100))]
    monkeypatch.setenv("FED_CRASH_NODE_CACHE", str(tmp_path / "nodes"))
    config = {"model": str(run_files / "model"), "data": ",".join(map(str, files)), "template": "scorer", "partitioner": "by-task",
              "results-dir": str(tmp_path / "results"), "run-name": "tasks", "eval-examples": 8, "num-server-rounds": 1,
              "min-available-nodes": 2, "emulator.keep": 2, "emulator.share": False, "train.steps": 1, "save-model": False,
              "mc-task": str(files[0]), "mc-samples": 6}
    main(LocalGrid(2, run_config=config), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    lines = [json.loads(line) for line in (tmp_path / "results" / "tasks" / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["clients"]) for line in lines] == [0, 2] and not lines[1]["failures"] and "plugin_acc" in lines[1]["server"]
