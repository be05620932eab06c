"""The warning and error types kbitprep raises, so callers can filter or catch them by kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Problem(Protocol):
    """What an error reports about each problem: a `kbitprep.diagnostics.Diagnostic` is one."""

    @property
    def code(self) -> str: ...

    @property
    def message(self) -> str: ...


class KbitPrepError(Exception):
    """Base of every error kbitprep raises: the message names the problem and the fix."""


class InvalidArgumentError(KbitPrepError, ValueError):
    """An argument or input has the right type but a value kbitprep cannot use (a ValueError, as the API promises)."""


class ArgumentTypeError(KbitPrepError, TypeError):
    """An argument has the wrong type (a TypeError, as the API promises)."""


class MissingFileError(KbitPrepError, FileNotFoundError):
    """A file kbitprep needs (a config.json, a model folder's weights) is not there."""


class KbitPrepWarning(UserWarning):
    """A preparation went ahead, but something about the model deserves the user's attention."""


class NotQuantizedWarning(KbitPrepWarning):
    """The model holds no quantized weights, so k-bit preparation is probably not what was meant."""


class PreparationError(KbitPrepError, ValueError):
    """The model cannot be prepared as asked; nothing was changed.

    The message names every problem found and what to do about it, one per line.

    Args:
        headline (str): what happened, e.g. "cannot prepare the model; nothing was changed".
        problems (Sequence[Problem]): the errors found (diagnostics), each with its code.
    """

    def __init__(self, headline: str, problems: Sequence[Problem] = ()) -> None:
        self.headline = headline
        self.problems = tuple(problems)
        super().__init__("\n- ".join(self.lines()))

    def lines(self) -> list[str]:
        """The headline, then each problem's message."""
        return [self.headline + (":" if self.problems else ""), *(p.message for p in self.problems)]


class GradientFlowError(KbitPrepError, RuntimeError):
    """A forward/backward check found gradients where none should be, or none where they should."""
