"""The compute dtype: bf16 autocast where the hardware runs it natively, fp32 otherwise.

Only forward passes (and the loss) run under :func:`autocast`; trainable weights, gradients,
optimizer state, aggregation and everything written stay fp32 (what travels is the wire dtype's
choice, run-config ``wire-dtype``, :func:`fed_crash.federation.protocol.to_wire`). Autocast
alone re-casts every fp32 weight at every matmul, so :func:`linear_weights_in` and
:func:`head_weight` hold bf16 copies for a whole pass. On this project's CPU (AVX512-BF16) a
client's training step is 1.44x and multiple-choice scoring 1.5-1.8x faster in bf16, with the
same accuracy (docs/benchmarks.md, table 7); CPUs without native bf16 emulate it slowly, so
``auto`` means fp32 there. Training in bf16 on a CPU attends with eager attention
(:func:`training_attention`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator

import torch

from fed_crash.config import COMPUTE_DTYPES

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or such a CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 where :func:`bf16_native`, else fp32; ``bf16`` / ``fp32`` force one."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if bf16_native(torch.device(device)) else torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` or ``"fp32"`` (as configs, manifests and metrics write it)."""
    return {v: k for k, v in _DTYPES.items()}[dtype]


@contextlib.contextmanager
def autocast(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Forward passes inside run in ``dtype`` (torch.autocast); fp32 is a no-op."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


CPU_BF16_TRAINING_ATTENTION = "eager"  # transformers' attention implementation for training in bf16 on a CPU


@contextlib.contextmanager
def training_attention(dtype: torch.dtype, model: torch.nn.Module) -> Iterator[None]:
    """Inside the block ``model`` attends with :data:`CPU_BF16_TRAINING_ATTENTION` (transformers'
    eager attention) when it trains in bf16 on a CPU; afterwards it has its own back.

    Why: on this project's CPU the backward pass of torch's fused SDPA kernel in bf16 takes 4x
    its forward, a sixth of a client's training step; eager attention makes the step 1.10-1.19x
    faster at the same distance from fp32. Forward-only passes keep the fused kernel: eager's
    gain there does not repeat between runs, and in multiple-choice scoring it moves OpenBookQA's
    accuracy 0.6 points from fp32 (docs/benchmarks.md, table 7, "Attention in bf16"). fp32 and
    CUDA keep the model's own attention."""
    config = getattr(model, "config", None)
    own = getattr(config, "_attn_implementation", None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype != torch.bfloat16 or not on_cpu or own in (None, CPU_BF16_TRAINING_ATTENTION) or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(CPU_BF16_TRAINING_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


@contextlib.contextmanager
def linear_weights_in(dtype: torch.dtype, model: torch.nn.Module, *, frozen_only: bool) -> Iterator[None]:
    """Inside the block the weights of ``model``'s linear layers are held in ``dtype``, so that
    autocast does not cast them again at every forward pass (it caches casts only of weights
    that require grad); afterwards the very fp32 tensors are back (nothing is rounded).
    ``frozen_only``: leave weights that require grad (training's adapters) in fp32. Weights
    tied to an embedding (the LM head of tied models) stay fp32: the embedding's output starts
    the residual stream, which autocast keeps in fp32."""
    if dtype == torch.float32:
        yield
        return
    tied = {p.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    swapped = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight.dtype == torch.float32 and weight.data_ptr() not in tied
                and not (frozen_only and weight.requires_grad)):
            swapped.append((weight, weight.data))
            weight.data = weight.data.to(dtype)
    try:
        yield
    finally:
        for weight, data in swapped:
            weight.data = data


_HEAD_COPIES: dict[int, tuple[int, torch.Tensor]] = {}  # id(weight) -> (its version when copied, the copy); dropped with the weight


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head's weight as the matmul should get it: under bf16 autocast, a bf16 copy kept
    until the weight changes (its version counter), instead of autocast's cast of the whole
    vocabulary matrix (28 M values for SmolLM2) at every call; the weight itself otherwise, and
    whenever a gradient must reach it."""
    device = weight.device.type
    if (weight.dtype != torch.float32 or not torch.is_autocast_enabled(device)
            or (weight.requires_grad and torch.is_grad_enabled())):
        return weight
    dtype = torch.get_autocast_dtype(device)
    cached = _HEAD_COPIES.get(id(weight))
    if cached is None or cached[0] != weight._version or cached[1].dtype != dtype:
        if cached is None:
            weakref.finalize(weight, _HEAD_COPIES.pop, id(weight), None)
        cached = (weight._version, weight.detach().to(dtype))
        _HEAD_COPIES[id(weight)] = cached
    return cached[1]
