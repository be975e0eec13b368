"""runtime.capacity without a cluster: the node types as the autoscaler reads them from
cluster.yaml, what fits where, and the bounded wait for a cluster that does not answer."""

import signal
import socket
import time
from pathlib import Path

import pytest
import yaml

from ray_pipeline.errors import ClusterError
from ray_pipeline.config.ray_settings import RaySettings
from ray_pipeline.runtime.capacity import bounded_waits, configure, fits, node_types, wait_reachable

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_node_types_are_cluster_yamls_declared_resources():
    assert node_types(str(CLUSTER_YAML)) == {"ray.head.default": {"CPU": 16.0},
                                             "ray.worker.gpu": {"CPU": 4.0, "GPU": 1.0}}


def test_a_type_without_declared_resources_leaves_the_types_unknown(tmp_path):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    del config["available_node_types"]["ray.worker.gpu"]["resources"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert node_types(str(tmp_path / "c.yaml")) is None


def test_a_missing_autoscaler_config_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ClusterError, match="ray.autoscaler_config"):
        node_types(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("need,have,ok", [
    ({"CPU": 1.5}, {"CPU": 1.0}, False),
    ({"CPU": 1.0, "GPU": 1}, {"CPU": 4.0, "GPU": 1.0}, True),
    ({"CPU": 0.1, "GPU": 0}, {"CPU": 0.1}, True),  # a zero asks nothing
    ({"CPU": 1, "GPU": 1}, {"CPU": 16.0}, False),
])
def test_fits_one_node_whole(need, have, ok):
    assert fits(need, have) is ok


def test_an_address_nobody_answers_gives_up_after_the_configured_time():
    with socket.socket() as s:  # a port bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at 127.0.0.1:\d+ within 0.5s"):
        wait_reachable(f"127.0.0.1:{port}", 0.5)


def test_a_local_ray_that_misses_its_start_window_is_tried_again_then_a_one_line_error(monkeypatch):
    """Ray's raylet has a fixed 30 s to register; on an overloaded machine it can miss it (seen
    here). That cannot be produced on demand, so ray.init raises Ray's own message here."""
    import ray

    from ray_pipeline.errors import ClusterError
    from ray_pipeline.runtime import session

    calls = []

    def init(**kw):
        calls.append(kw)
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ClusterError, match="a local Ray did not start: .* 3 times"):
        session._start_local(1, False)
    assert len(calls) == session.LOCAL_START_TRIES

    calls.clear()

    def init_second_time(**kw):  # misses the window once, then starts
        if not calls:
            init(**kw)
        calls.append(kw)
        return "ctx"

    monkeypatch.setattr(ray, "init", init_second_time)
    assert session._start_local(1, False) == "ctx" and len(calls) == 2


def test_any_other_failure_of_ray_init_is_not_swallowed(monkeypatch):
    import ray

    from ray_pipeline.runtime import session

    def init(**kw):
        raise RuntimeError("something else")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError, match="something else"):
        session._start_local(1, False)


# bounded_waits: a block that blocks while Ray waits, watched for a wait for room that has no end

@pytest.fixture
def wait_limit():
    def set_to(seconds: float) -> None:
        configure(RaySettings(wait_timeout_s=seconds), local=None)
    yield set_to
    configure(None, local=None)


