"""The ``nngp-dask`` command line.

Exit codes (:data:`EXIT_CODES`; also in ``--help`` and the README): 0 success; 1 an unexpected
failure (one line; ``--debug`` for the traceback); 2 bad input, configuration or store (one line
on stderr naming the field, the value and what was expected); 3 CG did not converge (the run is
complete and its report written; ``solver.allow_unconverged = true`` makes it 0); 75 the output
is locked by another run (EX_TEMPFAIL: try again later); 130 interrupted (SIGINT), 143
terminated (SIGTERM): locks are released and a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["EXIT_CODES", "main"]

#: What each exit status of ``nngp-dask`` means.
EXIT_CODES = {
    0: "success",
    1: "unexpected failure (one line; --debug shows the traceback)",
    2: "bad input, configuration or kernel store (one line naming what to fix)",
    3: "CG did not converge to solver.tol (run complete, report written); "
       "solver.allow_unconverged=true makes it 0",
    75: "the output or store is locked by another live run (EX_TEMPFAIL: try again later)",
    130: "interrupted (SIGINT); re-run the same command to resume",
    143: "terminated (SIGTERM); locks released, re-run the same command to resume",
}

log = logging.getLogger("nngp_dask")

_UNTIL = {"run": "report", "kernel": "kernel", "solve": "solve", "predict": "evaluate"}


def _summary(report: dict[str, Any]) -> str:
    lines = [f"nngp-dask: {report['name']} ({report['task']}), {report['dataset'].get('dataset', '')}"]
    metrics = report.get("metrics") or {}
    shown = {k: v for k, v in metrics.items() if k not in ("confusion", "classes", "coverage", "coverage_unfitted")}
    if shown:
        lines.append("  metrics: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in shown.items()))
    coverage = metrics.get("coverage")
    if coverage:  # the 95 % interval's line; report.json and reliability.png have every level
        at = coverage["levels"].index(0.95) if 0.95 in coverage["levels"] else -1
        built = metrics.get("coverage_unfitted")
        lines.append(f"  {coverage['levels'][at]:.0%} intervals cover {coverage['observed'][at]:.3f} of the test "
                     "targets" + (f" (kernel as built: {built[at]:.3f})" if built else ""))
    for name, st in report["stages"].items():
        when = st.get("ran_at")
        state = "ran" if st["did_work"] else "up to date" + (
            f" (time of the run of {when})" if when and when != report.get("started") else "")
        lines.append(f"  {name:<9} {st['seconds']:9.1f} s  {state}")
    solve = report["stages"].get("solve", {}).get("detail")
    if solve:
        lines.append(f"  solver: {solve['method']} ({solve['preconditioner']}), {solve['iterations']} iterations, "
                     f"{'converged' if solve['converged'] else 'NOT converged'}")
    lines.append(f"  peak memory (all processes): {report['peak_rss_bytes'] / 2**30:.2f} GiB; "
                 f"wall {report['wall_s']:.1f} s")
    lines.append(f"  report: {report['config']['run']['output']}/report.json")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    """``1.23 GB``: decimal units, as ``du --si`` and disk vendors print them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


#: Keys of a store summary holding a POSIX time (seconds since 1970): printed as ISO 8601 dates.
_TIMES = ("created", "finished", "heartbeat", "since")


