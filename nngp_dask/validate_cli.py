"""The ``nngp-dask validate-kernel`` command: finite-width networks against the NNGP kernel.

Argument parsing, the printed table, ``result.json`` and the figures; the measurement itself is
:func:`nngp_dask.validation.validate_kernel` and the drawing :mod:`nngp_dask.plots`.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from . import defaults
from .kernels import ACTIVATIONS, Architecture, get_activation
from .validation import ESTIMATORS, default_inputs, joint_samples, validate_kernel

__all__ = ["add_arguments", "run_from_args"]


def activation_arg(text: str) -> str | dict[str, Any]:
    """``--activation``: a name, or a TOML inline table of the name and its parameters (as
    ``--set architecture.activation=...`` of a pipeline), checked at once."""
    value: Any = text
    if text.lstrip().startswith("{"):
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise argparse.ArgumentTypeError(
                f"expected a name or an inline table such as '{{name = \"leaky_relu\", slope = 0.2}}', "
                f"got {text!r} ({exc})") from None
    try:
        get_activation(value)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``validate-kernel`` options to ``parser`` and return it."""
    # 2, not the package's 3 (nngp_dask.defaults): every layer of the sampled networks costs another pass per width
    parser.add_argument("--depth", type=int, default=2,
                        help="hidden layers L (default 2; pipelines and estimators default to 3)")
    parser.add_argument("--activation", default=defaults.ACTIVATION, type=activation_arg, metavar="ACTIVATION",
                        help=f"one of {', '.join(ACTIVATIONS)}, or a TOML inline table of the name and its "
                             "parameters, e.g. '{name = \"leaky_relu\", slope = 0.2}' (default relu)")
    parser.add_argument("--weight-var", type=float, default=defaults.WEIGHT_VAR,
                        help=f"sigma_w^2 (default {defaults.WEIGHT_VAR}, as pipelines and estimators)")
    parser.add_argument("--bias-var", type=float, default=defaults.BIAS_VAR,
                        help=f"sigma_b^2 (default {defaults.BIAS_VAR})")
    parser.add_argument("--points", type=int, default=4, help="number of test inputs (default 4)")
    parser.add_argument("--dim", type=int, default=8, help="input dimension (default 8)")
    parser.add_argument("--max-width", type=int, default=4096, help="largest width, widths 4, 8, ... (default 4096)")
    parser.add_argument("--networks", type=int, default=1000, help="random networks per width (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--estimator", default="readout", choices=ESTIMATORS,
                        help="Monte Carlo covariance behind the error column (default readout)")
    parser.add_argument("--out", type=Path, default=Path("validation"),
                        help="folder for the figures and result.json (default ./validation)")
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run :func:`validate_kernel` from parsed arguments, print the table and slopes, write figures.

    Returns 0 (also when the check fails: the verdict is in the table). Raises ``ValueError``
    on invalid options.
    """
    arch = Architecture(args.depth, args.activation, args.weight_var, args.bias_var)
    x = default_inputs(args.points, args.dim, seed=args.seed)
    result = validate_kernel(arch, x, max_width=args.max_width, networks=args.networks, seed=args.seed,
                             estimator=args.estimator)
    print(json.dumps(result.to_dict(), indent=2) if getattr(args, "json", False) else result.table())
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
        if not args.no_plots:
            from . import plots

            paths = [plots.error_vs_width(result, out / "error_vs_width.png")]
            if x.shape[0] >= 2:
                joint_widths = sorted({1, 4, 32, int(args.max_width)})
                joint = joint_samples(arch, x[:2], joint_widths, networks=args.networks, seed=args.seed)
                paths.append(plots.joint_distribution(joint, path=out / "joint_distribution.png"))
            if not getattr(args, "json", False):
                print("\nfigures: " + ", ".join(str(p) for p in paths))
    return 0
