"""The warning and error types kbitprep raises, so callers can filter or catch them by kind."""

from __future__ import annotations


class KbitPrepError(Exception):
    """Base of every error kbitprep raises: the message names the problem and the fix."""


class KbitPrepWarning(UserWarning):
    """A preparation went ahead, but something about the model deserves the user's attention."""


class NotQuantizedWarning(KbitPrepWarning):
    """The model holds no quantized weights, so k-bit preparation is probably not what was meant."""


class PreparationError(KbitPrepError, ValueError):
    """The model cannot be prepared as asked; nothing was changed.

    The message names every problem found and what to do about it.
    """


class GradientFlowError(KbitPrepError, RuntimeError):
    """A forward/backward check found gradients where none should be, or none where they should."""
