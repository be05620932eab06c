"""Recording what a block of code warns about: Python warnings and warning-level log lines.

Users see both kinds on their console. transformers reports some problems through its
logger (`logger.warning_once`), not through `warnings`, and its library logger does not
propagate to the root logger, so a handler goes on the root logger and on each logger
that keeps its records to itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Iterator

__all__ = ["Emitted", "capture_warnings", "distinct"]


@dataclasses.dataclass(frozen=True)
class Emitted:
    """One warning as a user would see it.

    Args:
        kind (str): "warning" (the `warnings` module) or "log" (a logging record at WARNING or above).
        category (str): the warning class, or the logger's name.
        message (str): the first line of the message.
    """

    kind: str
    category: str
    message: str

    def __str__(self) -> str:
        return f"{self.category}: {self.message}"


class _Recorder(logging.Handler):
    def __init__(self, sink: list[Emitted]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(Emitted("log", record.name, _first_line(record.getMessage())))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _loggers_to_watch() -> list[logging.Logger]:
    """The root logger, plus every logger whose records never reach it."""
    loggers = [logging.getLogger()]
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and not logger.propagate:
            loggers.append(logger)
    return loggers


@contextlib.contextmanager
def capture_warnings() -> Iterator[list[Emitted]]:
    """Record every warning and warning log line emitted inside the block, in order.

    Warnings are shown "always" inside the block, so one already emitted earlier in the
    process (and normally deduplicated) still counts; captured ones are not printed.
    """
    emitted: list[Emitted] = []
    recorder = _Recorder(emitted)
    loggers = _loggers_to_watch()
    for logger in loggers:
        logger.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield emitted
        emitted.extend(Emitted("warning", item.category.__name__, _first_line(str(item.message))) for item in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)


def distinct(emitted: list[Emitted]) -> list[tuple[Emitted, int]]:
    """Each distinct warning with how many times it was emitted, in order of first appearance."""
    return list(Counter(emitted).items())
