"""Multiple-choice accuracy the way lm-evaluation-harness scores it.

For each choice, the summed log-probability of the continuation (``" " + choice``) given the
context (``query``). ``acc`` takes the argmax of the sums; ``acc_norm`` divides each sum by the
choice's length in characters and ``acc_bytes`` by its length in UTF-8 bytes, as lm-eval 0.4 does
(the two coincide on ASCII text). Tokenization follows lm-eval's causal-model rule so the numbers
can be compared one to one: trailing whitespace of the context moves to the continuation, the
pair is encoded whole, and the continuation is whatever follows the context's own tokens.

Tasks come from three places, all normalised to ``{query, choices, gold}`` rows by a
:class:`Fields` mapping (one loop, no per-task code): local JSONL in that layout (ARC-Easy,
ARC-Challenge, OpenBookQA, PIQA in ``shared/data/eval``), hub datasets by short name
(:data:`HUB_TASKS`), or any JSONL with a mapping given on the command line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fed_crash.core.data import IGNORE, DataError, Tokenized, collate, encode_pair, is_local_file, pad_id, read_jsonl
from fed_crash.core.hub import datasets_hub_unreachable
from fed_crash.core.models import get_layers
from fed_crash.core.precision import autocast, linear_weights_in
from fed_crash.core.train import lm_head_logits, sequence_logprobs
from fed_crash.evaluation.stats import mean_stderr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fields:
    """Where a row keeps what a multiple-choice question needs.

    ``query`` is a ``str.format`` template over the row (``"Question: {question}\\nAnswer:"``);
    ``choices`` names one list field (dotted into nested dicts: ``choices.text``) or several
    comma-separated string fields (``sol1,sol2``); ``gold`` names the field holding the answer's
    index, or its label when ``labels`` names the field listing the choices' labels
    (``answerKey`` with ``choices.label``); ``gold="=3"`` fixes the index for every row.
    """

    query: str = "{query}"
    choices: str = "choices"
    gold: str = "gold"
    labels: str = ""

    @classmethod
    def parse(cls, text: str) -> "Fields":
        """``"query=Question: {question}\\nAnswer:;choices=choices.text;gold=answerKey;labels=choices.label"``
        (``;``-separated, ``\\n`` escapes allowed); unnamed keys keep their defaults."""
        known = {f.name for f in dc_fields(cls)}
        values = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in known:
                raise DataError(f"field mapping {part!r}: expected KEY=VALUE with KEY in {sorted(known)}")
            values[key.strip()] = value.replace("\\n", "\n")
        return cls(**values)


def _get(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def map_row(row: dict, fields: Fields) -> dict:
    """``row`` as ``{query, choices, gold}``; raises KeyError/ValueError on a row that does not fit."""
    query = fields.query.format_map(_FormatRow(row))
    if "," in fields.choices:
        choices = [_get(row, name.strip()) for name in fields.choices.split(",")]
    else:
        choices = _get(row, fields.choices)
    if fields.gold.startswith("="):
        gold = int(fields.gold[1:])
    elif fields.labels:
        gold = list(_get(row, fields.labels)).index(str(_get(row, fields.gold)).strip())
    else:
        gold = int(_get(row, fields.gold))
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise ValueError("choices must be a list of at least two strings")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold} is not an index into {len(choices)} choices")
    return {"query": query, "choices": choices, "gold": gold}


class _FormatRow(dict):
    """Lets ``str.format_map`` read dotted fields and name a missing one in the error."""

    def __init__(self, row: dict):
        super().__init__(row)
        self.row = row

    def __missing__(self, key: str):
        return _get(self.row, key)


def _hellaswag(row: dict) -> dict:
    """lm-eval's HellaSwag clean-up: WikiHow brackets removed, context capitalised."""

    def clean(text: str) -> str:
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")

    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": clean(row["activity_label"] + ": " + ctx), "choices": [clean(e) for e in row["endings"]], "gold": row["label"]}


@dataclass(frozen=True)
class HubTask:
    """A hub dataset and the mapping that turns its rows into multiple-choice questions
    (templates as in lm-eval 0.4's task YAMLs)."""

    path: str
    name: str | None
    split: str
    fields: Fields
    prepare: Callable[[dict], dict] | None = None


