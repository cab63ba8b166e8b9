"""The base class of user and data errors, which ``spotocc <command>`` reports in one line.

Raise a subclass of :class:`SpotoccError` for anything the user can fix (an argument, a config, a
file); the CLI prints ``spotocc <command>: error: <message>`` and exits with status 2. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class SpotoccError(Exception):
    """A user or data error (bad argument, config, dataset file or checkpoint), not a bug.

    torch's DataLoader re-raises a worker's exception as ``type(err)(message=<worker traceback>)``
    when the class has a ``message`` attribute; the original message is recovered from it, and the
    whole text is kept in :attr:`worker_traceback`.
    """

    worker_traceback: str | None = None

    def __init__(self, *args: Any, message: str | None = None) -> None:
        if message is not None:  # a DataLoader worker's re-raise
            self.worker_traceback = message
            args = (_original_message(type(self), message),)
        super().__init__(*args)

    @property
    def message(self) -> str:
        """The message on one line (what the CLI prints)."""
        return " ".join(line.strip() for line in str(self).splitlines() if line.strip())


def _original_message(cls: type, text: str) -> str:
    """The original exception's message at the end of a worker traceback (``module.Class: message``)."""
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    return text.rsplit(prefix, 1)[-1].strip() if prefix in text else text


class UsageError(SpotoccError, ValueError):
    """Command-line arguments that cannot work (out of range, contradictory, naming nothing)."""


class ConfigError(SpotoccError, ValueError):
    """An unknown preset, a bad override or an invalid saved config."""


class MissingConfigError(ConfigError, FileNotFoundError):
    """A saved config file that does not exist (also a :class:`FileNotFoundError`)."""
