"""What the user's terminal shows, and the run's log file that holds the rest.

The CLI decides once per command (:class:`Logs`, from ``--verbose`` and ``--no-progress``) and
passes the outcome down as a :class:`Console`: to :func:`~.session.ray_session`, where Ray
starts or is joined, and to the stages that draw progress bars. By default the console shows the
``ray_pipeline`` lines from INFO and one bar per stage; Ray's driver and worker output, Tune's
trial results, the libraries' warnings go to ``<out>/logs/run.log`` (Ray's own session logs stay
where Ray keeps them). ``--verbose`` shows everything on the console as well, and our DEBUG lines.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import PipelineError

log = logging.getLogger("ray_pipeline")

LOG_FILE = Path("logs") / "run.log"  # in the output directory of a command that runs stages
FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The logger that carries the lines Ray's workers print (their stdout and stderr, which Ray streams
# to the driver) into the run's log: neither under ``ray_pipeline`` (not the run's own lines) nor under
# ``ray`` (whose logger Ray configures).
WORKER_LOG = "ray_workers"


@dataclass(frozen=True)
class Console:
    """The policy the stages get.

    ``log_file``: the run's log, written by the root logging handler :class:`Logs` installs; with
    it, :func:`~.session.ray_session` sends Ray's driver loggers (``ray``, ``ray.data``) to the
    root logger and the workers' lines to :data:`WORKER_LOG`, so the file holds everything. None:
    Ray's logging as Ray sets it up. ``verbose``: everything on the console too, Ray Data's bars and
    Tune's tables included; else the ``ray_pipeline`` lines and one bar per stage. ``progress``:
    bars at all (``--no-progress``: none).

    The default, for library callers, is what Ray and the libraries print by themselves.

    Example:
        >>> Console(verbose=False).bars, Console(verbose=False).ray_bars, Console().ray_bars
        (True, False, True)
    """

    verbose: bool = True
    progress: bool = True
    log_file: Optional[Path] = None

    def announce(self) -> None:
        """Say where the log file is: once the run has started, so a refused command does not name
        a file it never wrote."""
        if self.log_file is not None:
            log.info("log file: %s%s", self.log_file, "" if self.verbose else
                     " (Ray, its workers, Tune and the libraries write there; --verbose shows them here)")

    @property
    def bars(self) -> bool:
        """Our own bar per stage, where Ray would draw its own (Ray Data's bars, Tune's tables)."""
        return self.progress and not self.verbose

    @property
    def ray_bars(self) -> bool:
        """Ray's own progress output: Ray Data's bars, Tune's status tables."""
        return self.progress and self.verbose


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "ray_pipeline" or record.name.startswith("ray_pipeline.")


class Shown(logging.Filter):
    """The records a handler takes: ours (``ray_pipeline.*``) from level ``ours`` up, everyone
    else's from ``others`` up (None: none of them), never those of the loggers in ``hide``."""

    def __init__(self, ours: int, others: Optional[int], hide: tuple = ()):
        super().__init__()
        self.ours, self.others, self.hide = ours, others, hide

    def filter(self, record: logging.LogRecord) -> bool:
        if _ours(record):
            return record.levelno >= self.ours
        return self.others is not None and record.levelno >= self.others and record.name not in self.hide


class _Brief(logging.Formatter):
    """``12:00:01 stage embed: start``: the time and the message; a warning or an error says so."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{record.asctime} {level}{record.message}"


class _ConsoleHandler(logging.StreamHandler):
    """To ``sys.stderr`` as it is when a record comes (a redirect, a test's capture), written
    between tqdm's bars rather than through them."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the console is whatever sys.stderr is now
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)


