"""What nngp-dask takes from Dask's own configuration, and how it tells where the dashboard is.

* ``scheduler-address`` (``DASK_SCHEDULER_ADDRESS``): as ``distributed.Client()`` does, the API
  and pipelines (``cluster.address = "auto"``, the default) connect to that scheduler instead of
  starting the embedded cluster (:func:`configured_scheduler`).
* ``distributed.scheduler.dashboard.address`` (``DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__ADDRESS``):
  where the embedded cluster's dashboard listens (:func:`dashboard_address`). Unset, a free port on
  127.0.0.1; a bare port (``8787`` or ``:8787``) still binds 127.0.0.1 (Dask would bind every
  interface); a host, such as ``0.0.0.0:8787``, is used as given.
* ``distributed.dashboard.link``: the template of every printed link (through
  ``distributed.utils.format_dashboard_link``).

The link printed is built from the address the dashboard is bound to (:func:`dashboard_link`):
dask-jobqueue's own link combines the scheduler's host (the ``interface`` the workers reach) with
the dashboard's port, which names an address the dashboard does not listen on when it is bound to
loopback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["DASHBOARD_ADDRESS_KEY", "OWN_HANDLER", "announce", "configured_scheduler", "dashboard_address",
           "dashboard_link"]

log = logging.getLogger("nngp_dask")

#: The Dask configuration key of the embedded cluster's dashboard address.
DASHBOARD_ADDRESS_KEY = "distributed.scheduler.dashboard.address"
_LOOPBACK = "127.0.0.1"
#: Set (to True) on a handler nngp-dask itself adds, such as a pipeline's run.log: it does not
#: count as logging the caller configured (:func:`announce`).
OWN_HANDLER = "nngp_dask_own_handler"


def configured_scheduler() -> str | None:
    """Dask's ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``), or None when unset."""
    import dask.config

    address = dask.config.get("scheduler-address", None)
    return str(address) if address else None


def dashboard_address() -> str:
    """Where the embedded cluster's dashboard listens: Dask's
    ``distributed.scheduler.dashboard.address`` with a bare port bound to 127.0.0.1, else
    ``127.0.0.1:0`` (a free port on loopback)."""
    import dask.config

    value = dask.config.get(DASHBOARD_ADDRESS_KEY, None)
    if value is None or str(value).strip() == "":
        return f"{_LOOPBACK}:0"
    text = str(value).strip()
    if text.isdigit():
        return f"{_LOOPBACK}:{text}"
    if text.startswith(":"):
        return _LOOPBACK + text
    return text


def dashboard_link(client: Any) -> str:
    """The dashboard's URL at the address it is bound to, for a ``distributed.Client`` or a cluster.

    With the scheduler in this process (the embedded cluster, dask-jobqueue), the address its
    HTTP server listens on, with the scheduler's host in place of a wildcard (0.0.0.0); otherwise
    what the client (or cluster) reports. Empty when the scheduler has no dashboard.
    """
    from distributed import Client, Scheduler
    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    cluster = client.cluster if isinstance(client, Client) else client
    scheduler = getattr(cluster, "scheduler", None)
    http = getattr(scheduler, "http_server", None) if isinstance(scheduler, Scheduler) else None
    port = getattr(http, "port", None)
    if port and scheduler is not None:
        host = getattr(http, "address", "") or ""
        if host in ("", "0.0.0.0", "::"):
            host = get_address_host(scheduler.address)
        return format_dashboard_link(f"[{host}]" if ":" in host else host, port)
    return client.dashboard_link or ""


def _caller_configured_logging() -> bool:
    """Whether a handler other than nngp-dask's own would see a record of the ``nngp_dask`` logger."""
    logger: logging.Logger | None = log
    while logger is not None:
        if any(not getattr(h, OWN_HANDLER, False) for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def announce(message: str, *args: object) -> None:
    """Log ``message`` at INFO, and when the caller has configured no logging at all print it on
    stderr too: a Python user gets the dashboard link once (where logging would drop an INFO
    record), a configured logger gets it as a record, and the caller's logging is never changed."""
    log.info(message, *args)
    if not _caller_configured_logging():
        print("nngp-dask: " + (message % args if args else message), file=sys.stderr, flush=True)
