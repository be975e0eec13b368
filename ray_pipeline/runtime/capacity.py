"""What the cluster can hold, checked before a stage asks for it: no request waits forever.

Ray keeps a request that no node can hold pending without end, and says so only in ``ray
status`` ("no node type can satisfy"). Before a stage starts its actors or trials,
:func:`ensure_fits` checks each request of its plan (an embedding actor, a trial's driver, a
fine-tuning worker) against every node up now (``ray.nodes()``: one node must hold it whole; the
cluster's totals are not enough) and, where the autoscaler's node types are known, against those:

- a request that some node holds: go on;
- one that no node and no node type can hold (or no node of a local Ray, which has no
  autoscaler): :class:`~ray_pipeline.errors.ClusterError` (exit 2) naming the request, the
  nodes, the node types and the config field to change;
- one that a node type can hold, or (types unknown) that an autoscaler might: the autoscaler is
  asked for it (``ray.autoscaler.sdk.request_resources``: work not yet submitted makes no demand
  of its own) and the run waits for a node that can hold it, saying so, for at most
  ``ray.wait_timeout_s``; then exit 2 with what to check. The request is withdrawn as soon as a
  node holds it, whatever happens: one left behind by a killed driver would keep nodes up for
  ever, and from then on the stage's own actors or trials are the autoscaler's demand.

The node types come from the autoscaler's own cluster config (``ray.autoscaler_config``, else the
``~/ray_bootstrap_config.yaml`` that ``ray up`` writes on the head, where the driver runs under
``ray job submit``), read as the autoscaler reads it: ``available_node_types.<name>.resources``.
Why a file and not the running autoscaler: Ray 2.60 keeps the node types in the autoscaler's
process (monitor), with no public API to read them from the driver; the config file is what the
autoscaler itself was started from, so both read the same numbers. A type that does not declare
its resources (the autoscaler would ask the cloud) leaves the types unknown: the run then waits,
bounded, instead of refusing.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..config.ray_settings import RAY_UP_CONFIG, RaySettings
from ..errors import ClusterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One thing a stage will ask Ray for. what: in words ("an embedding actor"); resources: Ray's
    names (``CPU``, ``GPU``, custom) -> amount; change: the config field(s) that shrink it."""

    what: str
    resources: dict
    change: str


class _Session:
    settings = RaySettings()
    local = False  # a Ray this process started: no autoscaler


_session = _Session()


def configure(settings: Optional[RaySettings], *, local: Optional[bool]) -> None:
    """The settings of the Ray session this process holds (``session.ray_session`` calls this);
    local: whether this process started it (None: as it was)."""
    _session.settings = settings or RaySettings()
    if local is not None:
        _session.local = local


def node_types(path: Optional[str] = None) -> Optional[dict[str, dict]]:
    """Node type name -> its declared resources, from the autoscaler's cluster config at ``path``
    (else ``ray.autoscaler_config``, else ``~/ray_bootstrap_config.yaml`` where it exists); None
    where no config is found or a type declares no ``resources`` (then what it holds is unknown)."""
    import yaml

    given = path or _session.settings.autoscaler_config
    p = Path(given or RAY_UP_CONFIG).expanduser()
    if not p.is_file():
        if given:
            raise ClusterError(f"ray.autoscaler_config {given!r} does not exist; give the cluster.yaml the "
                               f"autoscaler runs with, or leave it empty")
        return None
    config = yaml.safe_load(p.read_text()) or {}
    types = config.get("available_node_types") or {}
    if not types or any("resources" not in t for t in types.values()):
        log.warning("the autoscaler config %s does not declare every node type's resources: the run cannot tell "
                    "which node type holds its requests, and waits for nodes instead", p)
        return None
    return {name: {k: float(v) for k, v in (t.get("resources") or {}).items()} for name, t in types.items()
            if t.get("max_workers", 1) > 0 or name == config.get("head_node_type")}  # max_workers 0: never added


