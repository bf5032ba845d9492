"""Evaluate one model, or the four models offsite-tuning is judged by, and CRaSh's 1-D loss landscape.

Offsite-tuning asks three questions: does the plug-in beat the full model zero-shot, how far is
it from fine-tuning, and how good is the emulator. :func:`four_model_report` answers them on
the same tasks for full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in, with
multiple-choice accuracy (:mod:`fed_crash.evaluation.mc`), held-out loss/perplexity on response tokens and
ROUGE-L of greedy answers to held-out instructions.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from fed_crash.core.precision import dtype_name
from fed_crash.evaluation.stats import paired_bootstrap
from fed_crash.core.artifacts import ArtifactError, load_adapters, load_emulator
from fed_crash.config import DataConfig, EvalConfig, to_dict
from fed_crash.core.data import format_prompt, load_instructions, pad_id, read_jsonl, split_rows, tokenize
from fed_crash.core.emulator import EmulatorSpec, check_adapters, plug_in
from fed_crash.evaluation.mc import HUB_TASKS, METRICS, Fields, McTask, load_task, score_mc, supports_prefix_cache
from fed_crash.core.models import load_model, state_hash
from fed_crash.core.plots import figure
from fed_crash.core.train import evaluate

log = logging.getLogger(__name__)

MODELS = ("full_zero_shot", "emulator_zero_shot", "emulator_fine_tuned", "plug_in")


def load_tasks(sources: Sequence[str], cfg: EvalConfig, seed: int = 0) -> list[McTask]:
    """Multiple-choice tasks (files or hub names) with the same sample for every model."""
    fields = Fields.parse(cfg.fields) if cfg.fields else None
    tasks = []
    for source in sources:
        task = load_task(source, fields=None if source in HUB_TASKS else fields, limit=0 if cfg.first else cfg.limit, seed=seed)
        if cfg.first and cfg.limit:
            task.rows = task.rows[: cfg.limit]
        tasks.append(task)
    return tasks


def held_out_rows(data: DataConfig, n: int) -> list[dict[str, str]]:
    """The first ``n`` rows of the seeded split: what ``tune`` and the Flower server hold out."""
    if n <= 0:
        return []
    return split_rows(load_instructions(data.data, skip_malformed=data.skip_malformed), {"eval": n}, seed=data.seed)["eval"]


@functools.cache
def _rouge_scorer():
    """One scorer per process: building it loads the stemmer and tokenizer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Google's ``rouge_score``, Porter stemming)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@torch.no_grad()
