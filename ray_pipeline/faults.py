"""Fault injection for the reliability tests: the driver signals itself at a named point.

``RAY_PIPELINE_KILL_AT=<point>`` in the environment makes :func:`point` send SIGKILL to this
process when the run reaches that point (no cleanup, no atexit: a crash as the OS would deliver
it); ``RAY_PIPELINE_KILL_WITH=SIGINT`` (or ``SIGTERM``) sends that signal instead, as Ctrl-C or
``ray job stop`` would; ``SIGSTOP`` pauses the run there until the test sends ``SIGCONT`` (a
node killed at a known point of a stage). Unset, :func:`point` does nothing. Points: ``select:kmeans`` (after the
first K's k-means), ``select:written`` (selection.parquet written, the stage's marker not yet),
``report`` (before the report is written).
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("RAY_PIPELINE_KILL_AT") == name:
        os.kill(os.getpid(), signal.Signals[os.environ.get("RAY_PIPELINE_KILL_WITH", "SIGKILL")])