def _readable(key: str, value: Any) -> str:
    """One value of ``inspect``'s summary as a person reads it: sizes in kB/MB/GB, times as ISO
    8601 dates in local time, tables as ``key=value`` lists."""
    import datetime

    if key.endswith("bytes") and isinstance(value, int):
        return f"{_bytes(value)} ({value:,} bytes)"
    if key in _TIMES and isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
    if isinstance(value, dict):
        if list(value) == ["name"]:  # an activation without parameters
            return str(value["name"])
        return ", ".join(f"{k}={_readable(k, v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_summary(summary: dict[str, Any]) -> None:
    for k, v in summary.items():
        if k == "solves" and isinstance(v, dict):
            print(f"{k:>18}: {len(v)}")
            for name, attrs in v.items():
                print(f"{'':>18}  {name}")
                for a, av in attrs.items():
                    print(f"{'':>20}{a:>20}: {_readable(a, av)}")
        else:
            print(f"{k:>18}: {_readable(k, v)}")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline file (TOML), e.g. pipelines/quickstart.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting, e.g. --set solver.noise=1e-3 (repeatable)")
    p.add_argument("--cluster", default=None,
                   help="'auto' (default: Dask's scheduler-address, DASK_SCHEDULER_ADDRESS, when set, else an "
                        "embedded cluster), 'local' (always the embedded cluster), a scheduler address "
                        "(tcp://host:8786), or a cluster file (cluster/*.toml)")
    p.add_argument("--no-plots", action="store_true", help="write no figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="nngp-dask", description="NNGP/NTK Gaussian-process inference at any "
                                     "scale: tiled kernels in Zarr, built by Dask, solved out of core.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nngp-dask {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"run": "run a pipeline: ingest, kernel, solve, predict, evaluate, report",
             "kernel": "run a pipeline up to the kernel (build or resume the store)",
             "solve": "run a pipeline up to the solve",
             "predict": "run a pipeline up to predictions and metrics (no report)"}
    for name, text in helps.items():
        _add_pipeline_args(sub.add_parser(name, help=text, description=text))
    text = ("fit the hyperparameters of a pipeline by the exact marginal likelihood on a subset of its training "
            "data; print them, and with --write a pipeline file that runs with them")
    p = sub.add_parser("fit", help=text, description=text)
    _add_pipeline_args(p)
    p.add_argument("--write", metavar="PIPELINE.toml", default=None,
                   help="write the pipeline with the fitted values (and [fit] enabled = false) to this file")
    p.add_argument("--subset", type=int, default=None, help="points to fit on (overrides fit.subset)")
    p.add_argument("--restarts", type=int, default=None, help="random starts per depth (overrides fit.restarts)")
    p.add_argument("--ard", action="store_true", help="also fit one input variance per feature (fit.ard)")
    p.add_argument("--depths", default=None, metavar="MIN:MAX", help="depths tried, e.g. 1:4 (fit.depth_min/max)")
    text = "check a pipeline file without running it; print the resolved settings"
    p = sub.add_parser("validate", help=text, description=f"{text[0].upper()}{text[1:]} as TOML (defaults filled "
                       "in, ${VAR} expanded, --set applied); exit 2 with one line naming the key if it is invalid. "
                       "--schema prints every key with its type, default, allowed values and meaning.")
    p.add_argument("pipeline", nargs="?", help="pipeline file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting before checking, e.g. --set solver.noise=1e-3 (repeatable)")
    p.add_argument("--schema", action="store_true", help="print the documented schema with defaults and choices")
    text = "describe a kernel store: architecture, shape, tiles done, size, solves"
    p = sub.add_parser("inspect", help=text, description=f"{text[0].upper()}{text[1:]}. Sizes are printed in "
                       "decimal units (kB, MB, GB) and times as ISO 8601 dates in local time; --json prints the "
                       "raw values (bytes, seconds since 1970).")
    p.add_argument("store", help="store path or URL")
    p.add_argument("--json", action="store_true", help="print JSON (raw numbers)")
    from .validate_cli import add_arguments

    add_arguments(sub.add_parser("validate-kernel", help="compare finite-width networks with the NNGP kernel",
                                 description="Sample random networks at widths 4 .. max and measure how their "
                                             "output covariance converges to the NNGP kernel."))
    return parser


@contextmanager
def _logging_configured(args: argparse.Namespace) -> Iterator[None]:
    """Log to stderr at the level the flags ask for; on exit, put the loggers back as they were.

    ``main()`` may be called as a function (tests, notebooks, other tools): a handler left on a
    stream that the caller later closes, or a logger left detached from the root, would break
    the caller's own logging.
    """
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    dist = logging.getLogger("distributed")
    saved = log.level, log.propagate, dist.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.setLevel(level)
    log.addHandler(handler)
    log.setLevel(min(level, logging.INFO))  # the run's log file always gets INFO
    log.propagate = False
    dist.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        dist.setLevel(saved[2])


def _run(args: argparse.Namespace) -> int:
    from .pipeline import load_config, parse_overrides, schema_text, to_toml

    if args.command == "validate":
        if args.schema:
            print(schema_text())
            return 0
        if not args.pipeline:
            raise _Usage("pipeline: expected a pipeline file (or --schema)")
        cfg = load_config(args.pipeline, parse_overrides(args.overrides))
        print(to_toml(cfg))
        print(f"# {args.pipeline}: valid", file=sys.stderr)
        return 0
    if args.command == "inspect":
        from .store import open_kernel

        summary = open_kernel(args.store).summary()
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            _print_summary(summary)
        return 0
    if args.command == "validate-kernel":
        from .validate_cli import run_from_args

        return run_from_args(args)
    overrides = parse_overrides(args.overrides)
    if args.cluster:
        overrides["cluster.address"] = args.cluster
    if args.command == "fit":
        return _fit(args, overrides)
    cfg = load_config(args.pipeline, overrides)
    from .pipeline import run_pipeline

    report = run_pipeline(cfg, until=_UNTIL[args.command], plots=False if args.no_plots else None,
                          progress=not args.no_progress)
    print(_summary(report))
    solve = report["stages"].get("solve", {}).get("detail")
    if solve and not solve["converged"] and not cfg["solver"]["allow_unconverged"]:
        print(f"nngp-dask: not converged: CG stopped after {solve['iterations']} iterations above solver.tol="
              f"{cfg['solver']['tol']:g} (worst relative residual {max(solve['final_residuals']):.3g}); the run is "
              "complete and its report written. Raise solver.maxiter or solver.noise, or a stronger preconditioner; "
              "--set solver.allow_unconverged=true accepts it (exit 0)", file=sys.stderr)
        return 3
    return 0


def _fit(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``nngp-dask fit``: ingest and the fit stage only (no cluster), then print or write the values."""
    from pathlib import Path

    from .pipeline import load_config, run_pipeline, to_toml

    given = (("fit.subset", args.subset), ("fit.restarts", args.restarts))
    overrides.update({key: value for key, value in given if value is not None})
    if args.ard:
        overrides["fit.ard"] = True
    if args.depths is not None:
        lo, sep, hi = args.depths.partition(":")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise _Usage(f"--depths: expected MIN:MAX (e.g. 1:4) or one depth, got {args.depths!r}")
        overrides["fit.depth_min"], overrides["fit.depth_max"] = int(lo), int(hi if sep else lo)
    cfg = load_config(args.pipeline, overrides)
    if args.write is not None and Path(args.write).is_dir():
        raise _Usage(f"--write: {args.write!r} is a folder; expected a file name for the pipeline")
    out = run_pipeline(cfg, until="fit", plots=False, progress=not args.no_progress)
    detail = out["fit"]
    fitted = detail["fitted"]
    print(f"nngp-dask: fitted on {detail['n_subset']} points: log marginal likelihood "
          f"{detail['log_marginal_likelihood']:.4f} (per depth: "
          + ", ".join(f"{d}: {v:.4f}" for d, v in detail["per_depth"].items()) + ")")
    for key, value in fitted.items():
        shown = ", ".join(f"{v:.4g}" for v in value) if isinstance(value, list) else \
            f"{value:.6g}" if isinstance(value, float) else str(value)
        print(f"  {key} = {shown or '[] (isotropic)'}")
    if args.write is not None:
        written = out["config"]
        written["fit"]["enabled"] = False
        Path(args.write).write_text(f"# fitted by nngp-dask fit {args.pipeline}\n" + to_toml(written))
        print(f"  pipeline with the fitted values: {args.write}")
    return 0


class _Usage(ValueError):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler so that every ``with`` block
    (locks, clusters, log files) exits as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`, and an interrupt is never lost; both put back on exit.

    Python drops an exception raised inside a callback from C (Numba's compiler calls back into
    Python through ctypes) with an "Exception ignored" message, so a SIGTERM or Ctrl-C landing
    there would let the run carry on. The unraisable hook sends such a signal again, until it is
    raised in Python code outside the callback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals belong to the main thread: leave them alone
        return
    previous_handler, previous_hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook

    def redeliver(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            which = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            # from another thread: sent from here, it would be raised (and dropped) in this hook
            threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, which)).start()
        else:
            previous_hook(unraisable)

    signal.signal(signal.SIGTERM, _raise_terminated)
    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nngp-dask`` console script."""
    args = _parser().parse_args(argv)
    with _logging_configured(args):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from .build import BuildError
    from .store import StoreLockedError

    try:
        with _signals_unwind():  # SIGTERM (kill, systemd, batch schedulers) unwinds like Ctrl-C
            return _run(args)
    except StoreLockedError as exc:
        if args.debug:
            raise
        print(f"nngp-dask: locked: {exc}", file=sys.stderr)
        return 75
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # bad input or configuration: the message names the field, the value and what was expected
        if args.debug:
            raise
        print(f"nngp-dask: error: {exc}", file=sys.stderr)
        return 2
    except (BuildError, RuntimeError, OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(f"nngp-dask: failed: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"nngp-dask: {what}; re-run the same command to resume", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
