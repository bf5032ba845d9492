"""Response-token loss, held-out evaluation, and adapter training on a frozen emulator."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from fed_crash.config import TrainConfig
from fed_crash.core.data import IGNORE, Tokenized, batches
from fed_crash.core.emulator import Emulator
from fed_crash.core.precision import autocast, head_weight, linear_weights_in, training_attention

log = logging.getLogger(__name__)


def _target_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is labelled, those targets, and their rows.

    The LM head (49k x 576 for SmolLM2, a third of an emulator's forward cost) is applied only
    at these positions, not at every position.
    """
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    hidden = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False).last_hidden_state
    targets = batch["labels"].to(device)[:, 1:]
    where = targets != IGNORE
    return lm_head_logits(model, hidden[:, :-1][where]), targets[where], where.nonzero()[:, 0]


def lm_head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the LM head on ``hidden`` (rows of final hidden states), soft-capped as
    the model's config asks (Gemma); under bf16 autocast with a bf16 copy of the head's weight
    (:func:`fed_crash.core.precision.head_weight`)."""
    head = model.get_output_embeddings()
    logits = F.linear(hidden, head_weight(head.weight), head.bias)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def response_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled (response) tokens, and their count."""
    logits, targets, _ = _target_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def sequence_logprobs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per example, the summed log-probability of its labelled tokens (multiple-choice scoring)."""
    logits, targets, rows = _target_logits(model, batch)
    logprobs = -F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(batch["input_ids"].shape[0], device=logprobs.device).index_add_(0, rows, logprobs)


@torch.no_grad()
def evaluate(
    model: PreTrainedModel, examples: Sequence[Tokenized], pad_id: int, *, batch_size: int = 8, progress: bool = True, desc: str = "eval",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Held-out loss (mean over response tokens) and perplexity; forward passes in ``dtype``
    (:mod:`fed_crash.core.precision`), the loss summed in fp32.

    The examples are batched by length: the loss is a sum over tokens, so the order does not
    change it, and a batch of similar lengths pads less (a random batch of Alpaca rows pads to
    its longest)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    by_length = sorted(examples, key=lambda e: len(e.input_ids))
    with linear_weights_in(dtype, model, frozen_only=False):
        for batch in tqdm(list(batches(by_length, batch_size, pad_id)), desc=desc, disable=not progress, leave=False):
            with autocast(dtype, device):
                loss, n = response_loss(model, batch)
            total, tokens = total + float(loss), tokens + n
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": tokens}


def _lora_targets(emulator: Emulator) -> list[str]:
    """Full names of the linear layers inside the adapter positions (not the frozen middle)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    prefix = emulator.prefix
    names = []
    for pos, _src in emulator.adapter_positions():
        layer = emulator.model.get_submodule(f"{prefix}.{pos}")
        names += [f"{prefix}.{pos}.{n}" for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return names


LORA_U = "lora_u/"  # ArrayRecord key prefixes of a low-rank adapter update (see lora_factors)
LORA_V = "lora_v/"


def lora_factors(emulator: Emulator) -> dict[str, torch.Tensor]:
    """The LoRA update of the adapters in low-rank form, read from the peft layers of an
    emulator being trained with LoRA (before merging): for each adapted weight under full-model
    key K, ``lora_u/K`` (rows x r) and ``lora_v/K`` (r x cols) with ``W_trained = W_start + U @ V``
    in W's own layout (GPT-2's transposed Conv1D included, scaling folded into one factor).

    A data owner uploads these instead of the dense adapters: r * (rows + cols) numbers per
    weight instead of rows * cols (0.2% of SmolLM2 at rank 8 instead of 10.5%). The weights
    LoRA does not adapt (norms) cannot change under LoRA, so the server keeps its own copy.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for src, layer in emulator.adapter_modules():
        for name, module in layer.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            a = module.lora_A["default"].weight.detach()
            b = module.lora_B["default"].weight.detach() * module.scaling["default"]
            u, v = (a.T, b.T) if getattr(module, "fan_in_fan_out", False) else (b, a)
            key = f"{emulator.prefix}.{src}.{name}.weight"
            out[LORA_U + key], out[LORA_V + key] = u.to("cpu").contiguous(), v.to("cpu").contiguous()
    return out


def proximal_term(params: Sequence[nn.Parameter], coefficient: float) -> Callable[[], torch.Tensor]:
    """``coefficient * ||w - w_start||^2`` summed over ``params``, anchored at their values now:
    in federated training, the adapters the round started from.

    One form serves two methods: FedProx (Li et al., 2020) with ``coefficient = mu / 2``, and the
    FedBiOT regulariser (Wu et al., KDD 2024) ``lambda * ||.||^2`` that keeps the adapters tuned
    on the emulator close to the ones the server plugs into the full model. Use as
    :func:`train_adapters`'s ``extra_loss``.
    """
    params = list(params)
    anchors = [p.detach().clone() for p in params]

    def term() -> torch.Tensor:
        return coefficient * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))

    return term


@dataclass
class Training:
    """What :func:`train_adapters` did. ``lora_factors``: under LoRA, the update in low-rank
    form (:func:`lora_factors`), all a federated client needs to upload; empty otherwise."""

    train_loss: float  # mean loss of the last tenth of the steps
    first_loss: float
    steps: int
    trainable: int  # the LoRA factors' size under LoRA, the adapters' otherwise
    tokens: int
    seconds: float
    step_seconds: float  # median of one step after the first (which pays for lazy allocations)
    first_step_seconds: float
    lora_factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, float]:
        """The numbers, for reports (JSON)."""
        return {k: v for k, v in asdict(self).items() if k != "lora_factors"}


def _step(model, batch: dict, params: list, optimizer, grad_clip: float, extra_loss: Callable[[], torch.Tensor] | None,
          dtype: torch.dtype) -> tuple[float, int]:
    """One optimizer step on ``batch``: the mean response-token loss (plus ``extra_loss``),
    gradients clipped to ``grad_clip`` when > 0. The forward pass and loss run in ``dtype``
    (autocast), the backward pass outside it, as torch.autocast asks; parameters, gradients and
    AdamW's state stay fp32. Returns the batch's mean loss (without the extra term) and its
    labelled tokens."""
    with autocast(dtype, params[0].device):
        loss_sum, n = response_loss(model, batch)
        loss = loss_sum / max(n, 1)
        if extra_loss is not None:
            loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss_sum.detach()) / max(n, 1), n


def _trainable(emulator: Emulator, cfg: TrainConfig):
    """The parameters to optimise and, under LoRA, the peft model wrapping the emulator."""
    if cfg.lora_rank <= 0:
        return emulator.trainable_parameters(), None
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        emulator.model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=_lora_targets(emulator))
    )
    return [p for p in peft_model.parameters() if p.requires_grad], peft_model


def _epochs(examples: Sequence[Tokenized], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches without end: epoch after epoch, each shuffled anew (seed + epoch)."""
    for epoch in itertools.count():
        yield from batches(examples, batch_size, pad_id, shuffle=True, seed=seed + epoch)


def train_adapters(
    emulator: Emulator,
    examples: Sequence[Tokenized],
    pad_id: int,
    cfg: TrainConfig,
    *,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Training:
    """Train the adapter layers of ``emulator`` in place; the middle stays frozen.

    With ``cfg.lora_rank`` > 0 only LoRA matrices on the adapter layers train (peft), and are
    merged into them afterwards, so the result is plain adapter weights either way (and the
    update's factors in :attr:`Training.lora_factors`).
    ``extra_loss`` is added to every step's loss (e.g. a proximal term in federated training).
    ``on_step`` is called with the step count after every optimizer step (fault injection
    raises from it: :func:`fed_crash.federation.faults.crash_midway`).
    ``dtype``: the compute dtype of forward passes (:func:`fed_crash.core.precision.compute_dtype`).
    """
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    model = emulator.model
    params, peft_model = _trainable(emulator, cfg)
    steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * math.ceil(len(examples) / cfg.batch_size)))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    model.train()
    losses, step_times, tokens, start = [], [], 0, time.perf_counter()
    bar = tqdm(total=steps, desc="train adapters", disable=not progress, leave=False)
    # the frozen middle in bf16 once, not cast at every step; the attention fastest for training on this device
    with linear_weights_in(dtype, model, frozen_only=True), training_attention(dtype, model):
        for step, batch in enumerate(itertools.islice(_epochs(examples, cfg.batch_size, pad_id, cfg.seed), steps), start=1):
            step_start = time.perf_counter()
            loss, n = _step(model, batch, params, optimizer, cfg.grad_clip, extra_loss, dtype)
            schedule.step()
            losses.append(loss)
            step_times.append(time.perf_counter() - step_start)
            tokens += n
            if on_step is not None:
                on_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if not progress and (step % max(1, steps // 10) == 0 or step == steps):
                log.info("step %d/%d  loss %.4f  %.1fs", step, steps, loss, time.perf_counter() - start)
    bar.close()
    model.eval()
    factors = lora_factors(emulator) if peft_model is not None else {}
    if peft_model is not None:
        peft_model.merge_and_unload()
    tail = losses[-max(1, len(losses) // 10) :]
    return Training(sum(tail) / len(tail), losses[0], len(losses), sum(p.numel() for p in params), tokens, time.perf_counter() - start,
                    statistics.median(step_times[1:] or step_times), step_times[0], factors)
