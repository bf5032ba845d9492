"""Instruction data: Alpaca-format rows in, padded token batches with response-only labels out."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from fed_crash.errors import FedCrashError
from fed_crash.core.hub import datasets_hub_unreachable

log = logging.getLogger(__name__)

IGNORE = -100  # label value that the loss skips (prompt and padding tokens)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Template = Literal["alpaca", "chat", "scorer"]


class DataError(FedCrashError):
    """Missing data file or malformed row; the message names the file and row."""


def load_instructions(
    source: str | Path, *, skip_malformed: bool = False, split: str = "train"
) -> list[dict[str, str]]:
    """Rows with ``instruction``, ``input`` (may be empty) and ``output`` strings.

    ``source`` is a ``.json`` list or ``.jsonl`` file, or a hub dataset name, or several local
    files separated by commas, pooled in order. A file of multiple-choice rows (``{query,
    choices, gold}``, the eval layout) becomes task rows: ``instruction`` the query, ``output``
    the gold choice, ``task`` the file's stem without a ``_train`` suffix (the ``task`` partition label). A malformed row
    raises :class:`DataError` naming its (0-based) row number, or, with ``skip_malformed``, is
    skipped and counted in the log.
    """
    if "," in str(source):
        return [row for part in str(source).split(",") if part.strip() for row in load_instructions(part.strip(), skip_malformed=skip_malformed)]
    path = Path(source).expanduser()
    if is_local_file(path):
        raw = _read_local(path)
    else:
        raw = _read_hub(str(source), split)
    if raw and isinstance(raw[0], dict) and {"query", "choices", "gold"} <= set(raw[0]):
        raw = [task_row(row, path.stem.removesuffix("_train")) for row in raw]
    rows, bad = [], 0
    for i, row in enumerate(raw):
        problem = _row_problem(row)
        if problem is None:
            rows.append({"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
                         **({"task": row["task"]} if "task" in row else {})})
        elif skip_malformed:
            bad += 1
        else:
            raise DataError(f"{source}: row {i}: {problem} (pass skip_malformed to skip such rows)")
    if bad:
        log.warning("%s: skipped %d malformed rows of %d", source, bad, len(raw))
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def is_local_file(path: Path) -> bool:
    """The one rule for data sources (instruction data, multiple-choice tasks): a path with a
    ``.json``/``.jsonl`` suffix, or one that exists, is a local file; anything else is a hub name."""
    return path.suffix in (".json", ".jsonl") or path.exists()


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """``(1-based line number, value)`` of every non-blank line; a bad line raises naming it."""
    rows = []
    # split on "\n" only: str.splitlines() also splits on U+2028, U+0085 ..., which JSON strings may hold (SciQ's do)
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    return rows


def _read_local(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path)]
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _read_hub(name: str, split: str) -> list:
    import datasets

    if datasets_hub_unreachable():  # fail now, not after the hub client's retries
        raise DataError(f"could not load dataset {name!r}: not a local file and the hub is unreachable (offline?); give a .json or .jsonl file")
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "not loadable"
        raise DataError(
            f"could not load dataset {name!r}: not a local file and the hub did not answer "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def task_row(row: dict, task: str) -> dict:
    """A multiple-choice row as an instruction row: the query, its gold choice, the task's name
    (a malformed one becomes a row :func:`_row_problem` names)."""
    choices, gold = row.get("choices"), row.get("gold")
    if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        return {"instruction": row.get("query"), "output": None, "task": task}
    return {"instruction": row["query"], "output": choices[gold], "task": task}


def _row_problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for field in ("instruction", "output"):
        if field not in row:
            return f"missing field {field!r}"
        if not isinstance(row[field], str):
            return f"field {field!r} must be a string, got {type(row[field]).__name__}"
    if not row["instruction"].strip():
        return "empty 'instruction'"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"field 'input' must be a string, got {type(row['input']).__name__}"
    return None


def format_prompt(row: dict[str, str], template: Template = "alpaca", tokenizer=None) -> str:
    """The prompt the response follows: the Alpaca template, or the model's chat template."""
    if template == "alpaca":
        fmt = ALPACA_PROMPT if row["input"] else ALPACA_PROMPT_NO_INPUT
        return fmt.format(instruction=row["instruction"], input=row["input"])
    if template == "scorer":  # the multiple-choice scorer's context: the query as it is
        return row["instruction"]
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template")
        content = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise DataError(f"unknown template {template!r}; expected 'alpaca', 'chat' or 'scorer'")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def tokenize(
    rows: Sequence[dict[str, str]],
    tokenizer,
    *,
    max_length: int = 256,
    template: Template = "alpaca",
) -> list[Tokenized]:
    """Prompt + response + EOS, truncated to ``max_length``; loss only on response tokens.

    Template ``scorer`` (task rows): the query and ``" " + output`` split into tokens exactly as
    the multiple-choice scorer splits context and choice (:func:`encode_pair`), no EOS, the
    context cut from the left when long: the loss falls on the gold continuation as it is scored.

    Examples whose prompt alone fills ``max_length`` have no response token left and are
    dropped (counted in the log), since they would contribute nothing to the loss; when that is
    every example, :class:`DataError` (a loss over no token would read 0).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, dropped = [], 0
    for row in rows:
        if template == "scorer":
            prompt, response = encode_pair(tokenizer, row["instruction"], " " + row["output"])
            prompt = prompt[-max(max_length - len(response), 0):] if len(response) < max_length else []
        else:
            prompt = tokenizer(format_prompt(row, template, tokenizer), add_special_tokens=False).input_ids
            response = tokenizer(row["output"], add_special_tokens=False).input_ids + eos
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE] * len(prompt) + response)[:max_length]
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        out.append(Tokenized(ids, labels))
    if rows and not out:
        raise DataError(f"max-length {max_length}: the prompt of every one of the {len(rows)} examples fills it, leaving no response "
                        "token to train or evaluate on; raise max-length")
    if dropped:
        log.warning("dropped %d of %d examples whose prompt fills max_length=%d", dropped, len(rows), max_length)
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-eval splits them for causal models."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # lm-eval conditions on the BOS (or EOS) token alone
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return ctx, whole[len(ctx):]


def collate(examples: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out and ignored by the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    examples: Sequence[Tokenized], batch_size: int, pad_id: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def split_rows(
    rows: Sequence[dict[str, str]], sizes: dict[str, int], seed: int = 0
) -> dict[str, list[dict[str, str]]]:
    """Disjoint named slices of one seeded permutation, in the order given (e.g. eval first,
    so the held-out set does not change when the training size does)."""
    need = sum(sizes.values())
    if need > len(rows):
        raise DataError(f"asked for {need} examples ({sizes}) but the data has only {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [rows[i] for i in order[start : start + size]]
        start += size
    return out
