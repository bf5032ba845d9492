"""Emulator search: choose the kept middle layers whose emulator best imitates the full model.

OFT keeps layers uniformly and CRaSh keeps one per CKA cluster; neither looks at what the
emulator actually computes. An untuned emulator is the full model run through another sequence
of its own layers (adapters are the original layers until tuned; a shared position reuses a
kept layer; a frozen adapter copy is that adapter), so its fidelity can be measured directly:
the divergence between the emulator's and the full model's next-token distributions on the
calibration data's response tokens (KL, the default) or the normalised MSE of their last
hidden states.

:class:`Probe` measures that for any layer sequence. It runs the full model once, then keeps the
input of every position for the currently accepted sequence, so a candidate that differs from
it from position p on only runs positions p.. (moving one kept layer changes the tail only).
:func:`search_kept` starts from the better of the uniform and CRaSh sets and moves one kept
layer to a neighbouring position at a time, taking the first move that lowers the divergence,
until no move lowers it or the cap on probe evaluations is reached. Every accepted step is
returned for the manifest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fed_crash.core.data import IGNORE
from fed_crash.core.emulator import EmulatorSpec, SpecError
from fed_crash.core.precision import autocast
from fed_crash.core.models import get_layers, set_layers

log = logging.getLogger(__name__)

Divergence = Literal["kl", "mse"]


def layer_sequence(spec: EmulatorSpec) -> tuple[int, ...]:
    """The full model's layer that runs at each position of the untuned emulator."""
    return tuple(src for src, _role in spec.layer_map())


@contextlib.contextmanager
def _run_as(model: nn.Module, sources: Sequence[int], start: torch.Tensor | None) -> Iterator[list[torch.Tensor]]:
    """Make ``model`` run its layers ``sources`` in order, optionally with ``start`` replacing the
    first layer's input (the embeddings are computed and ignored), and collect each position's
    input hidden state in the yielded list. Restores the model afterwards."""
    original = get_layers(model)
    config = model.config
    saved = config.num_hidden_layers, getattr(config, "layer_types", None)
    inputs: list[torch.Tensor] = []

    def take(_module, args, kwargs):
        hidden = start if start is not None and not inputs else (args[0] if args else kwargs["hidden_states"])
        inputs.append(hidden)
        if start is not None and len(inputs) == 1:
            return (hidden, *args[1:]) if args else args, {**kwargs, **({} if args else {"hidden_states": hidden})}
        return None

    tail = nn.ModuleList([original[i] for i in sources])
    handles = [module.register_forward_pre_hook(take, with_kwargs=True) for module in {id(m): m for m in tail}.values()]
    set_layers(model, tail)
    config.num_hidden_layers = len(tail)
    if saved[1]:
        config.layer_types = [saved[1][i] for i in sources]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()
        set_layers(model, original)
        config.num_hidden_layers = saved[0]
        if saved[1]:
            config.layer_types = saved[1]


