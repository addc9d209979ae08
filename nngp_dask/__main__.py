"""``python -m nngp_dask``: the ``nngp-dask`` command line (:func:`nngp_dask.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
