"""FlowerTune's baseline: LoRA (Hu et al. 2021) on every linear layer of every decoder layer of
the full model, the base weights frozen (emulator method ``full-lora``).

What trains and travels is the LoRA matrices alone, ``<module>.lora_A`` (rank x in) and
``<module>.lora_B`` (out x rank, the scaling folded in: :func:`lora_state`) under the module's
name in the model, so FedAvg averages A and B separately, as FlowerTune does. ``B`` starts at zero: a freshly wrapped model
computes what the model computes. The matrices hang on the linear modules themselves (with a
forward hook) rather than in peft's wrappers, so the base weights keep their keys, the exchanged
keys are the model's own module names, and a model given LoRA once takes every round's matrices
by a plain copy (:func:`fed_crash.core.emulator.plug_in`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

from fed_crash.core.models import get_layers, layer_path

LORA_KEYS = (".lora_A", ".lora_B")


def _features(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an ``nn.Linear`` or of GPT-2's ``Conv1D`` (weight stored in x out)."""
    return tuple(module.weight.shape) if isinstance(module, nn.Linear) else tuple(module.weight.shape[::-1])


def _lora_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + F.linear(F.linear(inputs[0], module.lora_A), module.lora_B) * module.lora_scaling


def is_lora_key(key: str) -> bool:
    return key.endswith(LORA_KEYS)


def add_lora(model: nn.Module, rank: int, alpha: int) -> None:
    """Give every linear layer inside the decoder layers LoRA matrices (zero until loaded) and a
    forward hook adding ``(alpha / rank) * x A^T B^T`` to its output, in place. The module and
    its weight keep their names, so everything else that reads the model's state is unchanged;
    a model given LoRA before is left as it is, and a shared module (an emulator's repeated
    layer) gets it once."""
    for layer in {id(layer): layer for layer in get_layers(model)}.values():
        for module in layer.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and not hasattr(module, "lora_A"):
                (out_features, in_features), weight = _features(module), module.weight
                module.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=weight.dtype, device=weight.device))
                module.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
                module.lora_scaling = alpha / rank
                module._lora_hook = module.register_forward_hook(_lora_hook)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules :func:`add_lora` gave LoRA, by name in ``model``."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The exchange format: per module ``A`` and ``(alpha / rank) * B``, detached copies on the
    CPU. With the scaling folded into B the update is ``W + B A`` whatever alpha a client trained
    with, so the server plugs it in knowing only the rank, and averaging B averages the update."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A"] = module.lora_A.detach().to("cpu").clone()
        out[f"{name}.lora_B"] = (module.lora_B.detach() * module.lora_scaling).to("cpu")
    return out


@torch.no_grad()
def load_lora(model: nn.Module, state: dict[str, torch.Tensor], target: str) -> None:
    """Copy exchanged matrices (:func:`lora_state`'s format) into ``model``'s LoRA, checked
    against it (keys, shapes, dtypes, finite values)."""
    from fed_crash.core.emulator import check_adapters  # the one adapter check

    modules = lora_modules(model)
    check_adapters(state, {f"{n}.{p}": getattr(m, p) for n, m in modules.items() for p in ("lora_A", "lora_B")}, target)
    for name, module in modules.items():
        module.lora_A.copy_(state[f"{name}.lora_A"])
        module.lora_B.copy_(state[f"{name}.lora_B"] / module.lora_scaling)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for module in lora_modules(model).values() for p in (module.lora_A, module.lora_B)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every module's LoRA into its weight (``W += (alpha / rank) B A``) and remove it: a
    plain model again, to save and share."""
    for module in lora_modules(model).values():
        delta = (module.lora_B @ module.lora_A) * module.lora_scaling
        module.weight += delta if isinstance(module, nn.Linear) else delta.T
        module._lora_hook.remove()
        del module.lora_A, module.lora_B, module.lora_scaling, module._lora_hook


def initial_lora(model: nn.Module, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The matrices every client starts from, for ``model`` unwrapped: A drawn as
    ``nn.Linear`` draws its weights (Kaiming-uniform, a = sqrt(5), peft's default) from
    ``seed``, B zero. Keys are those :func:`add_lora` gives the wrapped model."""
    generator = torch.Generator().manual_seed(seed)
    prefix = layer_path(model)
    out = {}
    for index, layer in enumerate(get_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                out_features, in_features = _features(module)
                bound = 1 / math.sqrt(in_features)  # kaiming_uniform_ with a = sqrt(5): gain sqrt(1/3) * sqrt(3 / fan_in)
                key = f"{prefix}.{index}.{name}"
                out[key + ".lora_A"] = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
                out[key + ".lora_B"] = torch.zeros(out_features, rank)
    return out