HUB_TASKS: dict[str, HubTask] = {
    "arc_easy": HubTask("allenai/ai2_arc", "ARC-Easy", "test", Fields("Question: {question}\nAnswer:", "choices.text", "answerKey", "choices.label")),
    "arc_challenge": HubTask("allenai/ai2_arc", "ARC-Challenge", "test", Fields("Question: {question}\nAnswer:", "choices.text", "answerKey", "choices.label")),
    "openbookqa": HubTask("allenai/openbookqa", "main", "test", Fields("{question_stem}", "choices.text", "answerKey", "choices.label")),
    "piqa": HubTask("baber/piqa", None, "validation", Fields("Question: {goal}\nAnswer:", "sol1,sol2", "label")),
    "hellaswag": HubTask("Rowan/hellaswag", None, "validation", Fields(), prepare=_hellaswag),
    "sciq": HubTask("allenai/sciq", None, "test", Fields("{support}\nQuestion: {question}\nAnswer:", "distractor1,distractor2,distractor3,correct_answer", "=3")),
}


@dataclass
class McTask:
    name: str
    rows: list[dict]  # {query, choices, gold}
    source: str


def load_task(source: str | Path, *, fields: Fields | None = None, limit: int = 0, seed: int = 0) -> McTask:
    """A multiple-choice task from a local JSONL file, or a hub dataset named in :data:`HUB_TASKS`.

    ``limit`` > 0 draws a seeded sample of that many questions (the same for every model).
    """
    text = str(source)
    path = Path(text).expanduser()
    if is_local_file(path):
        if not path.is_file():
            raise DataError(f"multiple-choice file {path} does not exist")
        raw, task_name, prepare = [(f"line {n}", row) for n, row in read_jsonl(path)], path.stem, None
        fields = fields or Fields()
    elif text in HUB_TASKS:
        import datasets

        hub = HUB_TASKS[text]
        if datasets_hub_unreachable():  # fail now, not after the hub client's retries
            raise DataError(f"could not load hub dataset {hub.path} for task {text!r}: the hub is unreachable (offline?). "
                            "Pass a local JSONL file instead (shared/data/eval has ARC-E, ARC-C, OpenBookQA, PIQA).")
        try:
            data = datasets.load_dataset(hub.path, hub.name, split=hub.split)
        except Exception as err:  # offline, gated or renamed: say which and how to work around it
            raise DataError(f"could not load hub dataset {hub.path} ({hub.name or 'default'}, {hub.split}) for task {text!r}: {err}. "
                            "Offline, pass a local JSONL file instead.") from None
        raw, task_name, prepare = [(f"row {i}", r) for i, r in enumerate(data)], text, hub.prepare
        fields = fields or hub.fields
    else:
        raise DataError(f"multiple-choice task {text!r} is neither a .jsonl file nor one of {sorted(HUB_TASKS)}")
    rows = []
    for where, row in raw:
        try:
            rows.append(map_row(prepare(row) if prepare else row, fields))
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise DataError(f"{text}: {where} does not fit the field mapping {fields} ({type(err).__name__}: {err})") from None
    if not rows:
        raise DataError(f"{text}: no questions")
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return McTask(task_name, rows, text)


def supports_prefix_cache(model) -> bool:
    """Whether the context can be run once and its KV cache reused for every choice: each
    decoder layer is a distinct module whose attention caches under its own position (an
    emulator that shares one layer at several positions does not qualify)."""
    try:
        layers = get_layers(model)
    except ValueError:
        return False
    if len({id(layer) for layer in layers}) != len(layers):
        return False
    attention = [getattr(layer, "self_attn", None) or getattr(layer, "attn", None) for layer in layers]  # Llama-likes, GPT-2
    return all(getattr(a, "layer_idx", None) == i for i, a in enumerate(attention))