def gpus_to_grow_to(cluster_gpus: float) -> float:
    """The GPUs a plan may count on: the cluster's now, or, where the autoscaler's node types are
    known, what its GPU worker types can add (``max_workers`` of each, within the config's own
    ``max_workers``) when that is more. An autoscaled cluster starts with no GPU worker: planned
    from the GPUs up now, the stages would never ask for one, and the autoscaler never add it."""
    import yaml

    if _session.local or node_types() is None:
        return cluster_gpus
    config = yaml.safe_load(Path(_session.settings.autoscaler_config or RAY_UP_CONFIG).expanduser().read_text())
    cap = config.get("max_workers", float("inf"))
    grow = sum(float((t.get("resources") or {}).get("GPU", 0)) * min(t.get("max_workers", 0), cap)
               for name, t in config["available_node_types"].items() if name != config.get("head_node_type"))
    return max(cluster_gpus, grow)


def fits(need: dict, have: dict) -> bool:
    return all(float(have.get(k, 0.0)) >= float(v) - 1e-9 for k, v in need.items() if v)


def _shown(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in sorted(res.items())
                           if v and not k.startswith(("node:", "memory", "object_store_memory"))) + "}"


def _nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def ensure_fits(requests: list[Request]) -> None:
    """Each request held by a node up now, or by one the autoscaler adds within
    ``ray.wait_timeout_s``; else :class:`ClusterError` (see the module's docstring)."""
    types = None if _session.local else node_types()
    for r in requests:
        nodes = _nodes()
        if any(fits(r.resources, n) for n in nodes):
            continue
        shapes = sorted({_shown(n) for n in nodes})
        able = [name for name, res in (types or {}).items() if fits(r.resources, res)]
        if _session.local or (types is not None and not able):
            where = ("" if types is None else
                     f", nor any node type the autoscaler can add ({', '.join(f'{k} {_shown(v)}' for k, v in types.items())})")
            raise ClusterError(f"{r.what} asks for {_shown(r.resources)} but no node can hold it: the nodes have "
                               f"{', '.join(shapes)}{where}; {r.change}")
        _wait_for_node(r, able)


def _wait_for_node(r: Request, able: list[str]) -> None:
    from ray.autoscaler.sdk import request_resources

    limit = _session.settings.wait_timeout_s
    kind = f"a node of type {' or '.join(able)}" if able else "a node"
    log.info("no node up can hold %s %s: asking the autoscaler for %s and waiting up to %gs (ray.wait_timeout_s)",
             r.what, _shown(r.resources), kind, limit)
    request_resources(bundles=[{k: v for k, v in r.resources.items() if v}])
    t0 = time.monotonic()
    said = t0
    try:
        while not any(fits(r.resources, n) for n in _nodes()):
            now = time.monotonic()
            if now - t0 >= limit:
                raise ClusterError(f"no node that can hold {r.what} {_shown(r.resources)} joined within {limit:g}s "
                                   f"(ray.wait_timeout_s): check `ray status` and the autoscaler's log (monitor.log "
                                   f"in the head's Ray session logs) for a quota, spot capacity or a failing setup "
                                   f"command; or {r.change}")
            if now - said >= 30:
                log.info("still waiting for %s for %s (%.0fs of %gs)", kind, r.what, now - t0, limit)
                said = now
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])  # the demand is the stage's own from here on
    log.info("%s joined after %.0fs", kind, time.monotonic() - t0)


