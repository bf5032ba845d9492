"""Layer selection: which middle layers an emulator keeps, by method name.

Every method is one function registered once under its name (:func:`register`), with the
config dataclass of the options it reads, the way ``peft`` registers tuners; nothing else
dispatches on method names. A method gets a :class:`Selection` (the model's depth, the emulator
options, and CRaSh's CKA matrix and search's probe, computed on first use and shared) and
returns the :class:`~fed_crash.core.emulator.EmulatorSpec`:

* ``uniform`` (OFT, Xiao et al. 2023): layers ``round(i * (n - 1) / (k - 1))`` of the n middle layers;
* ``crash`` (CRaSh, Zhang et al. 2023): cluster adjacent middle layers by linear CKA and keep the
  middle layer of each cluster;
* ``search``: start from the better of the two and move kept layers while the divergence from
  the full model falls (:mod:`fed_crash.selection.search`);
* ``full``: every middle layer, so the adapters train on the full model itself. No privacy
  (clients receive the whole model): the ceiling an emulator is measured against;
* ``full-lora`` (FlowerTune's baseline): no adapter layers, LoRA on every linear layer of the
  full model (:mod:`fed_crash.core.lora`); no privacy either.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from fed_crash.config import CrashOptions, EmulatorConfig, FullLoraOptions, SearchOptions, SpecOptions
from fed_crash.core.emulator import CEILING, FULL_LORA, EdgeFill, EmulatorSpec, SpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    select: Callable[["Selection"], EmulatorSpec]
    config: type  # the options dataclass it reads (a part of EmulatorConfig)
    needs_calibration: bool  # runs the model on calibration rows (CKA)
    needs_probe: bool  # measures candidate emulators' divergence (search's probe)


METHODS: dict[str, Method] = {}


def register(name: str, *, config: type, needs_calibration: bool, needs_probe: bool = False) -> Callable:
    def decorate(select: Callable[["Selection"], EmulatorSpec]) -> Callable:
        if name in METHODS:
            raise ValueError(f"layer-selection method {name!r} is registered twice")
        METHODS[name] = Method(name, select, config, needs_calibration, needs_probe)
        return select

    return decorate


def method(name: str) -> Method:
    if name not in METHODS:
        raise SpecError(f"unknown emulator method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def needs_calibration(name: str) -> bool:
    """CRaSh (CKA) and search (divergence, starting from CRaSh) run the model on calibration rows."""
    return method(name).needs_calibration


@dataclass
class Selection:
    """What a method may use: the model's depth, the emulator options, and (computed on first
    use, then shared by every method that asks) the CKA matrix and the search probe."""

    num_layers: int
    emu: EmulatorConfig
    similarity_fn: Callable[[], torch.Tensor] | None = None
    probe_fn: Callable[[], Any] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        EmulatorSpec(self.num_layers, self.emu.bottom, self.emu.top, kept=(self.emu.bottom,))  # validates the adapters
        self.k = resolve_keep(len(self.middle), self.emu.keep or None, None if self.emu.keep else self.emu.keep_ratio)

    @property
    def middle(self) -> list[int]:
        return list(range(self.emu.bottom, self.num_layers - self.emu.top))

    def options(self, cls: type) -> Any:
        """The options dataclass ``cls`` filled from the emulator config."""
        return cls(**{f.name: getattr(self.emu, f.name) for f in dataclasses.fields(cls)})

    def similarity(self) -> torch.Tensor:
        if "similarity" not in self._cache:
            if self.similarity_fn is None:
                raise SpecError("method 'crash' needs a layer similarity (CKA) matrix")
            similarity = self.similarity_fn()
            if tuple(similarity.shape) != (self.num_layers, self.num_layers):
                raise SpecError(f"similarity is {tuple(similarity.shape)}, expected ({self.num_layers}, {self.num_layers})")
            self._cache["similarity"] = similarity
        return self._cache["similarity"]

    def probe(self):
        if "probe" not in self._cache:
            if self.probe_fn is None:
                raise SpecError("method 'search' needs a divergence probe on calibration rows (fed_crash.selection.plan.plan_emulator)")
            self._cache["probe"] = self.probe_fn()
        return self._cache["probe"]

    def spec(self, name: str, kept: Sequence[int], clusters: Sequence[Sequence[int]] = ()) -> EmulatorSpec:
        opts: SpecOptions = self.options(SpecOptions)
        return EmulatorSpec(self.num_layers, opts.bottom, opts.top, tuple(kept), opts.share, opts.edge_fill, name, tuple(map(tuple, clusters)))


def resolve_keep(middle: int, keep: int | None = None, keep_ratio: float | None = None) -> int:
    """Number of middle layers to keep, from a count or a ratio of the middle span.
    The default (0.4) gives 10 of 26 for a 30-layer model with 2+2 adapters."""
    if keep is not None and keep_ratio is not None:
        raise SpecError("give keep or keep_ratio, not both")
    if keep is None:
        ratio = 0.4 if keep_ratio is None else keep_ratio
        if not 0 < ratio <= 1:
            raise SpecError(f"keep_ratio must be in (0, 1], got {ratio}")
        keep = max(1, round(ratio * middle))
    if not 1 <= keep <= middle:
        raise SpecError(f"cannot keep {keep} layers: the middle span has {middle} layers")
    return keep


def uniform_indices(n: int, k: int) -> list[int]:
    """OFT's uniform choice of k of n layers: ``round(i * (n - 1) / (k - 1))``, first and last kept."""
    if k == 1:
        return [n // 2]
    stride = (n - 1) / (k - 1)
    return [round(i * stride) for i in range(k)]


def cluster_adjacent(similarity: torch.Tensor, layers: Sequence[int], k: int) -> list[list[int]]:
    """CRaSh clustering: start with one cluster per layer and repeatedly merge the adjacent pair
    whose boundary layers (last of the left, first of the right) are most similar, until k
    clusters remain. Ties merge the lowest pair first."""
    clusters = [[int(layer)] for layer in layers]
    if not 1 <= k <= len(clusters):
        raise SpecError(f"cannot form {k} clusters from {len(clusters)} layers")
    while len(clusters) > k:
        scores = [float(similarity[a[-1], b[0]]) for a, b in zip(clusters, clusters[1:])]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        clusters[best : best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


@register("uniform", config=SpecOptions, needs_calibration=False)
def uniform(selection: Selection) -> EmulatorSpec:
    middle = selection.middle
    return selection.spec("uniform", [middle[i] for i in uniform_indices(len(middle), selection.k)])


@register("crash", config=CrashOptions, needs_calibration=True)
def crash(selection: Selection) -> EmulatorSpec:
    clusters = cluster_adjacent(selection.similarity(), selection.middle, selection.k)
    return selection.spec("crash", [c[len(c) // 2] for c in clusters], clusters)


@register("search", config=SearchOptions, needs_calibration=True, needs_probe=True)
def search(selection: Selection) -> EmulatorSpec:
    from fed_crash.selection.search import search_kept

    opts: SearchOptions = selection.options(SearchOptions)
    start = time.perf_counter()
    probe = selection.probe()
    before = probe.evaluations
    spec, steps = search_kept(probe, [uniform(selection), crash(selection)], max_evaluations=opts.search_evaluations)
    log.info("search: kept %s after %d evaluations, %s %.4f -> %.4f", list(spec.kept), probe.evaluations - before, probe.divergence,
             steps[0]["divergence"], steps[-1]["divergence"])
    return replace(spec, selection={"divergence": probe.divergence, "search_samples": sum(len(b["input_ids"]) for b in probe.batches),
                                    "evaluations": probe.evaluations - before, "search_seconds": round(time.perf_counter() - start, 1), "steps": steps})


@register(CEILING, config=SpecOptions, needs_calibration=False)
def full(selection: Selection) -> EmulatorSpec:
    return selection.spec(CEILING, selection.middle)


@register(FULL_LORA, config=FullLoraOptions, needs_calibration=False)
def full_lora(selection: Selection) -> EmulatorSpec:
    opts: FullLoraOptions = selection.options(FullLoraOptions)
    every = tuple(range(selection.num_layers))
    return EmulatorSpec(selection.num_layers, 0, 0, every, share=False, method=FULL_LORA, lora_rank=opts.full_lora_rank, lora_alpha=opts.full_lora_alpha)


def make_spec(
    name: str,
    num_layers: int,
    *,
    bottom: int = 2,
    top: int = 2,
    keep: int | None = None,
    keep_ratio: float | None = None,
    share: bool = True,
    edge_fill: EdgeFill = "nearest",
    similarity: torch.Tensor | None = None,
) -> EmulatorSpec:
    """The spec of method ``name`` from plain arguments (``crash`` needs the L x L ``similarity``;
    ``search`` needs a probe: :func:`fed_crash.selection.plan.plan_emulator`)."""
    middle = EmulatorSpec(num_layers, bottom, top, kept=(bottom,)).middle  # validates the adapters
    emu = EmulatorConfig(method=name, bottom=bottom, top=top, keep=resolve_keep(len(middle), keep, keep_ratio), share=share, edge_fill=edge_fill)
    return method(name).select(Selection(num_layers, emu, similarity_fn=(lambda: similarity) if similarity is not None else None))