def _logprob_of(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (LM head applied only here)."""
    return -F.cross_entropy(lm_head_logits(model, hidden), targets, reduction="none")


def _cached_scores(model, group: list[tuple[list[int], list[list[int]]]], pad: int, device) -> list[float]:
    """Summed continuation log-probs for questions ``(context, [continuations])``: one forward
    over the left-padded contexts, then one over all continuations on top of the repeated cache."""
    from transformers import DynamicCache

    q = len(group)
    width = max(len(ctx) for ctx, _ in group)
    ids = torch.full((q, width), pad, dtype=torch.long)
    mask = torch.zeros((q, width), dtype=torch.long)
    for i, (ctx, _) in enumerate(group):
        ids[i, width - len(ctx):] = torch.tensor(ctx)
        mask[i, width - len(ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=model.config)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              cache=cache, use_cache=True).last_hidden_state[:, -1]
    owner = torch.tensor([i for i, (_, conts) in enumerate(group) for _ in conts], device=device)
    conts = [c for _, cs in group for c in cs]
    first = _logprob_of(model, hidden[owner], torch.tensor([c[0] for c in conts], device=device))
    rest_width = max(len(c) for c in conts) - 1
    if rest_width == 0:
        return first.tolist()
    n = len(conts)
    rest = torch.full((n, rest_width), pad, dtype=torch.long)
    targets = torch.full((n, rest_width), IGNORE, dtype=torch.long)
    rest_mask = torch.zeros((n, rest_width), dtype=torch.long)
    for j, c in enumerate(conts):
        rest[j, : len(c) - 1] = torch.tensor(c[:-1])
        targets[j, : len(c) - 1] = torch.tensor(c[1:])
        rest_mask[j, : len(c) - 1] = 1
    rest, targets, rest_mask = rest.to(device), targets.to(device), rest_mask.to(device)
    cache.reorder_cache(owner)
    positions = mask.sum(-1)[owner, None] + torch.arange(rest_width, device=device)
    hidden = model.base_model(input_ids=rest, attention_mask=torch.cat([mask[owner], rest_mask], dim=1), position_ids=positions,
                              cache=cache, use_cache=True).last_hidden_state
    where = targets != IGNORE
    logprobs = _logprob_of(model, hidden[where], targets[where])
    return first.index_add(0, where.nonzero()[:, 0], logprobs).tolist()


Encoded = tuple[list[int], list[list[int]]]  # a question's context ids and its choices' continuation ids


def _padded_tokens(encoded: Sequence[Encoded], groups: list[list[int]], cached: bool) -> int:
    """Token positions the forward passes of ``groups`` compute, padding included: the cached
    path runs each context once (padded to the group's longest) and then every continuation but
    its last token (padded to the longest); the full path runs every context+continuation."""
    total = 0
    for group in groups:
        conts = [c for i in group for c in encoded[i][1]]
        if cached:
            total += len(group) * max(len(encoded[i][0]) for i in group) + len(conts) * (max(map(len, conts)) - 1)
        else:
            total += len(conts) * max(len(encoded[i][0]) + len(c) for i in group for c in encoded[i][1])
    return total


def plan_batches(encoded: Sequence[Encoded], batch_size: int, *, cached: bool) -> list[list[int]]:
    """The questions of each batch (at most ``batch_size`` continuations, a question never
    split), grouped for the fewest padded tokens on the given path.

    Questions are sorted longest first (an out-of-memory error shows at once) by each of a few
    keys, and the grouping with the fewest :func:`_padded_tokens` wins. On the cached path,
    sorting by context length alone suits ARC (long questions, short answers) but doubles the
    work on PIQA (short goals, long solutions of varied length); sorting by the longest
    continuation, then the context, is best on both (measured in docs/evaluation.md).
    """
    def ctx(i: int) -> int:
        return len(encoded[i][0])

    def cont(i: int) -> int:
        return max(map(len, encoded[i][1]))

    keys = [lambda i: (cont(i), ctx(i)), lambda i: (ctx(i), cont(i))] if cached else [lambda i: ctx(i) + cont(i)]
    plans = []
    for key in keys:
        groups, group, size = [], [], 0
        for i in sorted(range(len(encoded)), key=key, reverse=True):
            if group and size + len(encoded[i][1]) > batch_size:
                groups.append(group)
                group, size = [], 0
            group.append(i)
            size += len(encoded[i][1])
        groups.append(group)
        plans.append(groups)
    return min(plans, key=lambda groups: _padded_tokens(encoded, groups, cached))


@torch.no_grad()
def score_mc(
    model, tokenizer, rows: Sequence[dict], *, batch_size: int = 16, max_length: int = 2048,
    progress: bool = False, prefix_cache: bool | None = None, desc: str = "multiple choice", dtype: torch.dtype = torch.float32,
    log_samples: bool = False,
) -> dict:
    """``acc``, ``acc_norm`` and ``acc_bytes`` of ``model`` on ``{query, choices, gold}`` rows.

    ``batch_size`` counts continuations per forward pass. On the cached path each question's
    context runs once and its KV cache serves all choices; on the full path every
    context+choice sequence runs whole. Both give the same sums; the cached path computes
    fewer positions on every task (:func:`_padded_tokens`), so it is the default wherever
    :func:`supports_prefix_cache` allows it. ``prefix_cache`` forces one path. Forward passes
    run in ``dtype`` (:mod:`fed_crash.core.precision`); log-likelihoods are summed in fp32.
    Each metric comes with lm-eval's standard error (``acc_stderr`` ...); ``log_samples`` adds
    one :func:`document_record` per question under ``samples``.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    encoded = []
    for row in rows:
        pairs = [encode_pair(tokenizer, row["query"], " " + choice) for choice in row["choices"]]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs) or any(not p[1] for p in pairs):
            raise DataError(f"question {row['query'][:60]!r}: a choice changes the context's tokens or is empty")
        conts = [p[1][-max_length + 1:] for p in pairs]
        encoded.append((ctx[-(max_length - max(map(len, conts))):], conts))
    use_cache = supports_prefix_cache(model) if prefix_cache is None else prefix_cache
    groups = plan_batches(encoded, batch_size, cached=use_cache)
    sums: dict[int, list[float]] = {}
    with linear_weights_in(dtype, model, frozen_only=False):
        for group in tqdm(groups, desc=desc, disable=not progress, leave=False):
            with autocast(dtype, device):
                if use_cache:
                    flat = _cached_scores(model, [encoded[i] for i in group], pad, device)
                else:
                    examples = [Tokenized(encoded[i][0] + c, [IGNORE] * len(encoded[i][0]) + c) for i in group for c in encoded[i][1]]
                    flat = sequence_logprobs(model, collate(examples, pad)).tolist()
            for i in group:
                k = len(encoded[i][1])
                sums[i], flat = flat[:k], flat[k:]
    model.train(was_training)
    samples = [document_record(i, row, sums[i]) for i, row in enumerate(rows)]
    n = len(rows)
    scores: dict = {}
    for metric in METRICS:
        correct = [s["correct"][metric] for s in samples]
        scores[metric], scores[f"{metric}_stderr"] = sum(correct) / n, mean_stderr(correct)
    log.debug("%s: %d questions in %.1f s (cached context: %s)", desc, n, time.perf_counter() - start, use_cache)
    return {**scores, "n": n, "seconds": time.perf_counter() - start, **({"samples": samples} if log_samples else {})}


METRICS = {"acc": lambda choice: 1.0, "acc_norm": len, "acc_bytes": lambda choice: len(choice.encode("utf-8"))}  # name -> length a log-likelihood is divided by


def document_record(index: int, row: dict, lls: list[float]) -> dict:
    """One question's record, as lm-eval's ``--log_samples`` writes one: its index in the task's
    sample, a hash of its text (pairing two models' records checks it), each choice's summed
    log-likelihood, and per metric the prediction and whether it is the gold answer."""
    pred = {m: max(range(len(lls)), key=lambda j: lls[j] / norm(row["choices"][j])) for m, norm in METRICS.items()}
    text = json.dumps([row["query"], row["choices"]], ensure_ascii=False)
    return {"doc_id": index, "doc_sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "gold": row["gold"], "lls": lls,
            "pred": pred, "correct": {m: int(p == row["gold"]) for m, p in pred.items()}}