class Probe:
    """Zero-shot divergence of emulators of ``model`` from the model itself on ``batches``
    (dicts of input_ids, attention_mask, labels; labels mark the response tokens scored)."""

    def __init__(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], divergence: Divergence = "kl",
                 dtype: torch.dtype = torch.float32) -> None:
        if divergence not in ("kl", "mse"):
            raise SpecError(f"unknown divergence {divergence!r}; expected 'kl' or 'mse'")
        self.model, self.divergence, self.dtype = model, divergence, dtype
        self.device = next(model.parameters()).device
        self.batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        if not self.batches:
            raise SpecError("emulator search needs calibration samples")
        self.evaluations = 0
        self._last: tuple[tuple[int, ...], list[list[torch.Tensor]]] | None = None  # the last full evaluation's states
        self.current: tuple[int, ...] = ()
        self.states: list[list[torch.Tensor]] = []  # per batch: input of each position of self.current
        self.targets = [self._outputs(b, None) for b in self.batches]
        # the divergence's denominator: scored tokens (kl) or the full model's squared norm (mse)
        self.norm = max(sum(float(t.shape[0]) if divergence == "kl" else float(t.pow(2).sum()) for t in self.targets), 1e-12)
        self.accept(tuple(range(len(get_layers(model)))))

    def _where(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"][:, 1:] != IGNORE

    @torch.no_grad()
    def _outputs(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities (kl) or last hidden states (mse) at the scored positions, from the
        model's own forward (``hidden`` None) or from a final hidden state."""
        if hidden is None:
            with autocast(self.dtype, self.device):
                hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        hidden = hidden[:, :-1][self._where(batch)].float()
        if self.divergence == "mse":
            return hidden
        logits = self.model.get_output_embeddings()(hidden.to(next(self.model.parameters()).dtype)).float()
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def _run(self, sequence: tuple[int, ...], batch_index: int, start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last hidden state of ``sequence`` run from position ``start`` on, and each run position's input."""
        batch = self.batches[batch_index]
        with _run_as(self.model, sequence[start:], self.states[batch_index][start] if start else None) as inputs, autocast(self.dtype, self.device):
            hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        return hidden, inputs

    def accept(self, sequence: tuple[int, ...]) -> None:
        """Make ``sequence`` the current one: cache the input of each of its positions (those of
        the evaluation just done when it was of this sequence, over every batch: no new run)."""
        sequence = tuple(sequence)
        last, self._last = self._last, None
        start = self._shared_prefix(sequence)
        states = []
        for i in range(len(self.batches)):
            inputs = last[1][i] if last is not None and last[0] == sequence else self._run(sequence, i, start)[1]
            states.append((self.states[i][:start] if start else []) + inputs)
        self.current, self.states = sequence, states

    def _shared_prefix(self, sequence: Sequence[int]) -> int:
        n = 0
        for a, b in zip(sequence, self.current):
            if a != b:
                break
            n += 1
        return min(n, len(sequence) - 1, len(self.current) - 1) if self.current else 0

    @torch.no_grad()
    def __call__(self, sequence: Sequence[int], bound: float = float("inf")) -> float:
        """Mean KL(full || emulator) per scored token, or sum ||h_e - h_f||^2 / sum ||h_f||^2.

        Both are sums of non-negative terms over batches divided by a constant, so once the
        batches done reach ``bound`` the rest cannot bring the value below it: the evaluation
        stops there and returns that partial value (at least ``bound``). A search that only asks
        "is this below the best so far?" gets the same answer for less."""
        sequence = tuple(sequence)
        start = self._shared_prefix(sequence)
        self.evaluations += 1
        total, kept = 0.0, []
        for i, (batch, target) in enumerate(zip(self.batches, self.targets)):
            hidden, inputs = self._run(sequence, i, start)
            kept.append(inputs)
            out = self._outputs(batch, hidden)
            if self.divergence == "kl":
                total += float(F.kl_div(out, target, log_target=True, reduction="sum"))
            else:
                total += float((out - target).pow(2).sum())
            if total / self.norm >= bound and i + 1 < len(self.batches):
                kept = []
                break
        self._last = (sequence, kept) if kept else None  # accepting it next needs no run
        return total / self.norm


def search_kept(probe: Probe, starts: Sequence[EmulatorSpec], *, max_evaluations: int = 200) -> tuple[EmulatorSpec, list[dict]]:
    """Greedy search from the best of ``starts`` (same budget, adapters and sharing): returns
    the spec with the lowest divergence found (method ``search``) and the accepted steps, each
    ``{"kept", "divergence", "evaluations", "from"}``; divergences fall strictly along them.

    The kept layers are visited in turn; each tries a move one position down, then up (within
    the middle span, onto a layer not kept), and the first move that lowers the divergence is
    taken. The search stops when a full pass over the kept layers finds no such move or after
    ``max_evaluations`` evaluations. First improvement rather than best improvement: with
    2k candidate moves per pass, a capped search takes many more steps this way."""
    if not starts or len({(len(s.kept), s.bottom, s.top, s.num_layers, s.share, s.edge_fill) for s in starts}) != 1:
        raise SpecError("search needs start specs of one budget, adapter split and sharing")
    cap = probe.evaluations + max_evaluations  # a probe may serve several searches
    scored = sorted(((probe(layer_sequence(s)), n, s) for n, s in enumerate(starts)), key=lambda t: (t[0], t[1]))
    best, _, spec = scored[0]
    spec = replace(spec, method="search", clusters=())
    first = probe.evaluations - len(starts)
    steps = [{"kept": list(spec.kept), "divergence": best, "evaluations": len(starts), "from": starts[scored[0][1]].method}]
    probe.accept(layer_sequence(spec))
    j, unimproved = 0, 0  # first improvement: scan the kept layers in turn, take a move as soon as it helps
    while probe.evaluations < cap and unimproved < len(spec.kept):
        layer = spec.kept[j]
        for moved in (layer - 1, layer + 1):
            if moved not in spec.middle or moved in spec.kept or probe.evaluations >= cap:
                continue
            candidate = replace(spec, kept=tuple(sorted(spec.kept[:j] + (moved,) + spec.kept[j + 1:])))
            divergence = probe(layer_sequence(candidate), bound=best)  # stops early once it cannot beat best
            if divergence < best:
                best, spec, unimproved = divergence, candidate, -1
                probe.accept(layer_sequence(spec))
                steps.append({"kept": list(spec.kept), "divergence": best, "evaluations": probe.evaluations - first, "from": f"{layer}->{moved}"})
                log.info("search: %d -> %d, divergence %.4f (%d evaluations)", layer, moved, best, probe.evaluations - first)
                break
        unimproved += 1
        j = (j + 1) % len(spec.kept)
    return spec, steps
