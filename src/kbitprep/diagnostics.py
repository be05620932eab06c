"""Warnings and errors with stable codes: a message is for people, a code is for programs.

Every warning and error kbitprep reports about a model is a `Diagnostic`: a code, a
severity and a message. Programs filter, count and test by the code; the message may be
reworded at any time. Each code is declared once, in the module that reports it, with a
one-line call:

    NOT_QUANTIZED = warning_code("not-quantized", "the model holds no quantized weights",
                                 NotQuantizedWarning)
    ...
    diagnostics.append(NOT_QUANTIZED(f"model is not quantized ({evidence}): ..."))

A warning is emitted through Python's `warnings` module with its code's category, so
existing `warnings.filterwarnings(...)` rules keep working; the warning object carries
the code as `.code`. docs/diagnostics.md lists
every code; a test keeps that table and `CODES` equal.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from .errors import InvalidArgumentError, KbitPrepWarning

__all__ = ["CODES", "Diagnostic", "DiagnosticCode", "Severity", "error_code", "warning_code"]

Severity = Literal["warning", "error"]


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One warning or error about a model.

    Args:
        code (str): the stable code, e.g. ``"not-quantized"``; see docs/diagnostics.md.
        severity (str): ``"warning"`` (preparation goes ahead) or ``"error"`` (it does not).
        message (str): what is wrong and what to do about it, for people.
    """

    code: str
    severity: Severity
    message: str

    @property
    def category(self) -> type[Warning]:
        """The Python warning category a warning is emitted with."""
        return CODES[self.code].category

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}

    def as_warning(self) -> Warning:
        """The warning to hand to `warnings.warn`: its code's category, with `.code` set."""
        warning = self.category(self.message)
        warning.code = self.code  # type: ignore[attr-defined]  # for callers that record warnings
        return warning


@dataclasses.dataclass(frozen=True)
class DiagnosticCode:
    """A declared code; calling it with a message makes a `Diagnostic`.

    Args:
        code (str): the stable code (lower case, words joined by hyphens).
        severity (str): ``"warning"`` or ``"error"``.
        summary (str): what the code means, for the docs table.
        category (type[Warning]): the Python warning category of a warning. Default: KbitPrepWarning
        module (str): the module that declared it (and reports it). Default: ""
    """

    code: str
    severity: Severity
    summary: str
    category: type[Warning] = KbitPrepWarning
    module: str = ""

    def __call__(self, message: str) -> Diagnostic:
        return Diagnostic(self.code, self.severity, message)


# code -> declaration, filled as the modules that report them are imported.
CODES: dict[str, DiagnosticCode] = {}


def _declare(code: str, severity: Severity, summary: str, category: type[Warning]) -> DiagnosticCode:
    if code in CODES:
        raise InvalidArgumentError(f"diagnostic code {code!r} is declared twice; pick another code")
    # The declaring module: two frames up, past warning_code/error_code.
    module = sys._getframe(2).f_globals.get("__name__", "")
    CODES[code] = DiagnosticCode(code, severity, summary, category, module)
    return CODES[code]


def warning_code(code: str, summary: str, category: type[Warning] = KbitPrepWarning) -> DiagnosticCode:
    """Declare a warning code.

    Args:
        code (str): the stable code, e.g. ``"offload-without-accelerator"``.
        summary (str): what it means, one line, for docs/diagnostics.md.
        category (type[Warning]): the category `warnings.warn` uses for it. Default: KbitPrepWarning

    Returns:
        DiagnosticCode: call it with a message to make a `Diagnostic`.

    Raises:
        ValueError: the code is declared already.
    """
    return _declare(code, "warning", summary, category)


def error_code(code: str, summary: str) -> DiagnosticCode:
    """Declare an error code: a problem that stops preparation before it changes anything.

    Args:
        code (str): the stable code, e.g. ``"meta-device"``.
        summary (str): what it means, one line, for docs/diagnostics.md.

    Returns:
        DiagnosticCode: call it with a message to make a `Diagnostic`.

    Raises:
        ValueError: the code is declared already.
    """
    return _declare(code, "error", summary, KbitPrepWarning)
