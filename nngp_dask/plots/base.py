"""The figure and its file: one Agg-canvas Figure per drawing, a PNG of a fixed pixel size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["DPI", "MATPLOTLIB_HINT", "figure", "save_figure"]

MATPLOTLIB_HINT = "matplotlib is required for figures: pip install 'nngp-dask[plots]'"
DPI = 100


def figure(figsize: tuple[float, float], **kwargs: Any):
    """A new Figure on the Agg canvas, with no pyplot state (matplotlib imported here, lazily).

    Parameters
    ----------
    figsize : (float, float)
        Inches; the PNG is ``figsize * DPI`` pixels.
    **kwargs
        Passed to :class:`matplotlib.figure.Figure` (e.g. ``layout="constrained"``).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ImportError
        With the install hint, when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(MATPLOTLIB_HINT) from exc
    fig = Figure(figsize=figsize, dpi=DPI, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG of exactly ``figsize * DPI`` pixels, creating the folder.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path : str or Path

    Returns
    -------
    Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)  # no bbox_inches: the pixel size stays figsize * dpi
    return path