def _blocks(seconds: float) -> None:
    """Blocks as Ray Data's iterator does while its actors wait (a loop of short sleeps)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def test_a_wait_for_room_past_the_limit_raises_in_the_block(wait_limit):
    wait_limit(0.3)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"the embedding actors waited 0.3s \(ray.wait_timeout_s\) for a node with "
                                           r"room \(1 actor\(s\) restarting\).*or lower embed.threads_per_actor.*--resume"):
        with bounded_waits(lambda: "1 actor(s) restarting", "the embedding actors", "lower embed.threads_per_actor",
                           poll_s=0.02):
            _blocks(30)
    assert time.monotonic() - t0 < 20  # cut, not waited out
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # the handler put back


def test_work_that_is_not_waiting_for_room_runs_past_the_limit(wait_limit):
    wait_limit(0.2)
    with bounded_waits(lambda: None, "x", "y", poll_s=0.02):
        _blocks(1.0)  # five limits of work


def test_the_clock_starts_again_once_a_wait_ends(wait_limit):
    """Two waits of 1 s each, under the 1.5 s limit and over it together, with a moment of work
    between: no error."""
    wait_limit(1.5)
    t0 = time.monotonic()

    def waiting():
        t = time.monotonic() - t0
        return None if 1.0 <= t < 1.5 or t >= 2.5 else "1 actor(s) restarting"

    with bounded_waits(waiting, "x", "y", poll_s=0.02):
        _blocks(2.8)


def test_an_error_of_the_block_is_its_own():
    with pytest.raises(ValueError, match="a shard failed"):
        with bounded_waits(lambda: None, "x", "y", poll_s=0.01):
            raise ValueError("a shard failed")


# retries.tasks_waiting: what a job's plain tasks wait for, read from Ray's state API

def _until(answer, want, seconds: float = 20.0):
    """``answer()`` polled until ``want(it)`` (the state API sees task events about a second late)."""
    end = time.monotonic() + seconds
    while True:
        got = answer()
        if want(got) or time.monotonic() > end:
            return got
        time.sleep(0.2)


def test_a_task_no_node_can_take_is_a_wait_and_one_running_is_not(local_ray):
    from ray_pipeline.runtime.retries import tasks_waiting

    ray = local_ray
    job = ray.get_runtime_context().get_job_id()

    @ray.remote(num_cpus=1, resources={"a_node_nobody_has": 1})
    def stranded():
        return 1

    @ray.remote(num_cpus=1)
    def busy(seconds):
        time.sleep(seconds)

    assert tasks_waiting(job) is None
    waits = stranded.remote()
    try:
        assert _until(lambda: tasks_waiting(job), lambda got: got is not None) == \
            "1 task(s) waiting for a node, none running"
        running = busy.remote(30)
        assert _until(lambda: tasks_waiting(job), lambda got: got is None) is None  # work goes on: not a wait
        ray.cancel(running, force=True)
    finally:
        ray.cancel(waits, force=True)



def test_actors_no_node_can_start_are_a_wait_and_one_loading_is_not(local_ray):
    """A first start: an actor no node has room for is a wait (no worker process yet); one whose
    constructor runs (a model loading) is work, however long, and so is one alive."""
    from ray.util.state import list_actors

    from ray_pipeline.runtime.retries import actors_waiting

    ray = local_ray
    job = ray.get_runtime_context().get_job_id()

    @ray.remote(num_cpus=1, resources={"a_node_nobody_has": 1})
    class StrandedEmbedder:
        pass

    @ray.remote(num_cpus=1)
    class LoadingEmbedder:
        def __init__(self, seconds):
            time.sleep(seconds)

        def ready(self):
            return True

    assert actors_waiting(job, "Embedder") is None  # none yet
    stranded = [StrandedEmbedder.remote() for _ in range(2)]
    try:
        assert _until(lambda: actors_waiting(job, "StrandedEmbedder"), lambda got: got is not None) == \
            "2 actor(s) waiting for a node to start on, none started"
        loading = LoadingEmbedder.remote(8)
        placed = _until(lambda: [a for a in list_actors(filters=[("job_id", "=", job)])
                                 if "LoadingEmbedder" in a.class_name], lambda got: got and got[0].pid)
        assert placed[0].state == "PENDING_CREATION"  # still in its constructor
        assert actors_waiting(job, "LoadingEmbedder") is None  # its constructor runs: not a wait
        ray.get(loading.ready.remote())
        assert actors_waiting(job, "Embedder") is None  # one alive: the stage goes on
        ray.kill(loading)
    finally:
        for a in stranded:
            ray.kill(a)
