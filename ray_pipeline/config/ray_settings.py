"""The ``ray:`` section of the config: how long the run waits on the cluster, and where the
autoscaler's node types are read from. Neither changes a result: a run resumed with other values
is the same run (``io.run_dir.same_run``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .typed import fail

# Where `ray up` puts the cluster config on the head node, which runs the driver under `ray job submit`.
RAY_UP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class RaySettings:
    """``wait_timeout_s``: the longest the run waits, logging what it waits for, to reach the
    cluster at ``ray_address``, for the autoscaler to add a node that can hold a request, for
    such a node to appear, or for a node with room for the embedding actors (none alive, and one
    lost with its node or all yet to start); then it stops with exit status 2 and what to check.
    ``autoscaler_config``: the autoscaler's cluster config (a ``cluster.yaml``), whose
    ``available_node_types`` (their ``resources``, declared explicitly) say what the cluster can
    grow to; empty: ``~/ray_bootstrap_config.yaml`` where it exists (where ``ray up`` copies it on
    the head), else only the nodes up now count."""

    wait_timeout_s: float = 600.0
    autoscaler_config: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.wait_timeout_s > 0:
            fail("ray.wait_timeout_s", self.wait_timeout_s, "seconds > 0 (e.g. 600)")
