"""The errors ray_pipeline raises for bad input.

Every error a user can cause derives from :class:`PipelineError`; the CLI prints its message and
exits with status 2. Messages name what was wrong (file, row, field) and what to do about it.
Anything else that escapes is a bug in ray_pipeline, not in the input.
"""


class PipelineError(Exception):
    """Base class: a problem with the user's input, config or environment."""

    exit_code = 2


class ConfigError(PipelineError, ValueError):
    """A config field has a wrong type or value, or the config has an unknown key."""


class InputError(PipelineError, ValueError):
    """The data, embeddings or model given cannot be used as they are."""


class OutputError(PipelineError):
    """The output directory cannot be written as asked (e.g. it holds another run)."""


class Interrupted(Exception):
    """The run was stopped by a signal (SIGINT: Ctrl-C; SIGTERM: ``ray job stop``, a scheduler):
    not an error of the input, and not a finished run. The exit status is the shell's convention,
    128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signal_name}")


class ClusterError(PipelineError):
    """The Ray cluster cannot hold what the config asks (no node, and no node type the autoscaler
    can add, fits one request), or it did not answer within ``ray.wait_timeout_s``."""
