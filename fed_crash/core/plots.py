"""One way to draw a figure to a file: matplotlib without a screen, laid out, saved, closed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def figure(path: str | Path, *, figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, squeeze: bool = True, dpi: int = 120) -> Iterator:
    """``with figure(path, figsize=(6, 4)) as (fig, ax): ax.plot(...)`` writes ``path`` on exit
    (``ax`` is the axes array when ``nrows``/``ncols`` ask for several, as in ``plt.subplots``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
