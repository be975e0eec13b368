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