class RunLog(logging.Handler):
    """The run's log file, appended to, and opened once the output directory exists: every input
    is checked before a stage creates it, so until then the records wait here, and a command
    refused before that writes nothing."""

    def __init__(self, path: Path):
        super().__init__(logging.DEBUG)
        self.path = path
        self._file: Optional[logging.FileHandler] = None
        self._held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # under the handler's lock: worker lines come from a thread
        if self._file is None:
            if not self.path.parent.parent.is_dir():
                self._held.append(record)
                return
            self.path.parent.mkdir(exist_ok=True)
            self._file = logging.FileHandler(self.path, encoding="utf-8")
            self._file.setFormatter(self.formatter)
            for held in self._held:
                self._file.emit(held)
            self._held.clear()
        self._file.emit(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


@contextmanager
def _level(logger: logging.Logger, level: int) -> Iterator[None]:
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextmanager
def _libraries_to_the_log() -> Iterator[None]:
    """Python warnings and transformers' messages go through logging (to the run's log), and
    transformers draws no weight-loading bars, in this process; put back after. (Workers are other
    processes: what they print reaches the log through :func:`~.session.ray_session`.)"""
    import transformers.utils.logging as hf

    hf_logger = hf.get_logger()  # its library root logger, holding transformers' own stderr handler
    handlers, propagate, bars = list(hf_logger.handlers), hf_logger.propagate, hf.is_progress_bar_enabled()
    logging.captureWarnings(True)
    hf.disable_default_handler()
    hf.enable_propagation()
    hf.disable_progress_bar()
    try:
        yield
    finally:
        logging.captureWarnings(False)
        hf_logger.handlers[:] = handlers
        hf_logger.propagate = propagate
        if bars:
            hf.enable_progress_bar()


class Logs:
    """One command's logging, as a context manager: the console handler from the start; for a
    command that runs stages, the run's log file too (:meth:`run_console`). Undone on exit, so that
    commands run one after another in one process (the tests) do not stack handlers.

    The console shows our lines from INFO (DEBUG with ``verbose``) and, with no log file to hold
    them, the others' warnings. With a log file, the file takes everything (ours from DEBUG, the
    rest from INFO: Ray's driver loggers, its workers' lines, Tune, the libraries); ``verbose``
    shows all of it on the console as well, except the workers' lines, which Ray prints itself.
    """

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.run_log: Optional[RunLog] = None
        self._undo = ExitStack()

    def __enter__(self) -> "Logs":
        root = logging.getLogger()
        self._undo.enter_context(_level(root, min(root.level, logging.INFO)))
        self._undo.enter_context(_level(logging.getLogger("ray_pipeline"), logging.DEBUG))
        logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU-feature probe
        self.console = _ConsoleHandler()
        self.console.setFormatter(logging.Formatter(FULL, "%H:%M:%S") if self.verbose
                                  else _Brief("%(asctime)s %(message)s", "%H:%M:%S"))
        self.shown = Shown(logging.DEBUG, logging.INFO) if self.verbose else Shown(logging.INFO, logging.WARNING)
        self.console.addFilter(self.shown)
        self._add(self.console)
        return self

    def _add(self, handler: logging.Handler) -> None:
        logging.getLogger().addHandler(handler)
        self._undo.callback(handler.close)
        self._undo.callback(logging.getLogger().removeHandler, handler)

    def run_console(self, out: str, *, progress: bool) -> Console:
        """Open the run's log in ``out`` (the output directory), say where it is, and return the
        console the stages get."""
        path = Path(out) / LOG_FILE
        self.run_log = RunLog(path)
        self.run_log.setFormatter(logging.Formatter(FULL, "%Y-%m-%d %H:%M:%S"))
        self.run_log.addFilter(Shown(logging.DEBUG, logging.INFO))
        self._add(self.run_log)
        if self.verbose:
            self.shown.hide = (WORKER_LOG,)
        else:
            self.shown.others = None
            self._undo.enter_context(_libraries_to_the_log())
        return Console(verbose=self.verbose, progress=progress, log_file=path)

    def failed(self, exc: BaseException) -> None:
        """Record in the run's log why the command stopped (the console has it already)."""
        if self.run_log is not None:
            trace = None if isinstance(exc, PipelineError) else (type(exc), exc, exc.__traceback__)
            self.run_log.handle(logging.makeLogRecord({"name": log.name, "levelno": logging.ERROR,
                                                       "levelname": "ERROR", "msg": "stopped: %s", "args": (exc,),
                                                       "exc_info": trace}))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # a bug or an interrupt: Python prints the traceback on the console
            self.failed(exc)
        self._undo.close()
