"""scikit-learn estimators: NNGP/NTK Gaussian-process regression and classification.

:class:`NNGPRegressor` is the exact GP posterior mean (and standard deviation) of an
infinitely wide fully connected network; :class:`NNGPClassifier` is classification as
regression on one-hot targets (Lee et al. 2018). Both follow the scikit-learn conventions
(``__init__`` only stores its arguments, ``fit`` returns ``self``, learned state ends in
``_``), so they work in :class:`~sklearn.model_selection.GridSearchCV` and
:class:`~sklearn.pipeline.Pipeline`. :class:`NNGPKernel` plugs the same kernel into
:class:`~sklearn.gaussian_process.GaussianProcessRegressor` (with gradients for its optimizer).
By default the estimators fit their hyperparameters by the marginal likelihood on a subset
(``optimizer``; :mod:`nngp_dask.select.fit`) before the full-size solve.

Two paths, the same numbers:

- in memory (``n <= max_in_memory``, or ``out_of_core=False``): :func:`nngp_dask.kernel` and a
  float64 Cholesky factorisation of ``K + noise I`` (SciPy);
- out of core (``n > max_in_memory``, or ``out_of_core=True``): the training kernel is built
  tile by tile into a Zarr store (:func:`nngp_dask.build.build_kernel`, on the current Dask
  client or an embedded cluster) and solved there (:func:`nngp_dask.gp.solve`: Cholesky up to
  :data:`nngp_dask.gp.DIRECT_MAX_N` points, batched CG above). ``predict`` then streams the
  stored training inputs in chunks and computes ``K(X*, X)`` block by block with
  :func:`nngp_dask.kernels.tile`, so neither the training kernel nor ``K(X*, X)`` is ever held
  whole. With ``store=None`` the store lives in a temporary directory removed at interpreter
  exit; pass ``store`` to keep it (a refit on the same data and settings reuses its tiles).
  The tiles run on the current ``distributed`` client, else on an embedded cluster started
  for each call: create a ``distributed.Client`` first when fitting many times (grid search).

Requires scikit-learn (``pip install 'nngp-dask[sklearn]'``).
"""

from .kernel import NNGPKernel
from .models import NNGPClassifier, NNGPRegressor

__all__ = ["NNGPRegressor", "NNGPClassifier", "NNGPKernel"]
