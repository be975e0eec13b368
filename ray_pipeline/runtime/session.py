"""Connecting to Ray: the cluster at ``ray_address`` / ``RAY_ADDRESS``, or a local one.

A local Ray started here binds its dashboard to 127.0.0.1 only, and is shut down when the
``with`` block ends; a cluster we joined is left running. What the console shows of Ray is the
:class:`~.console.Console` the session is given.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from .console import WORKER_LOG, Console
from .capacity import configure, wait_reachable
from .interrupt import rearm
from ..config.ray_settings import RaySettings
from ..errors import ClusterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float


@contextmanager
def ray_session(address: Optional[str] = None, *, num_cpus: Optional[int] = None,
                dashboard: bool = True, console: Optional[Console] = None,
                settings: Optional[RaySettings] = None) -> Iterator[Resources]:
    """Yields the cluster's total resources. Reuses an already initialised Ray as it is.

    console: with a log file, Ray's driver loggers and the workers' lines go to the log for the
    block, and (unless verbose) Ray no longer prints the workers' lines on the console; the same
    on a cluster joined with ``address`` as on a local Ray. settings: the config's ``ray:`` (how
    long to wait for the cluster; its node types, ``runtime.capacity``)."""
    import ray

    started = False
    logged = console is not None and console.log_file is not None
    with ExitStack() as undo:
        if logged:
            undo.enter_context(_ray_loggers_to_root())
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                log.info("joining the Ray cluster at %s", address)
                wait_reachable(address, (settings or RaySettings()).wait_timeout_s)
                ray.init(address=address, log_to_driver=True)
            else:
                ctx = _start_local(num_cpus, dashboard)
                started = True
                url = getattr(ctx, "dashboard_url", None)
                log.info("started a local Ray%s", f"; dashboard at http://{url}" if url else "")
            configure(settings, local=started)
        elif settings is not None:  # a Ray this process joined or started before: its settings now
            configure(settings, local=None)
        rearm()  # ray.init's SIGTERM handler exits the process: ours again (runtime.interrupt)
        if logged:
            undo.enter_context(_worker_lines_to_log(quiet=not console.verbose, keep=not started))
        try:
            res = ray.cluster_resources()
            yield Resources(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)))
        finally:
            if started:
                ray.shutdown()


LOCAL_START_TRIES = 3


def _start_local(num_cpus: Optional[int], dashboard: bool, tries: int = LOCAL_START_TRIES):
    """``ray.init`` of a local Ray, tried again when its raylet misses Ray's fixed 30 s to register
    (seen on an overloaded machine: "The current node timed out during startup"); a
    :class:`ClusterError` after ``tries``, not Ray's traceback."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            return ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                            log_to_driver=True)
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            log.warning("the local Ray did not start in time (try %d of %d): %s", attempt, tries, e)
    raise ClusterError(f"a local Ray did not start: its node missed Ray's 30 s to register, {tries} times "
                       "(is the machine overloaded?); free some CPU or memory and run again, or pass "
                       "--address of a running Ray cluster")


@contextmanager
def _ray_loggers_to_root() -> Iterator[None]:
    """Ray's driver loggers (``ray``, and ``ray.data``, which Ray Data configures when first
    imported) without their console handlers, propagating to the root logger, whose handlers
    decide what the console shows; Ray Data's own file in the session directory stays. Restored
    after."""
    import ray.data  # noqa: F401  (configures the ray.data logger now, not later over ours)

    saved = []
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate


@contextmanager
def _worker_lines_to_log(*, quiet: bool, keep: bool) -> Iterator[None]:
    """Every line a worker prints, as Ray streams it to the driver (``log_to_driver``), logged to
    :data:`WORKER_LOG`; with ``quiet``, Ray's own printer of those lines (to the console) is off
    for the block, and put back after when Ray stays up (``keep``: a cluster we joined).

    Ray 2.60 has no public hook for the streamed lines: this uses the dispatcher its printer is
    registered with (``ray._private.ray_logging``). A Ray without it prints them as it always did;
    every node also keeps them in its session logs (``<session>/logs/worker-*``)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as streams
        from ray._private.worker import filter_autoscaler_events
    except ImportError:  # another Ray: its printer stays as it is
        log.warning("this Ray has no stream dispatcher: the workers' output stays as Ray prints it")
        yield
        return
    workers = logging.getLogger(WORKER_LOG)

    def to_log(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        where = f"{who} pid={data.get('pid')}".strip()
        if data.get("ip") != data.get("localhost"):
            where += f", ip={data.get('ip')}"
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its events only, as Ray's printer shows them, not its status dumps
            lines = filter_autoscaler_events(lines)
        for line in lines:
            workers.info("(%s) %s", where, line)

    printer = [pair for pair in streams.handlers if pair[0] == "ray_print_logs"]
    if quiet:
        streams.remove_handler("ray_print_logs")
    streams.add_handler("ray_pipeline_log", to_log)
    try:
        yield
    finally:
        streams.remove_handler("ray_pipeline_log")
        if quiet and keep:
            for name, handler in printer:
                streams.add_handler(name, handler)
