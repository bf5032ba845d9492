"""Multiple-choice accuracy the way lm-evaluation-harness scores it.

For each choice, the summed log-probability of the continuation (`` " " + choice``) given the
context (``query``): ``acc`` takes the argmax of the sums, ``acc_norm`` the argmax of the sums
divided by the continuation's length in bytes. Tasks are JSONL files in the
``{query, choices, gold}`` layout (ARC-Easy, ARC-Challenge, OpenBookQA, PIQA in shared/data/eval).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import IGNORE, DataError, Tokenized, collate
from .train import sequence_logprobs


def load_mc(path: str | Path, *, limit: int = 0, seed: int = 0) -> list[dict]:
    """Rows of a ``{query, choices, gold}`` JSONL file; ``limit`` > 0 draws a seeded sample."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"multiple-choice file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n + 1} is not valid JSON ({err.msg})") from None
        ok = (
            isinstance(row, dict) and isinstance(row.get("query"), str) and isinstance(row.get("choices"), list)
            and len(row["choices"]) >= 2 and all(isinstance(c, str) for c in row["choices"])
            and isinstance(row.get("gold"), int) and 0 <= row["gold"] < len(row["choices"])
        )
        if not ok:
            raise DataError(f"{path}: line {n + 1}: expected {{query: str, choices: [str, ...], gold: index}}")
        rows.append(row)
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


@torch.no_grad()
def score_mc(model, tokenizer, rows: Sequence[dict], *, pad_id: int, batch_size: int = 16, max_length: int = 512, progress: bool = False) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of ``model`` on multiple-choice ``rows``."""
    model.eval()
    examples, owners = [], []
    for q, row in enumerate(rows):
        context = tokenizer(row["query"], add_special_tokens=False).input_ids
        for choice in row["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False).input_ids
            ids = (context + cont)[-max_length:]
            labels = ([IGNORE] * len(context) + cont)[-max_length:]
            examples.append(Tokenized(ids, labels))
            owners.append((q, len((" " + choice).encode("utf-8"))))
    scores = []
    for start in tqdm(range(0, len(examples), batch_size), desc="multiple choice", disable=not progress, leave=False):
        scores += sequence_logprobs(model, collate(examples[start : start + batch_size], pad_id)).tolist()
    per_q: dict[int, list[tuple[float, int]]] = {}
    for (q, nbytes), score in zip(owners, scores):
        per_q.setdefault(q, []).append((score, nbytes))
    acc = acc_norm = 0
    for q, row in enumerate(rows):
        sums = per_q[q]
        acc += max(range(len(sums)), key=lambda i: sums[i][0]) == row["gold"]
        acc_norm += max(range(len(sums)), key=lambda i: sums[i][0] / sums[i][1]) == row["gold"]
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "n": len(rows)}
