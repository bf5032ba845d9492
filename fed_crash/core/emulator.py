"""The emulator: which layers a data owner gets, how they are arranged, and the runnable model.

A model with L decoder layers is cut into bottom adapters ``[0, bottom)``, a middle span
``[bottom, L - top)`` and top adapters ``[L - top, L)``. The adapters are trained by the data
owners; the middle span is compressed into the frozen emulator by keeping k of its layers.

Which k (:mod:`fed_crash.selection`: uniform, CRaSh, search) is not this module's concern;
sharing fills each removed position with the nearest kept layer, as the same module, so the
emulator keeps the model's depth at the size of k layers.

:class:`EmulatorSpec` is the single description of all of this; :func:`assemble` turns a spec
plus weights into a runnable causal LM, both on the server (from the full model) and on a
client (from the emulator files), so the two never drift apart.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from fed_crash.core.lora import add_lora, initial_lora, is_lora_key, load_lora, lora_parameters, lora_state
from fed_crash.core.models import get_layers, layer_path, set_layers, tied_head
from fed_crash.errors import FedCrashError

EdgeFill = Literal["nearest", "adapter"]
FROZEN_PREFIX = "frozen_copy"  # state-dict prefix of frozen copies of initial adapter layers


class SpecError(FedCrashError):
    """An emulator spec that does not fit the model; the message names the numbers."""


class AdapterError(FedCrashError):
    """Adapters that do not match the model or emulator; the message names the tensor."""


CEILING = "full"  # the method that keeps every middle layer: no emulator, the privacy-free ceiling
FULL_LORA = "full-lora"  # FlowerTune's baseline: LoRA on every linear layer of the full model (fed_crash.core.lora)


@dataclass(frozen=True)
class EmulatorSpec:
    """Which layers are adapters, which middle layers are kept, and what fills the rest.

    ``share``: fill each removed middle position with the nearest kept layer (ties go to the
    right), tied, so the emulator keeps full depth; off gives a shallower emulator of the kept
    layers only. ``edge_fill="adapter"``: removed positions between an adapter and the first
    (last) kept layer are filled with a frozen copy of that adapter's initial weights instead.
    """

    num_layers: int
    bottom: int
    top: int
    kept: tuple[int, ...]
    share: bool = True
    edge_fill: EdgeFill = "nearest"
    method: str = "uniform"
    clusters: tuple[tuple[int, ...], ...] = field(default=())
    selection: dict = field(default_factory=dict, compare=False)  # how the kept set was chosen (JSON): pooling, search steps
    lora_rank: int = 0  # > 0: what trains is LoRA of this rank on every linear layer (FULL_LORA), not adapter layers
    lora_alpha: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", tuple(int(i) for i in self.kept))
        object.__setattr__(self, "clusters", tuple(tuple(int(i) for i in c) for c in self.clusters))
        L, b, t = self.num_layers, self.bottom, self.top
        if b < 0 or t < 0:
            raise SpecError(f"adapter layer counts must be >= 0, got bottom={b}, top={t}")
        if b + t >= L:
            raise SpecError(
                f"adapters overlap or leave no middle layer: bottom {b} + top {t} = {b + t} "
                f">= {L} layers in the model"
            )
        if not self.kept:
            raise SpecError("an emulator must keep at least one middle layer")
        if list(self.kept) != sorted(set(self.kept)):
            raise SpecError(f"kept layers must be distinct and ascending, got {list(self.kept)}")
        outside = [i for i in self.kept if not b <= i < L - t]
        if outside:
            raise SpecError(f"kept layers {outside} are outside the middle span {b}..{L - t - 1}")
        if self.lora_rank < 0 or (self.lora_rank and (b or t or self.removed or self.lora_alpha <= 0)):
            raise SpecError(f"LoRA on every layer (rank {self.lora_rank}, alpha {self.lora_alpha}) takes a positive rank and alpha, "
                            f"no adapter layers (bottom {b}, top {t}) and no removed layer")
        if self.edge_fill not in ("nearest", "adapter"):
            raise SpecError(f"edge_fill must be 'nearest' or 'adapter', got {self.edge_fill!r}")

    @property
    def adapters(self) -> tuple[int, ...]:
        return tuple(range(self.bottom)) + tuple(range(self.num_layers - self.top, self.num_layers))

    @property
    def middle(self) -> range:
        return range(self.bottom, self.num_layers - self.top)

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(i for i in self.middle if i not in self.kept)

    def sharing_map(self) -> dict[int, int | None]:
        """Each removed position -> the layer whose weights fill it (a kept layer, or an adapter
        layer whose frozen initial copy fills it), or None when sharing is off."""
        out: dict[int, int | None] = {}
        for pos in self.removed:
            if not self.share:
                out[pos] = None
            elif self.edge_fill == "adapter" and self.bottom and pos < self.kept[0]:
                out[pos] = self.bottom - 1
            elif self.edge_fill == "adapter" and self.top and pos > self.kept[-1]:
                out[pos] = self.num_layers - self.top
            else:
                out[pos] = min(self.kept, key=lambda k: (abs(k - pos), -k))  # ties go right
        return out

    def layer_map(self) -> list[tuple[int, str]]:
        """The emulator's layers bottom to top: (source layer, role), role one of
        ``adapter`` (trainable), ``kept``, ``shared`` (a kept layer repeated, same module)
        and ``frozen_copy`` (a frozen copy of an adapter layer's initial weights)."""
        fill = self.sharing_map()
        out = []
        for pos in range(self.num_layers):
            if pos in self.adapters:
                out.append((pos, "adapter"))
            elif pos in self.kept:
                out.append((pos, "kept"))
            elif fill[pos] is not None:
                out.append((fill[pos], "frozen_copy" if fill[pos] in self.adapters else "shared"))
        return out

    def slots(self) -> list[tuple[int, str]]:
        """Distinct modules the emulator stores: adapter and kept layers (role ``layer``) in
        index order, then frozen copies. Shared positions reuse a slot; nothing is stored twice."""
        layers = [(i, "layer") for i in sorted(self.adapters + self.kept)]
        copies = sorted({src for src, role in self.layer_map() if role == "frozen_copy"})
        return layers + [(i, "frozen_copy") for i in copies]

    def to_dict(self) -> dict:
        """JSON-native (lists, not tuples), so a dict read back from a manifest compares equal."""
        return {**asdict(self), "kept": list(self.kept), "clusters": [list(c) for c in self.clusters], "selection": dict(self.selection)}

    @classmethod
    def from_dict(cls, data: dict) -> "EmulatorSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown emulator spec fields {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        kinds = {"adapter": "A", "kept": "K", "shared": "S", "frozen_copy": "F"}
        cells = " ".join(f"{src}{kinds[role]}" for src, role in self.layer_map())
        if self.lora_rank:
            return f"{self.method}: LoRA rank {self.lora_rank} (alpha {self.lora_alpha}) on every linear layer of all {self.num_layers} layers, all frozen"
        return (
            f"{self.method}: {self.bottom}+{len(self.kept)}+{self.top} of {self.num_layers} layers, "
            f"depth {len(self.layer_map())}, share={self.share}\n  [{cells}]\n"
            "  (A adapter, K kept, S shared kept layer, F frozen adapter copy)"
        )


def _split_key(key: str, prefix: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up.weight`` -> (3, ``mlp.up.weight``); None for non-layer keys."""
    if not key.startswith(prefix + "."):
        return None
    index, _, rest = key[len(prefix) + 1 :].partition(".")
    return int(index), rest


def emulator_state(model: PreTrainedModel, spec: EmulatorSpec) -> dict[str, torch.Tensor]:
    """What the emulator file holds: non-layer weights (embeddings, final norm, untied head),
    kept layers under their original index, frozen adapter copies under ``frozen_copy.<i>``.
    Adapters are shipped separately; removed layers never appear."""
    _check_depth(model, spec)
    prefix = layer_path(model)
    copies = {src for src, kind in spec.slots() if kind == "frozen_copy"}
    out = {}
    for key, tensor in model.state_dict().items():
        split = _split_key(key, prefix)
        if split is None:
            if not tied_head(model.config, key):
                out[key] = tensor
            continue
        index, rest = split
        if index in spec.kept:
            out[key] = tensor
        if index in copies:
            out[f"{FROZEN_PREFIX}.{index}.{rest}"] = tensor
    return out


def layer_matrix_keys(model: PreTrainedModel, keys) -> set[str]:
    """The keys among ``keys`` (an :func:`emulator_state` layout: a layer's tensors under its
    index or under ``frozen_copy.<i>``) that are the weight of a decoder layer's ``nn.Linear``:
    the tensors bf16 compute multiplies in bf16 (:func:`fed_crash.core.precision.linear_weights_in`),
    so storing them rounded to bf16 changes nothing a bf16 pass computes. Embeddings and norms,
    which start and scale the fp32 residual stream, are not among them."""
    layer = get_layers(model)[0]
    matrices = {f"{name}.weight" for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    prefix = layer_path(model)
    found = set()
    for key in keys:
        split = (_split_key(key, FROZEN_PREFIX) if key.startswith(FROZEN_PREFIX + ".") else _split_key(key, prefix))
        if split is not None and split[1] in matrices:
            found.add(key)
    return found


def emulator_weights(emulator: "Emulator") -> dict[str, torch.Tensor]:
    """An assembled emulator's own non-adapter weights under the keys :func:`emulator_state`
    writes (the inverse of :func:`assemble`), so an emulator changed after the cut (FedBiOT's
    alignment) is written and sent like one cut from the full model."""
    model, spec, prefix = emulator.model, emulator.spec, emulator.prefix
    out = {key: tensor for key, tensor in model.state_dict().items()
           if _split_key(key, prefix) is None and not tied_head(model.config, key)}
    layers = get_layers(model)
    for pos, (src, role) in enumerate(spec.layer_map()):
        if role in ("kept", "frozen_copy"):  # adapters travel apart; shared positions repeat a kept layer
            name = f"{prefix}.{src}" if role == "kept" else f"{FROZEN_PREFIX}.{src}"
            out.update({f"{name}.{rest}": tensor for rest, tensor in layers[pos].state_dict().items()})
    return out


def adapter_state(model: PreTrainedModel, spec: EmulatorSpec) -> dict[str, torch.Tensor]:
    """The adapter layers of a full model, keyed by their original layer index; under LoRA
    (``spec.lora_rank``) the matrices every client starts from (:func:`fed_crash.core.lora.initial_lora`)."""
    _check_depth(model, spec)
    if spec.lora_rank:
        return initial_lora(model, spec.lora_rank)
    prefix = layer_path(model)
    adapters = set(spec.adapters)
    return {
        key: tensor
        for key, tensor in model.state_dict().items()
        if (split := _split_key(key, prefix)) is not None and split[0] in adapters
    }


def _check_depth(model: PreTrainedModel, spec: EmulatorSpec) -> None:
    depth = len(get_layers(model))
    if depth != spec.num_layers:
        raise SpecError(f"the spec is for a {spec.num_layers}-layer model but this model has {depth} layers")


def check_adapters(adapters: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], target: str) -> None:
    """Exact keys, shapes and dtypes, and finite values; the error names the first offender."""
    missing = sorted(set(expected) - set(adapters))
    extra = sorted(set(adapters) - set(expected))
    if missing:
        raise AdapterError(f"adapters lack {len(missing)} tensors that {target} expects, e.g. {missing[0]!r}")
    if extra:
        raise AdapterError(f"adapters carry {len(extra)} tensors that {target} has no place for, e.g. {extra[0]!r}")
    for key, want in expected.items():
        got = adapters[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterError(f"adapter tensor {key!r} has shape {tuple(got.shape)}, {target} expects {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise AdapterError(f"adapter tensor {key!r} has dtype {got.dtype}, {target} expects {want.dtype}")
        if not torch.isfinite(got).all():
            raise AdapterError(f"adapter tensor {key!r} holds NaN or infinite values")


@torch.no_grad()
def plug_in(model: PreTrainedModel, adapters: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Write tuned adapters back into the full model at their original layer indices, in place.
    The expected key set is read from the adapters' own layer indices, checked against the model.
    LoRA matrices (``full-lora``) go into the model's LoRA, which the model is given the first time."""
    if any(is_lora_key(k) for k in adapters):
        rank = next((v.shape[0] for k, v in adapters.items() if k.endswith(".lora_A") and v.ndim == 2), 1)
        add_lora(model, rank, alpha=rank)  # scaling 1: the exchanged B holds the client's (lora_state)
        load_lora(model, adapters, "the full model")
        return model
    prefix = layer_path(model)
    state = model.state_dict()
    indices = set()
    for key in adapters:
        split = _split_key(key, prefix)
        if split is None or split[0] >= len(get_layers(model)):
            raise AdapterError(f"adapter tensor {key!r} names no decoder layer of this model ({prefix}.0-{len(get_layers(model)) - 1})")
        indices.add(split[0])
    expected = {k: v for k, v in state.items() if (s := _split_key(k, prefix)) is not None and s[0] in indices}
    check_adapters(adapters, expected, "the full model")
    for key, tensor in adapters.items():
        state[key].copy_(tensor)
    return model


@dataclass
class Emulator:
    """A runnable emulator: a causal LM whose layer list follows ``spec.layer_map()``, with only
    the adapter positions trainable. Adapter tensors are exchanged under the full model's keys."""

    model: PreTrainedModel
    spec: EmulatorSpec

    @property
    def prefix(self) -> str:
        return layer_path(self.model)

    def adapter_positions(self) -> list[tuple[int, int]]:
        """(emulator position, original layer index) of every adapter layer."""
        return [(pos, src) for pos, (src, role) in enumerate(self.spec.layer_map()) if role == "adapter"]

    def adapter_modules(self) -> list[tuple[int, nn.Module]]:
        layers = get_layers(self.model)
        return [(src, layers[pos]) for pos, src in self.adapter_positions()]

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The live adapter tensors (no copy) under the full model's keys."""
        return {
            f"{self.prefix}.{src}.{name}": tensor
            for src, module in self.adapter_modules()
            for name, tensor in module.state_dict().items()
        }

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Current adapter weights, detached copies on CPU, under the full model's keys (LoRA's
        matrices in their exchange format under ``full-lora``: :func:`fed_crash.core.lora.lora_state`)."""
        if self.spec.lora_rank:
            return lora_state(self.model)
        return {key: tensor.detach().to("cpu").clone() for key, tensor in self._adapter_tensors().items()}

    @torch.no_grad()
    def load_adapters(self, adapters: dict[str, torch.Tensor]) -> None:
        """Copy ``adapters`` into the adapter layers, checked against them in place (every round
        on client and server: no copy of the adapters just to read their shapes)."""
        if self.spec.lora_rank:
            return load_lora(self.model, adapters, "the emulator")
        live = self._adapter_tensors()
        check_adapters(adapters, live, "the emulator")
        for key, tensor in live.items():
            tensor.copy_(adapters[key])

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.spec.lora_rank:
            return lora_parameters(self.model)
        return [p for _, module in self.adapter_modules() for p in module.parameters()]


def assemble(config: PretrainedConfig, state: dict[str, torch.Tensor], spec: EmulatorSpec) -> Emulator:
    """Build the emulator model from the source model's config and the emulator + adapter
    weights (keys as written by :func:`emulator_state` and :func:`adapter_state`).

    The frozen layers *are* the tensors of ``state`` (no copy, no random initialisation first):
    a data owner's emulator then costs its size once in memory, not twice, and assembles
    faster. The adapter layers, which train, get copies, so the caller's tensors never change.
    """
    lora = {k: v for k, v in state.items() if is_lora_key(k)}  # full-lora's matrices go in once the model has LoRA
    state = {k: v for k, v in state.items() if k not in lora}
    slots = spec.slots()
    slot_of = {slot: i for i, slot in enumerate(slots)}
    cfg = copy.deepcopy(config)
    layer_types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(slots)
    if layer_types:
        cfg.layer_types = [layer_types[src] for src, _ in slots]
    cfg.use_cache = False  # shared modules carry one layer_idx each: a KV cache would collide
    dtype = next(iter(state.values())).dtype
    with no_init_weights():  # every weight is replaced below; untouched allocations cost no memory
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    prefix = layer_path(model)
    mapped = {}
    for key, tensor in state.items():
        if key.startswith(FROZEN_PREFIX + "."):
            index, _, rest = key[len(FROZEN_PREFIX) + 1 :].partition(".")
            mapped[f"{prefix}.{slot_of[(int(index), 'frozen_copy')]}.{rest}"] = tensor
        elif (split := _split_key(key, prefix)) is not None:
            if (split[0], "layer") not in slot_of:
                raise SpecError(f"weights hold layer {split[0]}, which this emulator spec does not use")
            mapped[f"{prefix}.{slot_of[(split[0], 'layer')]}.{split[1]}"] = tensor.clone() if split[0] in spec.adapters else tensor
        else:
            mapped[key] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False, assign=True)
    missing = [k for k in missing if not tied_head(cfg, k)]
    if missing or unexpected:
        raise SpecError(f"emulator weights do not fit the spec: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    stored = get_layers(model)
    order = [slot_of[(src, "frozen_copy" if role == "frozen_copy" else "layer")] for src, role in spec.layer_map()]
    set_layers(model, nn.ModuleList([stored[i] for i in order]))
    model.config.num_hidden_layers = len(order)
    if layer_types:
        model.config.layer_types = [layer_types[src] for src, _ in spec.layer_map()]
    emulator = Emulator(model, spec)
    model.requires_grad_(False)
    if spec.lora_rank:
        add_lora(model, spec.lora_rank, spec.lora_alpha)
        emulator.load_adapters(lora or initial_lora(model, spec.lora_rank))
    for param in emulator.trainable_parameters():
        param.requires_grad_(True)
    model.eval()
    return emulator


def build_emulator(model: PreTrainedModel, spec: EmulatorSpec) -> Emulator:
    """The emulator of an in-memory full model (fresh tensors: training it, or aligning its
    middle layers as FedBiOT does, leaves the model as is)."""
    frozen = {key: tensor.clone() for key, tensor in emulator_state(model, spec).items()}
    emulator = assemble(model.config, {**frozen, **adapter_state(model, spec)}, spec)
    emulator.model.to(next(model.parameters()).device)
    return emulator
