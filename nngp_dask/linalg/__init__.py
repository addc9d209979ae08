"""Linear algebra that knows nothing of tiles or stores: batched and block conjugate gradients on a
``matmat`` callable, preconditioners, stochastic Lanczos quadrature, dense Cholesky/eigh with advice on failure,
and the compiled products of one tile with thin blocks."""

from .blocked import blocked_cholesky, forward_sum_squares, panel_bounds
from .cg import DEFLATION_TOL, ConvergenceWarning, batched_cg, block_cg, check_rhs, default_maxiter
from .cg_state import CGResult, CGState
from .dense import POTRF_MAX_N, cholesky_factor, cholesky_in_place, dense_solve, positive_definite_advice
from .extend import EXTEND_MAX_GROWTH, ExtendedNystrom, orthogonal_factor
from .nystrom import FLOAT64_RATIO, SplitLowRank, nystrom_transform
from .preconditioners import (
                              AUTO_RANK,
                              PRECONDITIONERS,
                              Identity,
                              Jacobi,
                              LowRank,
                              Nystrom,
                              PivotedCholesky,
                              Preconditioner,
                              make_preconditioner,
                              nystrom_landmarks,
)
from .products import factor_products, tile_matmat_t
from .slq import LogdetEstimate, log_marginal_likelihood, logdet_dense, slq_logdet

__all__ = [
    "DEFLATION_TOL",
    "block_cg",
    "blocked_cholesky",
    "forward_sum_squares",
    "panel_bounds",
    "factor_products",
    "tile_matmat_t",
    "FLOAT64_RATIO",
    "POTRF_MAX_N",
    "SplitLowRank",
    "nystrom_transform",
    "nystrom_landmarks",
    "CGResult",
    "CGState",
    "ConvergenceWarning",
    "batched_cg",
    "check_rhs",
    "default_maxiter",
    "EXTEND_MAX_GROWTH",
    "ExtendedNystrom",
    "orthogonal_factor",
    "cholesky_factor",
    "cholesky_in_place",
    "dense_solve",
    "positive_definite_advice",
    "AUTO_RANK",
    "PRECONDITIONERS",
    "Identity",
    "Jacobi",
    "LowRank",
    "Nystrom",
    "PivotedCholesky",
    "Preconditioner",
    "make_preconditioner",
    "LogdetEstimate",
    "log_marginal_likelihood",
    "logdet_dense",
    "slq_logdet",
]
