"""FedBiOT's server-side emulator alignment (Wu et al., "FedBiOT: LLM Local Fine-tuning in
Federated Learning without Full Model", KDD 2024).

Clients tune the adapters on the emulator, but the server plugs them into the full model; the
further the emulator's middle drifts from the full model's, the less the adapters' training
transfers. Between rounds the server therefore distils the emulator's middle span toward the
full model's on its public rows: with the current global adapters in both, the hidden states
entering the first top adapter layer should match. Only the emulator's kept middle layers
train (a shared layer is one module, trained once for all its positions); adapters, frozen
copies, embeddings and the full model stay as they are. The client side of FedBiOT is the
proximal regulariser (``fedbiot-lambda``, :func:`fed_crash.core.train.proximal_term`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from fed_crash.core.data import Tokenized, batches
from fed_crash.core.emulator import Emulator
from fed_crash.core.models import get_layers

log = logging.getLogger(__name__)


def _top_input(model: nn.Module, top_layer: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states ``model`` feeds into ``top_layer`` on ``batch``."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = top_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``||student - teacher||^2 / ||teacher||^2`` over the unpadded positions: scale-free, so
    one learning rate fits models whose hidden states differ in size."""
    keep = mask.to(student.device).unsqueeze(-1).to(student.dtype)
    return ((student - teacher) ** 2 * keep).sum() / ((teacher**2) * keep).sum().clamp_min(1e-12)


def align_emulator(
    emulator: Emulator,
    model: nn.Module,
    examples: Sequence[Tokenized],
    pad_id: int,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> dict[str, float]:
    """Distil ``emulator``'s kept middle layers toward ``model`` (the full model with the same
    adapters plugged in) for ``steps`` AdamW steps; returns the loss of the first and last step."""
    if not examples:
        raise ValueError("emulator alignment needs public examples")
    top = emulator.spec.num_layers - emulator.spec.top  # the first top adapter layer's index
    full_top = get_layers(model)[top]
    emu_layers = get_layers(emulator.model)
    emu_top = emu_layers[next(pos for pos, (src, role) in enumerate(emulator.spec.layer_map()) if src == top and role == "adapter")]
    middle = {id(m): m for m, (_, role) in zip(emu_layers, emulator.spec.layer_map()) if role == "kept"}
    params = [p for module in middle.values() for p in module.parameters()]
    emulator.model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()
    emulator.model.eval()  # no dropout: the target is the full model's deterministic hidden states
    losses: list[float] = []
    epoch = 0
    try:
        while len(losses) < steps:
            for batch in batches(examples, batch_size, pad_id, shuffle=True, seed=seed + epoch):
                with torch.no_grad():
                    teacher = _top_input(model, full_top, batch)
                loss = normalised_mse(_top_input(emulator.model, emu_top, batch), teacher, batch["attention_mask"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if len(losses) >= steps:
                    break
            epoch += 1
    finally:
        emulator.model.requires_grad_(False)
        for p in emulator.trainable_parameters():
            p.requires_grad_(True)
        model.train(was_training)
    log.info("emulator aligned to the full model: normalised MSE %.4f -> %.4f in %d steps", losses[0], losses[-1], len(losses))
    return {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)}
