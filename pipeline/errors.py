"""The two exception families the entry point treats specially, and how a message shows a path."""

import os
from pathlib import Path


class PipelineError(Exception):
    """A user mistake (bad config, missing input, corrupt file).

    The entry point prints it as one line, so the message must name the key, file or record
    and say how to fix it.
    """


class MissingUpstream(PipelineError):
    """An upstream stage's output is not there yet."""


class BadInput(PipelineError):
    """An input file or record cannot be used."""


class StageKilled(BaseException):
    """Raised in the main thread on SIGTERM so runs end as KILLED and partial output stays aside.

    A BaseException, like KeyboardInterrupt, so `except Exception` in libraries cannot swallow it.
    """

    def __init__(self, signal_name: str):
        super().__init__(f"killed by {signal_name}")
        self.signal_name = signal_name


class ConfigError(PipelineError):
    """A config value out of range, raised by a dataclass's ``__post_init__``.

    ``key`` is relative to that dataclass (``rank``, ``sources.web.path``); ``pipeline.config.load``
    adds the section's prefix, so the message names the full key (``sft.lora.rank``).
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key '{key}' {problem}")
        self.key, self.problem = key, problem


def check(ok: bool, key: str, value, expected: str) -> None:
    """Raise a ConfigError for ``key`` unless ``ok``: ``config key 'rank' is 0; it must be at least 1``."""
    if not ok:
        raise ConfigError(key, f"is {value!r}; it must be {expected}")


def choice(kind, value, key: str):
    """``value`` as a member of the enum ``kind`` (a string from code or a test is accepted), or a ConfigError."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(key, f"is {value!r}; it must be one of {', '.join(m.value for m in kind)}") from None


def shown_path(path) -> str:
    """``path`` as a message shows it: relative to the working directory when it lies below it
    (outputs/demo/...), else absolute."""
    path = Path(os.fsdecode(path)).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
