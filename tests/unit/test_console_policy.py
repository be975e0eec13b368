"""The console policy without Ray: which records the terminal shows and which only the run's log
holds, the log opened only once the run's directory exists, and everything undone after."""

import logging
import warnings

from ray_pipeline.runtime.console import WORKER_LOG, Logs, RunLog

OURS = logging.getLogger("ray_pipeline.some.stage")
THEIRS = logging.getLogger("somelibrary")
WORKERS = logging.getLogger(WORKER_LOG)


def _say_everything(warn: bool = False):
    OURS.info("our line")
    OURS.debug("our detail")
    THEIRS.info("their chatter")
    THEIRS.warning("their warning")
    WORKERS.info("(MapWorker pid=1) Loading weights: 100%")
    if warn:  # where it goes to the log, else pytest reports it
        warnings.warn("a library's deprecation", UserWarning)


def test_the_run_log_waits_for_the_run_directory_and_a_refused_command_writes_nothing(tmp_path):
    out = tmp_path / "run"
    handler = RunLog(out / "logs" / "run.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.makeLogRecord({"msg": "before the run started"}))
    assert not out.exists()  # an input refused now leaves no directory behind
    out.mkdir()  # the run started: what waited is written first, in order
    handler.handle(logging.makeLogRecord({"msg": "after"}))
    handler.close()
    assert (out / "logs" / "run.log").read_text().splitlines() == ["before the run started", "after"]


def test_by_default_the_console_shows_our_lines_and_the_log_file_everything(tmp_path, capfd):
    out = tmp_path / "run"
    before = list(logging.getLogger().handlers)
    with Logs(verbose=False) as logs:
        console = logs.run_console(str(out), progress=True)
        out.mkdir()
        console.announce()  # the pipeline's first line once the run started
        _say_everything(warn=True)
    err = capfd.readouterr().err
    assert console.log_file == out / "logs" / "run.log" and console.bars and not console.ray_bars
    assert err.splitlines()[0].endswith(f"log file: {out / 'logs' / 'run.log'} (Ray, its workers, Tune and the "
                                        f"libraries write there; --verbose shows them here)")
    assert "our line" in err and "INFO" not in err  # our lines, brief: the time and the message
    for noise in ("our detail", "their chatter", "their warning", "Loading weights", "deprecation"):
        assert noise not in err
    log = console.log_file.read_text()
    for line in ("INFO ray_pipeline.some.stage: our line", "DEBUG ray_pipeline.some.stage: our detail",
                 "INFO somelibrary: their chatter", "WARNING somelibrary: their warning",
                 f"INFO {WORKER_LOG}: (MapWorker pid=1) Loading weights", "UserWarning: a library's deprecation"):
        assert line in log
    # undone: no handler left behind, warnings printed as Python prints them again
    assert logging.getLogger().handlers == before
    assert warnings.showwarning is warnings._showwarning_orig


def test_verbose_shows_everything_but_the_workers_lines_which_ray_prints_itself(tmp_path, capfd):
    out = tmp_path / "run"
    out.mkdir()
    with Logs(verbose=True) as logs:
        console = logs.run_console(str(out), progress=True)
        _say_everything()
    err = capfd.readouterr().err
    assert console.ray_bars and not console.bars
    for shown in ("DEBUG ray_pipeline.some.stage: our detail", "INFO somelibrary: their chatter",
                  "WARNING somelibrary: their warning"):
        assert shown in err
    assert "Loading weights" not in err  # Ray's own printer shows the workers' lines with --verbose
    assert "Loading weights" in console.log_file.read_text()


def test_without_a_run_the_console_still_shows_the_others_warnings(capfd):
    with Logs(verbose=False):  # export, predict, --check: no log file to hold them
        _say_everything()
    err = capfd.readouterr().err
    assert "our line" in err and "warning: their warning" in err
    assert "their chatter" not in err and "our detail" not in err


def test_a_command_that_stops_says_why_in_its_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    try:
        with Logs(verbose=False) as logs:
            console = logs.run_console(str(out), progress=False)
            raise RuntimeError("a bug")
    except RuntimeError:
        pass
    log = console.log_file.read_text()
    assert "ERROR ray_pipeline: stopped: a bug" in log and "Traceback" in log
