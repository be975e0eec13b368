"""Interrupts: SIGINT (Ctrl-C) and SIGTERM (what ``ray job stop`` and most schedulers send) stop the
run as *unfinished*, never as a run whose stage happened to end early.

Inside :func:`interruptible`, either signal raises :class:`~ray_pipeline.errors.Interrupted` in the
main thread, wherever it is (writing a shard, in k-means, between stages): the stage in progress
does not record itself, files half written are never renamed to their final names
(``io.run_dir.atomic_path``), and the command stops with 128 + the signal's number. ``--resume``
continues from what finished.

Two libraries put their own handlers in the way, and this module takes the signals back:

- ``ray.init`` sets a SIGTERM handler that exits the process (``sys.exit``), and a local Ray's node
  one that kills Ray's processes and exits 1: :func:`rearm` (called once Ray is up) installs ours
  again; the session's ``ray.shutdown()`` stops a local Ray as the exception unwinds.
- Tune catches SIGINT during ``fit`` and ends the sweep *as if it had finished* (it returns the
  trials, the cut one among them with fewer steps). :func:`tune_fit` keeps Tune's graceful stop
  (it saves the experiment's state for ``Tuner.restore``) but makes it ours: Tune's SIGINT handler
  is off (``TUNE_DISABLE_SIGINT_HANDLER``), our handler asks Tune to stop through SIGUSR1 (which
  Tune always listens to during ``fit``), and when ``fit`` returns the block raises
  :class:`Interrupted` instead of letting the sweep's results through. A second signal during that
  wind-down raises at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import Interrupted

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    active = False  # inside interruptible()
    in_tune = False  # inside tune_fit(): the first signal asks Tune to stop
    received: Optional[int] = None


_state = _State()


def _handler(signum: int, frame) -> None:
    first = _state.received is None
    _state.received = signum
    if _state.in_tune and first and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        log.warning("%s received: stopping the sweep (Tune saves its state for --resume); send it again to stop "
                    "at once", signal.Signals(signum).name)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own stop: its loop ends, the state is saved
        return
    raise Interrupted(signum)


def _install() -> None:
    for s in SIGNALS:
        signal.signal(s, _handler)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the block (main thread only: elsewhere
    Python cannot set handlers, and the block runs as it would without this). Handlers restored
    after."""
    if threading.current_thread() is not threading.main_thread() or _state.active:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.active, _state.received = True, None
    _install()
    try:
        yield
    finally:
        _state.active = False
        for s, h in previous.items():
            signal.signal(s, h)


def rearm() -> None:
    """Our handlers again, over those ``ray.init`` installed; nothing outside :func:`interruptible`."""
    if _state.active and threading.current_thread() is threading.main_thread():
        _install()


@contextmanager
def tune_fit() -> Iterator[None]:
    """Around ``tuner.fit()``: a signal stops Tune gracefully, then the block raises
    :class:`Interrupted` (see the module's docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Tune installs no handlers off the main thread either
        return
    before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # a handler left by an earlier fit would stop nothing
    with interruptible():  # also for a caller of the library, outside the CLI
        rearm()
        _state.in_tune = True
        try:
            yield
        finally:
            _state.in_tune = False
            signal.signal(signal.SIGUSR1, usr1)
            if before is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before
        if _state.received is not None:
            raise Interrupted(_state.received)
