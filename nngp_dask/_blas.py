"""What the BLAS shipped in the numpy and scipy wheels can be trusted with.

OpenBLAS's threaded ``syrk`` (``a @ a.T``, and the trailing updates of its parallel ``potrf``)
packs each thread's share of the output's rows into one fixed buffer and writes past its end when a
share is large: a large order on few threads. (The buffer's size is inferred, not read from the
wheels' build: 32 MiB puts the limit near 15,100 rows on 2 threads, where it was observed.) Measured on this
project's 2-core machine (OpenBLAS 0.3.30 in scipy, 0.3.31 in numpy, SkylakeX kernels): the
Cholesky factorisation of a 15,641 x 15,641 kernel segfaulted in ``dgemm_otcopy`` under
``dsyrk_thread_LN`` and killed a pipeline, while 15,000 did not, and single-threaded both pass;
where the overrun lands on mapped memory it corrupts that memory silently instead. So no ``syrk``
or ``potrf`` of a larger order than :data:`SYRK_MAX_N` is handed to it; larger ones are done in
blocks of that order (:func:`nngp_dask.linalg.cholesky_in_place`,
:func:`nngp_dask.kernels.input_gram`, :func:`gram_upper`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.linalg import blas

__all__ = ["SYRK_MAX_N", "gram_upper"]

#: A share of this order needs 18 MB of the buffer on 2 threads (less on more; none on one).
SYRK_MAX_N = 8192


def gram_upper(a: NDArray[np.float64], c: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
    """``a @ a.T``, plus ``c`` (updated in place) when given, in float64: its upper triangle is valid.

    One ``dsyrk`` up to :data:`SYRK_MAX_N` rows of ``a``, a ``dgemm`` (twice the flops) above.
    ``a`` Fortran-ordered (e.g. the transpose of a C-ordered matrix) is read without a copy;
    ``c`` should be Fortran-ordered float64.
    """
    if a.shape[0] <= SYRK_MAX_N:
        return blas.dsyrk(1.0, a, trans=0) if c is None else blas.dsyrk(1.0, a, beta=1.0, c=c, trans=0, overwrite_c=1)
    return blas.dgemm(1.0, a, a, trans_b=1) if c is None else blas.dgemm(1.0, a, a, beta=1.0, c=c, trans_b=1,
                                                                        overwrite_c=1)