def generate(model, tokenizer, rows: Sequence[dict[str, str]], data: DataConfig, *, max_new_tokens: int = 64,
             batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy answers to ``rows``' prompts (left-padded batches; stops at EOS)."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress, leave=False):
            prompts = [format_prompt(r, data.template, tokenizer) for r in rows[start : start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=data.max_length).to(device)
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 use_cache=supports_prefix_cache(model))
            answers += [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_model(
    model, tokenizer, tasks: Sequence[McTask], instruct: Sequence[dict[str, str]], data: DataConfig, cfg: EvalConfig,
    *, out: Path | None = None, name: str = "model", progress: bool = True, dtype: torch.dtype = torch.float32,
) -> dict:
    """Multiple-choice scores per task (with lm-eval's stderr), and held-out loss / perplexity /
    ROUGE-L on ``instruct``. With ``out``: each question's record goes to
    ``out/samples-<name>-<task>.jsonl`` and greedy answers to ``out/generations-<name>.jsonl``."""
    result: dict = {"tasks": {}}
    for task in tasks:
        scores = score_mc(model, tokenizer, task.rows, batch_size=cfg.batch_size, progress=progress, desc=f"{name}: {task.name}",
                          dtype=dtype, log_samples=out is not None)
        if out is not None:  # lm-eval's --log_samples: one record per question, for paired comparisons (paired_comparison)
            scores["samples_file"] = write_samples(out / f"samples-{name}-{task.name}.jsonl", scores.pop("samples")).name
        result["tasks"][task.name] = scores
        log.info("%s %s: %s", name, task.name, _fmt({k: v for k, v in scores.items() if k != "samples_file"}))
    if instruct:
        start = time.perf_counter()
        examples = tokenize(instruct, tokenizer, max_length=data.max_length, template=data.template)
        result["instruct"] = evaluate(model, examples, pad_id(tokenizer), batch_size=cfg.batch_size, progress=progress, desc=f"{name}: loss", dtype=dtype)
        if cfg.generate:
            refs = instruct[: cfg.generate]
            answers = generate(model, tokenizer, refs, data, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
            scores = [rouge_l(a, r["output"]) for a, r in zip(answers, refs)]
            result["instruct"].update(rougeL=sum(scores) / len(scores), generated=len(scores))
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / f"generations-{name}.jsonl", "w", encoding="utf-8") as fh:
                    for r, a, s in zip(refs, answers, scores):
                        fh.write(json.dumps({"instruction": r["instruction"], "input": r["input"], "reference": r["output"], "generated": a, "rougeL": s}) + "\n")
        result["instruct"]["seconds"] = time.perf_counter() - start
        log.info("%s held-out: %s", name, _fmt(result["instruct"]))
    return result


def write_samples(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def paired_comparison(a_file: str | Path, b_file: str | Path, *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Model A minus model B on the same questions, per metric: the mean difference of
    correctness and its paired bootstrap 95% interval (:func:`fed_crash.evaluation.stats.paired_bootstrap`),
    from two samples files of the same task sample (checked question by question)."""
    a, b = ([row for _, row in read_jsonl(Path(f))] for f in (a_file, b_file))
    if [r["doc_sha256"] for r in a] != [r["doc_sha256"] for r in b]:
        raise ArtifactError(f"{a_file} and {b_file} hold different questions (or another order): a paired comparison needs the same sample")
    return {metric: paired_bootstrap([r["correct"][metric] for r in a], [r["correct"][metric] for r in b], resamples=resamples, seed=seed)
            for metric in METRICS}


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items())


def markdown_table(results: dict[str, dict]) -> str:
    """One row per model: acc / acc_norm per task, then loss, perplexity and ROUGE-L when present."""
    first = next(iter(results.values()))
    tasks = list(first["tasks"])
    head = ["model"] + [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    has_instruct = "instruct" in first
    has_rouge = has_instruct and "rougeL" in first["instruct"]
    head += ["loss", "ppl"] * has_instruct + ["ROUGE-L"] * has_rouge
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, r in results.items():
        cells = [name] + [f"{100 * r['tasks'][t][m]:.2f}" for t in tasks for m in ("acc", "acc_norm")]
        if has_instruct:
            cells += [f"{r['instruct']['loss']:.4f}", f"{r['instruct']['ppl']:.2f}"]
        if has_rouge:
            cells.append(f"{r['instruct']['rougeL']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def four_model_report(
    model_source: str, emulator_folder: str | Path, adapters: str | Path, tasks: Sequence[McTask], data: DataConfig, cfg: EvalConfig,
    out: str | Path, *, cache_dir: str | None = None, device: str | None = None, progress: bool = True, full_from: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Full zero-shot, emulator zero-shot (its initial adapters), emulator fine-tuned (``adapters``)
    and plug-in (``adapters`` in the full model), on the same tasks and held-out rows.
    ``full_from``: an earlier ``report.json`` of the same model, tasks and held-out rows whose
    full zero-shot scores are reused (they do not depend on the emulator; comparing emulators
    then costs three evaluations each, not four). For an emulator that removes no layer (the
    ``full`` and ``full-lora`` baselines), which is the model, the emulator rows are the full
    model's and the plug-in's, not scored again. Writes
    ``report.json`` and ``report.md`` to ``out``."""
    out = Path(out)
    start = time.perf_counter()
    loaded = load_model(model_source, cache_dir=cache_dir, device=device)
    emulator, _, manifest = load_emulator(emulator_folder, device=device)
    if manifest["source"]["sha256"] != state_hash(loaded.model.state_dict()):
        raise ArtifactError(f"emulator {emulator_folder} was built from {manifest['source']['model_id']}, whose weights differ from {model_source!r}")
    tuned = load_adapters(adapters)
    check_adapters(tuned, emulator.adapter_state(), f"emulator {emulator_folder}")
    instruct = held_out_rows(data, cfg.instruct_examples)
    results = {}

    def run(name: str, model) -> None:
        results[name] = evaluate_model(model, loaded.tokenizer, tasks, instruct, data, cfg, out=out, name=name, progress=progress, dtype=dtype)

    task_info = {t.name: {"source": t.source, "n": len(t.rows)} for t in tasks}
    if full_from:
        earlier = json.loads(Path(full_from).read_text())
        same = (earlier["model"], earlier["tasks"], earlier["instruct_examples"]) == (loaded.model_id, task_info, len(instruct))
        if not same or earlier.get("config", _config(data, cfg, dtype)) != _config(data, cfg, dtype):  # older reports do not record it
            raise ArtifactError(f"{full_from} scored another model, task sample or held-out set; its full zero-shot scores cannot be reused")
        results["full_zero_shot"] = earlier["models"]["full_zero_shot"]
    else:
        run("full_zero_shot", loaded.model)
    folders = dict.fromkeys(MODELS, out) | ({"full_zero_shot": Path(full_from).parent} if full_from else {})
    ceiling = not EmulatorSpec.from_dict(manifest["spec"]).removed  # 'full', 'full-lora': the "emulator" is the model, and scores as it does
    if ceiling:
        results["emulator_zero_shot"], folders["emulator_zero_shot"] = results["full_zero_shot"], folders["full_zero_shot"]
    else:
        run("emulator_zero_shot", emulator.model)
        emulator.load_adapters(tuned)
        run("emulator_fine_tuned", emulator.model)
    plug_in(loaded.model, tuned)
    run("plug_in", loaded.model)
    if ceiling:
        results["emulator_fine_tuned"] = results["plug_in"]
        results = {name: results[name] for name in MODELS}
    paired = _paired(tasks, results, folders)
    report = {
        "models": results, "model": loaded.model_id, "emulator": str(emulator_folder), "adapters": str(adapters),
        "spec": manifest["spec"], "tasks": task_info, "instruct_examples": len(instruct), "config": _config(data, cfg, dtype),
        "full_from": str(full_from) if full_from else None, "paired": paired, "seconds": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown_table(results) + "\n" + paired_table(paired))
    return report


PAIRS = (("plug_in", "full_zero_shot"), ("emulator_fine_tuned", "emulator_zero_shot"))  # what tuning gave, on each side


def _paired(tasks: Sequence[McTask], results: dict, folders: dict) -> dict:
    """Per task, each pair of :data:`PAIRS` compared question by question from the samples files
    in ``folders`` (an older --full-from report has none: that pair is left out)."""
    paired: dict = {}
    for task in tasks:
        paired[task.name] = {}
        for a, b in PAIRS:
            files = [folders[m] / results[m]["tasks"][task.name].get("samples_file", "") for m in (a, b)]
            if all(f.is_file() for f in files):
                paired[task.name][f"{a} - {b}"] = paired_comparison(*files)
    return paired


def paired_table(paired: dict) -> str:
    """Markdown: per task and pair, the accuracy difference in points with its paired bootstrap 95% interval."""
    rows = [f"| {task} | {pair} | {100 * c['acc']['difference']:+.2f} [{100 * c['acc']['low']:+.2f}, {100 * c['acc']['high']:+.2f}] "
            f"| {100 * c['acc_norm']['difference']:+.2f} [{100 * c['acc_norm']['low']:+.2f}, {100 * c['acc_norm']['high']:+.2f}] | {c['acc']['n']} |"
            for task, pairs in paired.items() for pair, c in pairs.items()]
    if not rows:
        return ""
    return ("\nPaired differences (points), paired bootstrap 95% intervals over the same questions:\n\n"
            "| task | models | acc | acc_norm | questions |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _config(data: DataConfig, cfg: EvalConfig, dtype: torch.dtype) -> dict:
    """What decides the scores besides the model: the sample, the held-out rows and their data
    options (when there are any: multiple choice alone does not read --data), the compute dtype."""
    return {"data": to_dict(data) if cfg.instruct_examples else {}, "eval": {k: v for k, v in to_dict(cfg).items() if k != "batch_size"}, "compute_dtype": dtype_name(dtype)}


@torch.no_grad()
def interpolate_adapters(
    model, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], examples, pad: int, *, points: int = 25, batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, float]]:
    """CRaSh's 1-D landscape: held-out loss of ``model`` with ``(1 - t) * a + t * b`` plugged in,
    for ``points`` evenly spaced ``t`` in [0, 1]. The model's own weights are restored afterwards."""
    if points < 2:
        raise ValueError("points must be at least 2")
    check_adapters(b, a, "adapter set A")
    original = {k: v.detach().clone() for k, v in model.state_dict().items() if k in a}
    curve = []
    try:
        for i in tqdm(range(points), desc="interpolate", disable=not progress, leave=False):
            t = i / (points - 1)
            plug_in(model, {k: torch.lerp(a[k].float(), b[k].float(), t).to(a[k].dtype) for k in a})
            curve.append({"t": t, **evaluate(model, examples, pad, batch_size=batch_size, progress=False)})
    finally:
        plug_in(model, original)
    return curve


def plot_interpolation(curve: Sequence[dict], path: str | Path, *, labels: tuple[str, str] = ("A", "B"), title: str = "") -> None:
    with figure(path, figsize=(6, 3.6)) as (_, ax):
        ax.plot([p["t"] for p in curve], [p["loss"] for p in curve], marker="o", markersize=3)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1], [f"0\n{labels[0]}", "0.25", "0.5", "0.75", f"1\n{labels[1]}"])
        ax.set_xlabel("interpolation t: (1 - t) A + t B, plugged into the full model")
        ax.set_ylabel("held-out loss")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
