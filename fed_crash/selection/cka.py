"""Layer representations and linear CKA (Kornblith et al., 2019) between them.

CRaSh compares layers by the similarity of the representations they produce for the same
inputs. Each layer's output is pooled to one vector per sample, giving a matrix
``X_l`` of shape (samples, hidden); linear CKA between layers i and j is

    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F * ||Y_c^T Y_c||_F)

with column-centred X_c, Y_c. It is 1 for identical representations and invariant to
orthogonal transforms and isotropic scaling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from fed_crash.core.precision import autocast
from fed_crash.core.models import get_layers
from fed_crash.core.plots import figure

Pooling = Literal["mean", "last", "weighted"]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two (samples, features) matrices."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def cka_matrix(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise linear CKA between L feature matrices, through centred Gram matrices
    (samples x samples), which is cheaper than feature cross products when samples < hidden."""
    grams = []
    n = features[0].shape[0]
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    for x in features:
        x = x.double()
        grams.append(centre @ (x @ x.T) @ centre)
    hsic = torch.stack([g.flatten() for g in grams])  # <K_i, K_j> = sum K_i * K_j
    gram_inner = hsic @ hsic.T
    norms = gram_inner.diagonal().sqrt()
    return gram_inner / torch.outer(norms, norms)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: Pooling = "mean", skip_first: int = 0, outlier: float = 0.0) -> torch.Tensor:
    """One vector per sample from (batch, seq, hidden) states over the positions in ``mask``.

    ``mean``: masked mean; ``last``: the last real token; ``weighted``: mean weighted by
    position (1, 2, ..., T), which favours later tokens that have seen more context.
    Attention sinks: the first token of a sample often carries one huge activation (on
    SmolLM2 a norm ~100x the others') that dominates the mean, so the pool measures little but
    sample length. ``skip_first`` leaves the first positions of every sample out;
    ``outlier`` > 0 also leaves out any position whose state norm exceeds ``outlier`` times the
    median norm of the sample's remaining positions.
    """
    mask = mask.to(hidden.dtype).clone()
    if skip_first:
        first = mask.argmax(1)  # first real position (left or right padding)
        for offset in range(skip_first):
            mask[torch.arange(mask.shape[0]), (first + offset).clamp(max=mask.shape[1] - 1)] = 0
    if outlier:
        norms = hidden.norm(dim=-1).masked_fill(mask == 0, float("nan"))
        median = norms.nanmedian(dim=1, keepdim=True).values
        mask = mask * ~(norms > outlier * median)
    if how == "last":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0]), last]
    if how == "weighted":
        mask = mask * torch.arange(1, mask.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)
    elif how != "mean":
        raise ValueError(f"unknown pooling {how!r}; expected mean, last or weighted")
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)


@torch.no_grad()
def layer_features(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    pooling: Pooling = "mean",
    skip_first: int = 0,
    outlier: float = 0.0,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Pooled output of every decoder layer (embedding output excluded), one (samples, hidden)
    float32 CPU matrix per layer. Read with forward hooks so that no architecture's own
    ``hidden_states`` conventions (e.g. the final norm folded into the last entry) leak in.
    The forward runs through the decoder only: the LM head (a third of SmolLM2's forward cost)
    produces nothing CKA needs, so CRaSh's clustering costs little more than one forward pass.
    ``dtype``: the forward passes' compute dtype (pooling is fp32)."""
    layers = get_layers(model)
    decoder = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    pooled: list[list[torch.Tensor]] = [[] for _ in layers]
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def save(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            pooled[index].append(pool(hidden.float(), current["mask"], pooling, skip_first, outlier).cpu())

        return save

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for batch in tqdm(list(batches), desc="layer features", disable=not progress):
            current["mask"] = batch["attention_mask"].to(device)
            with autocast(dtype, device):
                decoder(input_ids=batch["input_ids"].to(device), attention_mask=current["mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not pooled[0]:
        raise ValueError("no calibration samples to compute layer features from")
    return [torch.cat(chunks) for chunks in pooled]


def plot_cka(matrix: torch.Tensor, path: str | Path, *, title: str = "", clusters: Sequence[Sequence[int]] = ()) -> None:
    """Heatmap of a layer-by-layer CKA matrix, with cluster boundaries drawn when given."""
    from matplotlib.patches import Rectangle

    with figure(path, figsize=(6.5, 5.5)) as (fig, ax):
        image = ax.imshow(matrix.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, label="linear CKA")
        for cluster in clusters:
            lo, hi = cluster[0] - 0.5, cluster[-1] + 0.5
            ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, edgecolor="cyan", linewidth=1.2))
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(title or "layer-wise linear CKA", fontsize=9)


def plot_clusters(
    matrix: torch.Tensor, clusters: Sequence[Sequence[int]], kept: Sequence[int], adapters: Sequence[int], path: str | Path, *, title: str = ""
) -> None:
    """CRaSh's clusters over the layer axis: adjacent-layer CKA (layer l vs l + 1) as a line,
    each cluster as a coloured span with its kept representative marked, adapters shaded grey."""
    from matplotlib import colormaps

    n = matrix.shape[0]
    with figure(path, figsize=(8, 3.2)) as (_, ax):
        for layer in adapters:
            ax.axvspan(layer - 0.5, layer + 0.5, color="0.85", lw=0)
        colors = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # tab10's grey would read as an adapter
        for i, cluster in enumerate(clusters):
            ax.axvspan(cluster[0] - 0.5, cluster[-1] + 0.5, color=colors[i % len(colors)], alpha=0.25, lw=0)
            ax.text((cluster[0] + cluster[-1]) / 2, 1.005, str(i), ha="center", va="bottom", fontsize=7)
        adjacent = [float(matrix[i, i + 1]) for i in range(n - 1)]
        ax.plot([i + 0.5 for i in range(n - 1)], adjacent, color="black", marker=".", lw=1, label="CKA(l, l+1)")
        low = min(adjacent)
        ax.scatter(kept, [low - 0.02 * (1 - low + 1e-3)] * len(kept), marker="^", color="crimson", zorder=3, label="kept layer")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_xticks(range(0, n, 2 if n > 16 else 1))
        ax.set_xlabel("layer (grey: adapters; coloured spans: clusters, numbered)")
        ax.set_ylabel("adjacent linear CKA")
        ax.set_title(title or "CRaSh clusters", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