@contextmanager
def bounded_waits(waiting: Callable[[], Optional[str]], what: str, change: str, *,
                  poll_s: float = 2.0) -> Iterator[None]:
    """Around a block that blocks while Ray waits (iterating a Ray Data dataset, whose actors Ray
    restarts without end where a node was lost and no other has room): a thread asks ``waiting()``
    every ``poll_s`` what the work waits for, in words (None while it can go on). A wait that lasts
    ``ray.wait_timeout_s`` raises :class:`ClusterError` in the block, naming ``what`` waits, for
    what, and ``change``; the wait is logged when it starts and every 30 s, and where a node joins
    the work goes on and the clock starts again at the next wait. The error reaches the block the
    way Ctrl-C does (``SIGUSR2`` sent to the main thread, handled here: a signal also wakes a wait on
    a lock, where the block may be; the handler raises a KeyboardInterrupt, the only exception that
    ends a ``ray.get``, turned into the ClusterError as it leaves the block), so the library in the
    block unwinds and shuts its own work down; main thread only (elsewhere the block runs
    unwatched, as Python cannot set handlers there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    limit = _session.settings.wait_timeout_s
    gave_up: list[ClusterError] = []
    stop, main = threading.Event(), threading.main_thread().ident

    def raise_in_block(signum, frame) -> None:
        if gave_up:
            raise _GaveUp()  # a KeyboardInterrupt: the one exception ray.get lets a signal handler raise in it

    def watch() -> None:
        since = said = None
        while not stop.wait(poll_s):
            why = waiting()
            now = time.monotonic()
            if why is None:
                if since is not None:
                    log.info("%s go on after waiting %.0fs", what, now - since)
                since = None
            elif since is None:
                since = said = now
                log.info("%s wait for a node with room (%s): waiting up to %gs (ray.wait_timeout_s)", what, why, limit)
            elif now - since >= limit:
                gave_up.append(ClusterError(
                    f"{what} waited {limit:g}s (ray.wait_timeout_s) for a node with room ({why}): a lost node was "
                    f"not replaced, or no node can take them; check `ray status` and, on an autoscaling cluster, "
                    f"the autoscaler's log (monitor.log in the head's Ray session logs) for a quota or spot "
                    f"capacity; or {change}; or raise ray.wait_timeout_s where a node takes longer to join. Run "
                    f"again with --resume to keep what is done"))
                signal.pthread_kill(main, GIVE_UP_SIGNAL)  # a real signal: it wakes a wait on a lock too
                return
            elif now - said >= 30:
                log.info("still waiting for a node with room for %s (%.0fs of %gs)", what, now - since, limit)
                said = now

    previous = signal.signal(GIVE_UP_SIGNAL, raise_in_block)
    watcher = threading.Thread(target=watch, name=f"watch {what}", daemon=True)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:  # _GaveUp itself, or what ray.get raises in its place (Ray's check_signals)
        if not gave_up:
            raise  # Ctrl-C
        raise gave_up[0] from None
    finally:
        stop.set()
        try:
            watcher.join()  # where it gave up as the block ended, the handler raises here
        except _GaveUp:
            raise gave_up[0] from None
        finally:
            signal.signal(GIVE_UP_SIGNAL, previous)


class _GaveUp(KeyboardInterrupt):
    """Raised in the watched block by :func:`bounded_waits`'s handler, turned into its
    ClusterError there. A KeyboardInterrupt because Ray's ``ray.get`` runs signal handlers inside
    its wait and stops waiting for that exception only (others are printed and the wait goes
    on); it then raises a plain KeyboardInterrupt in the block."""


GIVE_UP_SIGNAL = signal.SIGUSR2  # to this process's main thread only, with this module's handler; Tune listens to SIGUSR1


def wait_reachable(address: str, limit: float) -> None:
    """Wait, saying so, until the Ray cluster's GCS at ``host:port`` accepts a connection, for at
    most ``limit`` seconds; then :class:`ClusterError`. Other forms (``auto``, ``ray://``) are
    left to ``ray.init``."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    t0, said = time.monotonic(), None
    while True:
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=2.0).close()
            return
        except OSError as e:
            waited = time.monotonic() - t0
            if waited >= limit:
                raise ClusterError(f"cannot reach the Ray cluster at {address} within {limit:g}s "
                                   f"(ray.wait_timeout_s): {e.strerror or e}; check that it is up (`ray status` on "
                                   f"its head) and the address (--address, ray_address or RAY_ADDRESS)") from None
            if said is None or waited - said >= 30:
                log.info("waiting for the Ray cluster at %s to answer (up to %gs, ray.wait_timeout_s)", address, limit)
                said = waited
            time.sleep(min(1.0, max(0.0, limit - waited)))
