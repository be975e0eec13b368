"""runtime.interrupt: a real signal sent to this process inside interruptible() raises Interrupted,
with the shell's exit status, and the handlers in place before are put back."""

import os
import signal

import pytest

from ray_pipeline.errors import Interrupted
from ray_pipeline.io.run_dir import mark_interrupted, write_json
from ray_pipeline.runtime.interrupt import interruptible, tune_fit


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_interrupted_with_the_shells_status(sig, code):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as got:
        with interruptible():
            os.kill(os.getpid(), sig)
            signal.pause()  # not reached: the handler raises as soon as the signal arrives
    assert got.value.exit_code == code and got.value.signal_name == sig.name
    assert signal.getsignal(sig) is before


def test_a_signal_during_tune_fit_is_raised_after_the_block_not_swallowed():
    """What Tune does with its graceful stop: the block ends normally (here: at once, nothing is
    listening to SIGUSR1 but the handler tune_fit left at its default, so the signal raises)."""
    with pytest.raises(Interrupted):
        with tune_fit():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
    assert os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") is None


def test_a_stop_requested_of_tune_raises_when_fit_returns():
    """Tune's SIGUSR1 handler is in place (as during fit): the first signal asks it to stop and
    returns; the block then raises Interrupted instead of letting the sweep's results through."""
    asked = []
    with pytest.raises(Interrupted) as got:
        with tune_fit():
            signal.signal(signal.SIGUSR1, lambda *a: asked.append(True))  # what Tune installs in fit
            os.kill(os.getpid(), signal.SIGINT)
            assert asked == [True]  # reached: the signal did not raise, Tune was asked
    assert got.value.exit_code == 130


def test_mark_interrupted_names_the_cut_stage(tmp_path):
    write_json({"status": "running", "stages": {"read": {"status": "complete"}, "embed": {"status": "complete"}}},
               tmp_path / "run.json")
    assert mark_interrupted(tmp_path, "SIGTERM") == "select"
    import json

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "interrupted" and info["interrupted"] == {"signal": "SIGTERM", "stage": "select"}
    assert mark_interrupted(tmp_path, "SIGINT") is None  # not running: left as it is
