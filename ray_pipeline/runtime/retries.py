"""What Ray retried of a job's actors, from its state API: the restarts of an actor lost with its
worker or node, and the tasks run again on it. Ray Data's actor pools ask for both
(``max_restarts=-1``, ``max_task_retries=-1``), and Ray retries them silently; the stages record
the counts (``run.json``) so that a run says what a lost node cost it. What a stage's actors
(:func:`actors_waiting`) or tasks (:func:`tasks_waiting`) wait for, where they wait for a node
with room, is read from the same API (``capacity.bounded_waits`` bounds that wait).
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


def actor_retries(job_id: str, class_part: str, before: Optional[dict] = None) -> Optional[dict]:
    """``actor_restarts`` and ``tasks_retried`` of job ``job_id``'s actors whose class name holds
    ``class_part``, counted over those not in ``before`` (this function's answer at an earlier
    point: its ``actors``, the ids seen), so that a stage counts only its own; None where the state
    API does not answer (a Ray without its dashboard).

    Example (on a running Ray):
        >>> before = actor_retries(job, "ShardEmbedder")  # doctest: +SKIP
        >>> actor_retries(job, "ShardEmbedder", before)  # doctest: +SKIP
        {'actor_restarts': 1, 'tasks_retried': 6, 'actors': [...]}
    """
    from ray.util.state import list_tasks
    from ray.util.state.exception import RayStateApiException

    try:
        actors = _job_actors(job_id, class_part, before, detail=True)
        seen = set((before or {}).get("actors", ()))
        # 10,000: the most the API server returns
        tasks = list_tasks(filters=[("job_id", "=", job_id), ("type", "=", "ACTOR_TASK")], detail=True,
                           limit=10_000, raise_on_missing_output=False) if actors else []
    except (RayStateApiException, ConnectionError) as e:
        log.debug("the state API did not answer (%s): retries not counted", e)
        return None
    ids = {a.actor_id for a in actors}
    return {"actor_restarts": int(sum(a.num_restarts or 0 for a in actors)),
            "tasks_retried": sum(1 for t in tasks if t.attempt_number and t.actor_id in ids),
            "actors": sorted(seen | ids)}


def actors_waiting(job_id: str, class_part: str, before: Optional[dict] = None) -> Optional[str]:
    """What job ``job_id``'s actors whose class name holds ``class_part`` (those not in
    ``before``, as :func:`actor_retries`) wait for, in words, where none of them is alive and
    either one lost with its worker or node waits to start again (``RESTARTING``: no room left for
    it, or its constructor running again) or every one waits for a node to start on for the first
    time (``PENDING_CREATION`` with no worker process yet: no node has room, e.g. while the
    autoscaler adds one). None where one is alive, one's constructor runs (a first start with a
    worker process: a model loading, however long), or the state API does not answer within 5 s
    (then a wait cannot be told from work).

    Example (on a running Ray where no node has the resources the stage's actors ask for):
        >>> actors_waiting(job, "ShardEmbedder")  # doctest: +SKIP
        '2 actor(s) waiting for a node to start on, none started'
    """
    from ray.util.state.exception import RayStateApiException

    try:
        mine = _job_actors(job_id, class_part, before, timeout=5)
    except (RayStateApiException, ConnectionError, TimeoutError) as e:
        log.debug("the state API did not answer (%s): a wait for a node not watched", e)
        return None
    if any(a.state == "ALIVE" for a in mine):
        return None
    restarting = sum(a.state == "RESTARTING" for a in mine)
    if restarting:
        return f"{restarting} actor(s) lost with a node and restarting, none alive"
    unplaced = sum(a.state == "PENDING_CREATION" and not a.pid for a in mine)  # pid: its worker, once placed
    return f"{unplaced} actor(s) waiting for a node to start on, none started" if mine and unplaced == len(mine) else None


# a task in one of these states is being worked on: its job goes on
_ON_THE_WAY = {"SUBMITTED_TO_WORKER", "PENDING_ARGS_FETCH", "GETTING_AND_PINNING_ARGS", "PENDING_OBJ_STORE_MEM_AVAIL",
               "RUNNING", "RUNNING_IN_RAY_GET", "RUNNING_IN_RAY_WAIT"}


def tasks_waiting(job_id: str) -> Optional[str]:
    """What job ``job_id``'s tasks (plain Ray tasks, not actors') wait for, in words, where some
    wait for a node to run on (``PENDING_NODE_ASSIGNMENT``: no node has room, e.g. a lost one's
    tasks retried, or its objects rebuilt, where no other node has a free CPU) and none is on its
    way (running, or its arguments being fetched). None while one is on its way, none waits, or
    the state API does not answer within 5 s.

    Example (on a running Ray whose only CPU node was just lost):
        >>> tasks_waiting(job)  # doctest: +SKIP
        '3 task(s) waiting for a node, none running'
    """
    from ray.util.state import list_tasks
    from ray.util.state.exception import RayStateApiException

    try:
        tasks = list_tasks(filters=[("job_id", "=", job_id), ("type", "=", "NORMAL_TASK"), ("state", "!=", "FINISHED")],
                           limit=10_000, timeout=5, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError, TimeoutError) as e:
        log.debug("the state API did not answer (%s): a wait for a node not watched", e)
        return None
    if any(t.state in _ON_THE_WAY for t in tasks):
        return None
    pending = sum(t.state == "PENDING_NODE_ASSIGNMENT" for t in tasks)
    return f"{pending} task(s) waiting for a node, none running" if pending else None


def _job_actors(job_id: str, class_part: str, before: Optional[dict], **kw) -> list:
    """Job ``job_id``'s actors whose class name holds ``class_part``, less those in ``before``
    (:func:`actor_retries`'s ``actors``); ``kw`` to ``list_actors`` (detail, timeout)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("job_id", "=", job_id)], limit=10_000, raise_on_missing_output=False, **kw)
    seen = set((before or {}).get("actors", ()))
    return [a for a in actors if class_part in (a.class_name or "") and a.actor_id not in seen]
