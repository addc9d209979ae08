"""The result table of a sweep: one row per candidate, the chosen one, its plot and pipeline file."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..kernels import Architecture
from ..tomlfile import to_toml
from .grids import CRITERIA

__all__ = ["SweepResult"]

#: the columns of every row, in table order (run_sweep fills them)
COLUMNS = ("weight_var", "bias_var", "depth", "noise", "noise_abs", "accuracy", "rmse", "nlpd",
           "log_marginal_likelihood", "lml_stderr", "lml_method", "solver", "converged", "cg_iterations",
           "error")
_CRITERION_COLUMN = {"accuracy": "accuracy", "rmse": "rmse", "nlpd": "nlpd",
                     "marginal_likelihood": "log_marginal_likelihood"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass(frozen=True)
class SweepResult:
    """The outcome of :func:`run_sweep`: one row per candidate and the chosen one.

    Attributes
    ----------
    rows : tuple of dict
        Per candidate (grid order: weight_var, bias_var, depth, noise): the hyperparameters,
        ``noise_abs`` (the noise added to the diagonal), the validation metrics
        (``accuracy``, ``rmse``, ``nlpd``; None when not computed), ``log_marginal_likelihood``
        of the fit split with ``lml_stderr`` and ``lml_method`` ("exact" or "slq"), the
        ``solver``, CG ``converged``/``cg_iterations``, and ``error`` (a candidate whose
        ``K + noise I`` is not positive definite is kept, with the advice, and never chosen).
    criterion, task : str
    best_index : int or None
        Row of the chosen candidate (None when every candidate failed).
    timings : dict
        Seconds spent on the Gram (``gram_s``), the recursions (``recursion_s``), the solves
        (``solve_s``) and in all (``total_s``), and how many GEMMs and recursions ran.
    settings : dict
        activation, kind, normalize, dtype, relative_noise, targets, n_fit, n_val, classes, ...
    fit_index, val_index : ndarray or None
        Rows of ``x_train`` used to fit and to validate (None with an explicit ``x_val``).
    """

    rows: tuple[dict[str, Any], ...]
    criterion: str
    task: str
    best_index: int | None
    grid: dict[str, tuple]
    timings: dict[str, Any]
    settings: dict[str, Any]
    fit_index: NDArray[np.intp] | None = None
    val_index: NDArray[np.intp] | None = None

    @property
    def criterion_column(self) -> str:
        return _CRITERION_COLUMN[self.criterion]

    @property
    def best(self) -> dict[str, Any]:
        """The chosen candidate's row (a copy)."""
        if self.best_index is None:
            errors = {r.get("error") for r in self.rows}
            raise ValueError(f"sweep: no candidate could be evaluated; first error: {min(map(str, errors))}")
        return dict(self.rows[self.best_index])

    def to_rows(self) -> list[dict[str, Any]]:
        """Every candidate as a plain dict (copies), in grid order."""
        return [dict(r) for r in self.rows]

    def best_architecture(self) -> Architecture:
        b = self.best
        return Architecture(b["depth"], self.settings["activation"], b["weight_var"], b["bias_var"])

    def table(self, *, sort: bool = False, top: int | None = None) -> str:
        """A fixed-width text table; the chosen candidate is marked ``*``.

        Parameters
        ----------
        sort : bool
            Best first (by the criterion) instead of grid order.
        top : int, optional
            Only this many rows.
        """
        order = list(range(len(self.rows)))
        if sort:
            order = self._ranking()
            order += [i for i in range(len(self.rows)) if i not in order]
        if top is not None:
            order = order[:top]
        cols = [c for c in COLUMNS if any(self.rows[i].get(c) is not None for i in range(len(self.rows)))]
        if not self.settings.get("relative_noise"):
            cols = [c for c in cols if c != "noise_abs"]
        body = [[("*" if i == self.best_index else "")] + [_fmt(self.rows[i].get(c)) for c in cols] for i in order]
        header = [""] + cols
        widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(header)]
        widths[-1] = len(header[-1]) if cols and cols[-1] == "error" else widths[-1]  # errors run on
        fmt_row = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        title = (f"criterion: {self.criterion} ({'max' if CRITERIA[self.criterion] else 'min'}), "
                 f"task: {self.task}, n_fit={self.settings['n_fit']}, n_val={self.settings['n_val']}")
        lines = [title, fmt_row(header), fmt_row(["-" * w for w in widths])]
        lines += [fmt_row(r) for r in body]
        return "\n".join(lines)

    def _ranking(self) -> list[int]:
        col = self.criterion_column
        sign = -1.0 if CRITERIA[self.criterion] else 1.0
        ok = [i for i, r in enumerate(self.rows)
              if r.get(col) is not None and math.isfinite(r[col]) and not r.get("error")]

        def key(i: int):
            r = self.rows[i]
            tie = r.get("rmse") if self.criterion == "accuracy" and r.get("rmse") is not None else 0.0
            return (sign * r[col], tie, i)

        return sorted(ok, key=key)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Criterion over the grid: one panel per ``bias_var``, one line per depth against
        ``weight_var`` (best over the noises); the chosen candidate starred. Needs matplotlib.

        Returns the PNG's path.
        """
        from ..plots import figure, save_figure

        col = self.criterion_column
        larger = CRITERIA[self.criterion]
        bvs, wvs, depths = self.grid["bias_var"], sorted(self.grid["weight_var"]), sorted(self.grid["depth"])
        fig = figure((3.6 * len(bvs) + 0.8, 3.8))
        axes = fig.subplots(1, len(bvs), sharey=True, squeeze=False)[0]
        best = self.rows[self.best_index] if self.best_index is not None else None
        # depths often tie (the same accuracy): distinct markers, the first the largest, keep
        # every line visible where they overlap
        styles = [dict(marker=m, markersize=ms, linestyle=ls, markerfacecolor="none" if i == 0 else None)
                  for i, (m, ms, ls) in enumerate(zip("osD^v<>ph" * 3, np.linspace(11, 4, max(len(depths), 2)),
                                                      ["-", "--", ":", "-."] * 8))]
        for ax, bv in zip(axes, bvs):
            for depth, style in zip(depths, styles):
                ys = []
                for wv in wvs:
                    vals = [r[col] for r in self.rows if r["bias_var"] == bv and r["weight_var"] == wv
                            and r["depth"] == depth and r.get(col) is not None and math.isfinite(r[col])
                            and not r.get("error")]
                    ys.append((max(vals) if larger else min(vals)) if vals else np.nan)
                ax.plot(wvs, ys, label=f"depth {depth}", **style)
            if best is not None and best["bias_var"] == bv:
                ax.plot([best["weight_var"]], [best[col]], marker="*", markersize=16, color="k", linestyle="none",
                        label="chosen")
            ax.set_title(f"bias_var = {bv:g}")
            ax.set_xlabel("weight_var")
            ax.grid(alpha=0.3)
        what = "validation " + col if col in ("accuracy", "rmse", "nlpd") else col
        axes[0].set_ylabel(f"{what} (best over noise)")
        if col == "accuracy":
            axes[0].set_ylim(top=1.0)  # shared y: no room above a perfect score
        shown = {lbl: h for ax in axes for h, lbl in zip(*ax.get_legend_handles_labels())}
        axes[-1].legend(shown.values(), shown.keys(), fontsize=8)
        fig.suptitle(title or f"{self.settings.get('activation_name', '')} sweep: {what}, "
                     f"{'higher' if larger else 'lower'} is better")
        fig.tight_layout()
        return save_figure(fig, path)

    def best_pipeline_toml(self, template: Mapping[str, Any] | None = None) -> str:
        """A pipeline file (TOML text) with the chosen hyperparameters.

        The template's sections are kept; ``[architecture]`` gets depth, activation,
        weight_var and bias_var, ``[solver]`` the noise actually added to the diagonal
        (``noise_abs``), and, so that the pipeline rebuilds the kernel that was selected,
        ``[data] normalize`` and ``[kernel] kind`` too.
        """
        b = self.best
        data: dict[str, Any] = {}
        for key, value in (template or {}).items():
            data[key] = dict(value) if isinstance(value, Mapping) else value
        act = self.settings["activation"]
        # a name alone, or an inline table of the name and the activation's parameters
        data.setdefault("architecture", {}).update(depth=int(b["depth"]), activation=act["name"] if set(act) == {"name"}
                                                   else dict(act),
                                                   weight_var=float(b["weight_var"]),
                                                   bias_var=float(b["bias_var"]))
        data.setdefault("solver", {})["noise"] = float(b["noise_abs"])
        data.setdefault("data", {})["normalize"] = self.settings["normalize"]
        data.setdefault("kernel", {})["kind"] = self.settings["kind"]
        return to_toml(data)
