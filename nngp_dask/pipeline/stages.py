"""A pipeline run: ingest -> fit -> kernel -> solve -> predict -> evaluate -> report, idempotent.

The fit stage (``[fit] enabled = true``) maximises the marginal likelihood on a subset
(:func:`nngp_dask.select.fit_hyperparameters`) and runs the rest with the fitted architecture,
noise and amplitude; its result is kept in ``fit.json`` under its fingerprint (targets, inputs,
settings), so a re-run reuses it.

Every stage's output is named by a fingerprint of what it depends on, and the expensive ones
resume rather than restart: the kernel store records finished tiles, the solver checkpoints
into the store and keys its solution by (kernel, targets, noise, settings), predictions are
kept beside the report with their fingerprint. A re-run therefore skips what is done, a
killed run continues where it stopped, and a changed noise re-runs only solve onwards. One
run at a time per output directory (a lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..build import build_kernel
from ..cluster import OWN_HANDLER, LazyClient
from ..gp import (
    DENSE_VARIANCE_MAX_N,
    SolveResult,
    encode_labels,
    extrapolation,
    predict,
    predict_labels,
    solve,
    variance_mode,
)
from ..kernels import Architecture, normalize as normalize_rows
from ..monitor import PeakRSS
from ..select import FIT_BOUNDS, fit_hyperparameters, storage_noise_floor, subset_size
from ..store import CorruptTileError, KernelStore, inputs_path, is_remote, store_contents, store_lock
from .config import ConfigError
from .datasets import Dataset, load_dataset
from .evaluation import Targets, evaluate, targets_of

__all__ = ["STAGES", "Pipeline", "run_pipeline"]

log = logging.getLogger("nngp_dask")

STAGES = ("ingest", "fit", "kernel", "solve", "predict", "evaluate", "report")

#: Each finished stage's record (report.json's ``stages`` entry), kept beside the report as it ends.
STAGES_FILE = "stages.json"


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=10)
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True,
                                                                                                default=str).encode())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    did_work: bool = False
    fingerprint: str = ""
    detail: dict = field(default_factory=dict)


class Pipeline:
    """One pipeline run over a resolved configuration (see :mod:`nngp_dask.pipeline.config`).

    Parameters
    ----------
    cfg : dict
        From :func:`nngp_dask.pipeline.config.load_config`.
    client : distributed.Client, address or None
        Overrides ``cfg["cluster"]``.
    plots : bool
        Write figures (``--no-plots`` turns them off).
    progress : bool
        Progress bars for the kernel and CG stages.
    """

    def __init__(self, cfg: dict[str, dict[str, Any]], *, client: Any = None, plots: bool | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.client = client
        self.plots = cfg["report"]["plots"] if plots is None else plots
        self.progress = progress
        self.out = Path(cfg["run"]["output"])
        store = cfg["run"]["store"]
        self.store_url = store if is_remote(store) else str(self.out / store)
        self.records: dict[str, StageRecord] = {}
        self.stamp = ""  # when this run started (report.json's ``started``)
        self._last_stages: dict[str, Any] = {}  # the stage records kept by earlier runs

    # --- helpers ----------------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str) -> Iterator[StageRecord]:
        rec = StageRecord(name)
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        yield rec
        rec.seconds = time.perf_counter() - t0
        self.records[name] = rec
        log.info("stage %s %s in %.1f s", name, "done" if rec.did_work else "up to date (skipped)", rec.seconds)
        # kept as each stage ends: a run killed in a later stage loses none of the time spent here
        _atomic_write(self.out / STAGES_FILE, json.dumps(self._last_stages | self._stage_report(), indent=2,
                                                         default=_json_default).encode())

    @contextmanager
    def _log_file(self) -> Iterator[None]:
        self.out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        setattr(handler, OWN_HANDLER, True)  # not logging the caller set up: the dashboard link is printed too
        # not on the "distributed" logger: the cluster silences that logger's handlers while it runs
        pkg = logging.getLogger("nngp_dask")
        level = pkg.level
        pkg.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            pkg.setLevel(logging.INFO)
        try:
            yield
        finally:
            pkg.removeHandler(handler)
            pkg.setLevel(level)
            handler.close()

    def _cluster(self) -> Any:
        if self.client is not None:
            return self.client
        address = self.cfg["cluster"]["address"]
        # auto: what client_for(None) picks (a default client, Dask's scheduler-address, else
        # the embedded cluster); "local" is always the embedded cluster
        return None if address == "auto" else address

    def _local_kwargs(self) -> dict:
        c = self.cfg["cluster"]
        return {"n_workers": c["n_workers"] or None, "threads_per_worker": c["threads_per_worker"],
                "memory_limit": c["memory_limit"] or None, "secure": c["secure"]}

    def _check_locations(self) -> None:
        """Before any work (and before a cluster starts): the output is, or can become, a folder,
        and the store is absent, empty or a kernel store; anything else there is never touched."""
        above = self.out
        while not above.exists() and above.parent != above:
            above = above.parent
        if not above.is_dir():
            what = "is a file" if above == self.out else f"cannot be created: {str(above)!r} is a file"
            raise ConfigError(f"run.output: {str(self.out)!r} {what}; expected a folder (new or existing)")
        store_contents(self.store_url)

    # --- the run ----------------------------------------------------------------------------
    def run(self, until: str = "report") -> dict[str, Any]:
        """Run the stages up to and including ``until``; returns the report (as a dict)."""
        if until not in STAGES:
            raise ValueError(f"until: expected one of {list(STAGES)}, got {until!r}")
        stop = STAGES.index(until)
        cfg = self.cfg
        started = time.time()
        self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
        self._check_locations()
        self.out.mkdir(parents=True, exist_ok=True)
        self._last_stages = self._kept_stages()
        with store_lock(str(self.out / "pipeline"), name=f"pipeline {cfg['run']['name']}"), self._log_file(), \
                PeakRSS() as peak:
            log.info("pipeline %s -> %s", cfg["run"]["name"], self.out)
            with self._stage("ingest") as rec:
                ds = load_dataset(cfg["data"], task=cfg["run"]["task"], seed=cfg["run"]["seed"])
                targets = targets_of(ds, cfg["run"]["task"])
                rec.fingerprint = _hash(targets.y_train, np.asarray(ds.y_test, dtype=np.float64))
                rec.did_work = True
                rec.detail = {"dataset": ds.description, "n_train": ds.x_train.shape[0], "n_test": ds.x_test.shape[0]}
                log.info("data: %s", ds.description)
            if cfg["fit"]["enabled"] or stop == STAGES.index("fit"):
                cfg = self.cfg = self._fit(ds, targets)
            if stop == STAGES.index("fit"):
                return {"fit": self.records["fit"].detail, "config": cfg}
            a = cfg["architecture"]
            arch = Architecture(a["depth"], a["activation"], a["weight_var"], a["bias_var"],
                                input_weight_var=a["input_weight_var"] or None)
            # the cluster starts only for a stage with work to do
            with LazyClient(self._cluster(), **self._local_kwargs()) as client:
                for attempt in (1, 2):
                    try:
                        ks = self._kernel(arch, ds, client)
                        result = self._solve(ks, targets, client) if stop >= STAGES.index("solve") else None
                        pred = (self._predict(ks, result, client)
                                if stop >= STAGES.index("predict") and result is not None else None)
                        break
                    except CorruptTileError as exc:
                        # its record is cleared: the kernel stage rebuilds the tile, the solve resumes
                        if attempt == 2:
                            raise
                        log.warning("%s; rebuilding it and carrying on", exc)
            metrics = None
            if stop >= STAGES.index("evaluate") and pred is not None:
                with self._stage("evaluate") as rec:
                    assert result is not None  # predictions come from a solve
                    # the full data's marginal-likelihood optimum supersedes a given (or [fit]) amplitude
                    given = cfg["solver"]["amplitude"]
                    amplitude = (result.info.get("amplitude") if cfg["solver"]["fit_amplitude"]
                                 else None if given == 1.0 else given)
                    metrics = evaluate(cfg["run"]["task"], ds.y_test, pred["mean"], pred.get("var"),
                                       cfg["solver"]["noise"], targets, amplitude)
                    rec.did_work = True
            report = self._report(ks, result, pred, metrics, ds, targets, peak.sample(), started,
                                  write=stop >= STAGES.index("report"))
        return report

    def _fit(self, ds: Dataset, targets: Targets) -> dict[str, dict[str, Any]]:
        """The configuration with the fitted values (the fit stage); reused from ``fit.json`` when
        its fingerprint (targets, inputs, starting values, fit settings) matches."""
        from dask.utils import parse_bytes

        cfg, f, a = self.cfg, self.cfg["fit"], self.cfg["architecture"]
        path = self.out / "fit.json"
        with self._stage("fit") as rec:
            n = ds.x_train.shape[0]
            size = subset_size(n, f["subset"] or None, parse_bytes(f["memory"]))
            idx = np.sort(np.random.default_rng(f["seed"]).choice(n, size, replace=False)) if size < n else None
            x = np.asarray(normalize_rows(_rows(ds.x_train, idx), cfg["data"]["normalize"]), dtype=np.float64)
            y = targets.y_train if idx is None else targets.y_train[idx]
            rec.fingerprint = _hash(y, x, f, a, cfg["solver"]["noise"], cfg["kernel"]["kind"], cfg["kernel"]["dtype"],
                                    n)
            try:
                last = json.loads(path.read_text())
                fitted = last["overrides"] if last["fingerprint"] == rec.fingerprint else None
                rec.detail = last["detail"]
            except (OSError, ValueError, KeyError, TypeError):
                fitted = None
            if fitted is None:
                start = Architecture(a["depth"], a["activation"], a["weight_var"], a["bias_var"],
                                     input_weight_var=a["input_weight_var"] or None)
                res = fit_hyperparameters(x, y, arch=start, noise=cfg["solver"]["noise"] or 1e-2,
                                          kind=cfg["kernel"]["kind"], depths=range(f["depth_min"], f["depth_max"] + 1),
                                          ard=f["ard"], subset=None, restarts=f["restarts"], seed=f["seed"],
                                          maxiter=f["maxiter"],
                                          noise_floor=storage_noise_floor(cfg["kernel"]["dtype"], n))
                if res.noise_at_floor and res.noise_floor > FIT_BOUNDS["noise"][0]:  # the storage's floor binds
                    log.warning("fit: the noise stopped at %.3g of the kernel's diagonal, the least that %s tiles of "
                                "%d points resolve; kernel.dtype = 'float64' lets the fit go lower", res.noise_floor,
                                cfg["kernel"]["dtype"], n)
                fitted = res.pipeline_overrides()
                rec.detail = {"log_marginal_likelihood": res.log_marginal_likelihood, "n_subset": res.n_subset,
                              "per_depth": {str(k): v for k, v in res.per_depth.items()},
                              "evaluations": res.evaluations, "fitted": fitted}
                _atomic_write(path, json.dumps({"fingerprint": rec.fingerprint, "overrides": fitted,
                                                "detail": rec.detail}, indent=2).encode())
                rec.did_work = True
                log.info("fit: %s", res.summary().replace("\n", "; "))
        out = {section: dict(values) for section, values in cfg.items()}
        for dotted, value in fitted.items():
            section, _, key = dotted.partition(".")
            out[section][key] = value
        return out

    def _kernel(self, arch: Architecture, ds: Dataset, client: Any) -> KernelStore:
        k = self.cfg["kernel"]
        with self._stage("kernel") as rec:
            # The run owns its store: new data or a changed kernel setting rebuilds it (what a
            # scheduled re-fit wants) instead of refusing it; the lock keeps other runs out.
            ks = build_kernel(arch, ds.x_train, self.store_url, x_test=ds.x_test, kind=k["kind"], tile=k["tile"],
                              dtype=k["dtype"], normalize=self.cfg["data"]["normalize"], overwrite=True,
                              client=client, progress=self.progress, page_cache=k["page_cache"])
            stats = ks.last_build  # type: ignore[attr-defined]
            rec.did_work = stats.tiles_computed > 0
            rec.fingerprint = ks.identity.token()
            rec.detail = {k_: v for k_, v in stats.as_dict().items() if k_ != "dashboard"}
        return ks

    def _solve(self, ks: KernelStore, targets: Targets, client: Any) -> SolveResult:
        s = self.cfg["solver"]
        method = s["method"]
        if method == "auto" and self.cfg["predict"]["variance"] in ("auto", "dense") \
                and ks.shape[0] <= DENSE_VARIANCE_MAX_N:
            # the exact variances factorise K + noise I anyway: a Cholesky solve's factor serves both
            method = "cholesky"
            log.info("solve: Cholesky (%d training points, exact variances from the same factor)", ks.shape[0])
        with self._stage("solve") as rec:
            result = solve(ks, targets.y_train, noise=s["noise"], tol=s["tol"], maxiter=s["maxiter"] or None,
                           preconditioner=s["preconditioner"], rank=s["rank"], method=method,
                           checkpoint_every=s["checkpoint_every"], client=client, progress=self.progress)
            rec.did_work = result.resumed_from != -1
            rec.fingerprint = result.key
            rec.detail = {"method": result.method, "preconditioner": result.preconditioner,
                          "iterations": result.iterations, "converged": result.converged,
                          "resumed_from": result.resumed_from, "matmat_s": result.matmat_s,
                          "final_residuals": result.residuals[-1].tolist(), **result.info}
            log.info("solve: %s", result.summary())
        return result

    def _predict(self, ks: KernelStore, result: SolveResult, client: Any) -> dict[str, np.ndarray]:
        mode = self.cfg["predict"]["variance"]
        variance: bool | str = False if mode == "none" else mode
        path = self.out / "predictions.npz"
        with self._stage("predict") as rec:
            # the method "auto" resolves to (predictions made by another method are redone) and the
            # store's full token (a new test set keeps the solve's key but not the predictions)
            resolved = variance_mode(ks, result, variance)
            rec.fingerprint = _hash(result.key, mode, resolved, ks.identity.token())
            rec.detail = {"variance": resolved, "extrapolation": extrapolation(ks)}
            if path.exists():
                with np.load(path, allow_pickle=False) as f:
                    if str(f["fingerprint"]) == rec.fingerprint:
                        return {k: f[k] for k in f.files if k != "fingerprint"}
            out = predict(ks, result, variance=variance, client=client, progress=self.progress)
            pred = {"mean": out[0], "var": out[1]} if isinstance(out, tuple) else {"mean": out}
            buf = _npz_bytes(fingerprint=np.array(rec.fingerprint), **pred)
            _atomic_write(path, buf)
            rec.did_work = True
        return pred

    def _report(self, ks: KernelStore, result: SolveResult | None, pred: dict | None, metrics: dict | None,
                ds: Dataset, targets: Targets, peak: int, started: float, *, write: bool) -> dict[str, Any]:
        from importlib.metadata import version

        figures: list[str] | None = []
        if write:
            with self._stage("report") as rec:
                # figures are redrawn only when what they show changed
                rec.fingerprint = _hash([r.fingerprint for r in self.records.values()], metrics,
                                        self.cfg["report"], bool(self.plots))
                figures = self._previous_figures(rec.fingerprint)
                if figures is None:
                    figures = self._figures(ks, result, pred, ds, targets, metrics) \
                        if self.plots and metrics is not None else []
                    rec.did_work = True
        report = {
            "name": self.cfg["run"]["name"],
            "task": self.cfg["run"]["task"],
            "dataset": self.records["ingest"].detail,
            "metrics": metrics,
            "stages": self._stage_report(),
            "kernel": ks.summary() | {"store": self.store_url},
            "reused": self._reused(),
            "cg_residuals": result.residuals.tolist() if result is not None and result.method != "cholesky" else None,
            "peak_rss_bytes": peak,
            "wall_s": round(time.time() - started, 3),
            "started": self.stamp,
            "figures": figures,
            # from the installed metadata: importing distributed only for its version took a second
            "versions": {"nngp_dask": __version__, "python": platform.python_version(),
                         **{name: version(name)
                            for name in ("numpy", "scipy", "dask", "distributed", "zarr", "numba")}},
            "config": self.cfg,
        }
        report["kernel"].pop("solves", None)
        if write:
            _atomic_write(self.out / "report.json", json.dumps(report, indent=2, default=_json_default).encode())
        return report

    def _kept_stages(self) -> dict[str, Any]:
        """The stage records earlier runs kept: ``stages.json`` (written as each stage ends, so a
        killed run's finished stages are there), else the last report's."""
        for name, key in ((STAGES_FILE, None), ("report.json", "stages")):
            try:
                kept = json.loads((self.out / name).read_text())
                kept = kept[key] if key else kept
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(kept, dict):
                return kept
        return {}

    def _stage_report(self) -> dict[str, dict[str, Any]]:
        """Each stage's entry of report.json. ``seconds`` is the time of the run that did the work
        (``ran_at``); a stage that was up to date keeps the time of the run that did it, from the
        kept records (same fingerprint), and ``this_run_s`` is what checking it cost now."""
        out = {}
        for name, r in self.records.items():
            entry: dict[str, Any] = {"seconds": round(r.seconds, 3), "did_work": r.did_work,
                                     "status": "ran" if r.did_work else "up to date", "ran_at": self.stamp,
                                     "this_run_s": round(r.seconds, 3), "fingerprint": r.fingerprint}
            prev = self._last_stages.get(name)
            if not r.did_work and isinstance(prev, dict) and prev.get("fingerprint") == r.fingerprint:
                entry.update(seconds=prev.get("seconds", entry["seconds"]), ran_at=prev.get("ran_at"))
                detail = prev.get("detail") or r.detail  # what that run did, matching its time
            else:
                detail = r.detail
            out[name] = entry | ({"detail": detail} if detail else {})
        return out

    def _reused(self) -> dict[str, str]:
        """One line per stage on what this run took over from the previous one (a scheduled
        re-fit on grown data: kept tiles, a warm-started solve)."""
        out = {}
        k = self.records.get("kernel")
        if k is not None and k.detail:
            d = k.detail
            total, kept, built = d.get("tiles_total", 0), d.get("tiles_kept", 0), d.get("tiles_computed", 0)
            out["kernel"] = (f"{d.get('update')}: {kept} of {total} tiles kept, {built} built" if kept or built
                             else f"{d.get('update')}: all {total} tiles kept")
        s = self.records.get("solve")
        if s is not None and s.detail:
            warm = s.detail.get("warm_start")
            out["solve"] = ("solution loaded (already solved)" if s.detail.get("resumed_from") == -1 else
                            f"warm start from the {warm['rows']}-row prefix's solution ({warm['iterations']} "
                            f"iterations there, {s.detail['iterations']} here)" if warm else
                            "cold start")
        return out

    def _previous_figures(self, fingerprint: str) -> list[str] | None:
        """The figures of the last report when it had this fingerprint and they are all there."""
        try:
            last = json.loads((self.out / "report.json").read_text())
            if last["stages"]["report"]["fingerprint"] != fingerprint:
                return None
            figures = list(last["figures"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return figures if all((self.out / f).is_file() for f in figures) else None

    def _figures(self, ks: KernelStore, result: SolveResult | None, pred: dict | None, ds: Dataset,
                 targets: Targets, metrics: dict) -> list[str]:
        from .. import plots  # imports matplotlib only when a figure is drawn
        from ..kernels import kernel as kernel_fn

        out: list[Path] = []
        try:
            if result is not None and result.method != "cholesky":
                out.append(plots.cg_residuals(result.residuals, self.out / "cg_residuals.png"))
            m = min(self.cfg["report"]["heatmap_points"], ks.shape[0])
            x = ks.array(inputs_path("train"))[:m]
            labels = None
            if targets.classes is not None:
                labels = np.asarray(ds.y_train).ravel()[:m]
            kmat = kernel_fn(ks.architecture, x, kind=ks.kind, dtype="float64")
            values = None if labels is not None else np.asarray(ds.y_train, dtype=np.float64)[:m]
            out.append(plots.kernel_heatmap(kmat, self.out / "kernel_heatmap.png", labels=labels, targets=values,
                                            kind=ks.kind, correlation=True))
            if pred is not None:
                assert result is not None  # a prediction comes from a solve
                if targets.classes is not None:
                    yp = predict_labels(pred["mean"], targets.classes)
                    out.append(plots.confusion_matrix(np.asarray(ds.y_test).ravel(), yp, len(targets.classes),
                                                      self.out / "confusion_matrix.png"))
                    truth = encode_labels(np.asarray(ds.y_test).astype(np.int64).ravel(), targets.classes)[1]
                    err = np.abs(pred["mean"] - truth).ravel()
                    std = np.repeat(np.sqrt(pred["var"] + result.noise), pred["mean"].shape[1]) if "var" in pred \
                        else None
                else:
                    mu = pred["mean"].ravel() * targets.scale + targets.mean
                    out.append(plots.predicted_vs_true(np.asarray(ds.y_test).ravel(), mu,
                                                       self.out / "predicted_vs_true.png"))
                    err = np.abs(mu - np.asarray(ds.y_test).ravel())
                    std = np.sqrt(pred["var"] + result.noise) * targets.scale if "var" in pred else None
                if std is not None:
                    std = std * np.sqrt(metrics.get("amplitude", 1.0))
                    out.append(plots.calibration(err, std, self.out / "calibration.png"))
                    cov = metrics["coverage"]
                    curves = {"amplitude fitted" if "amplitude" in metrics else "kernel as built": cov["observed"]}
                    if "coverage_unfitted" in metrics:
                        curves["kernel as built"] = metrics["coverage_unfitted"]
                    out.append(plots.reliability(cov["levels"], curves, self.out / "reliability.png"))
        except ImportError as exc:
            log.warning("no figures: %s", exc)
        return [p.name for p in out]


def _rows(source: Any, idx: np.ndarray | None, chunk: int = 65536) -> np.ndarray:
    """The rows ``idx`` (sorted; None: all) of a row source, read a chunk at a time."""
    n = source.shape[0]
    parts = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = np.asarray(source.read(start, stop), dtype=np.float64)
        if idx is not None:
            block = block[idx[(idx >= start) & (idx < stop)] - start]
        parts.append(block.reshape(block.shape[0], -1))
    return np.concatenate(parts)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    # numpy's stub gives savez an allow_pickle keyword, which a ** of arrays could bind in its eyes
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_pipeline(cfg: dict[str, dict[str, Any]], *, until: str = "report", client: Any = None,
                 plots: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Run a resolved pipeline configuration; see :class:`Pipeline`."""
    return Pipeline(cfg, client=client, plots=plots, progress=progress).run(until)
