"""What the BLAS shipped in the numpy and scipy wheels can be trusted with.

OpenBLAS's threaded ``syrk`` (``a @ a.T``, and the trailing updates of its parallel ``potrf``)
packs each thread's share of the output's rows into one fixed buffer (32 MiB in those wheels) and
writes past its end when a share is large: a large order on few threads. Measured on this
project's 2-core machine (OpenBLAS 0.3.30 in scipy, 0.3.31 in numpy, SkylakeX kernels): the
Cholesky factorisation of a 15,641 x 15,641 kernel segfaulted in ``dgemm_otcopy`` under
``dsyrk_thread_LN`` and killed a pipeline, while 15,000 did not, and single-threaded both pass;
where the overrun lands on mapped memory it corrupts that memory silently instead. So no ``syrk``
or ``potrf`` of a larger order than :data:`SYRK_MAX_N` is handed to it; larger ones are done in
blocks of that order (:func:`nngp_dask.linalg.cholesky_in_place`,
:func:`nngp_dask.kernels.input_gram`).
"""

from __future__ import annotations

__all__ = ["SYRK_MAX_N"]

#: A share of this order needs 18 MB of the buffer on 2 threads (less on more; none on one).
SYRK_MAX_N = 8192
