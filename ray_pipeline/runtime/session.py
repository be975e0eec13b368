"""Connecting to Ray: the cluster at ``ray_address`` / ``RAY_ADDRESS``, or a local one.

A local Ray started here binds its dashboard to 127.0.0.1 only, and is shut down when the
``with`` block ends; a cluster we joined is left running.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float


@contextmanager
def ray_session(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
                dashboard: bool = True) -> Iterator[Resources]:
    """Yields the cluster's total resources. Reuses an already initialised Ray as it is."""
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            ctx = ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                           log_to_driver=True)
            started = True
            url = getattr(ctx, "dashboard_url", None)
            log.info("started a local Ray%s", f"; dashboard at http://{url}" if url else "")
    try:
        res = ray.cluster_resources()
        yield Resources(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()
