"""Diagnostic codes: declared once, documented once, and what programs use instead of words."""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re

import pytest
from torch import nn

import kbitprep
from kbitprep import PreparationError, plan_preparation, prepare_model_for_kbit_training
from kbitprep.diagnostics import CODES, error_code, warning_code

DOCS = pathlib.Path(__file__).parents[1] / "docs" / "diagnostics.md"


def _import_every_module() -> None:
    """Codes are declared in the modules that report them: import them all."""
    for module in pkgutil.walk_packages(kbitprep.__path__, "kbitprep."):
        if not module.name.endswith("__main__"):  # runs the command line
            importlib.import_module(module.name)


def _row(code) -> str:
    category = code.category.__name__ if code.severity == "warning" else "-"
    return f"| `{code.code}` | {code.severity} | {category} | {code.summary} | `{code.module}` |"


def test_docs_table_lists_every_declared_code_once() -> None:
    _import_every_module()
    documented = [line for line in DOCS.read_text(encoding="utf-8").splitlines() if re.match(r"\| `[a-z0-9-]+` \|", line)]
    expected = sorted(_row(code) for code in CODES.values() if code.module.startswith("kbitprep."))
    assert sorted(documented) == expected, "docs/diagnostics.md should hold exactly these rows:\n" + "\n".join(expected)
    assert len(expected) >= 12


def test_a_code_is_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        warning_code("not-quantized", "again")
    with pytest.raises(ValueError, match="declared twice"):
        error_code("meta-device", "again")


def test_errors_carry_their_codes_to_the_caller() -> None:
    model = nn.Sequential(nn.ReLU())
    plan = plan_preparation(model)
    assert [d.to_dict() for d in plan.diagnostics] == [
        {"code": "not-quantized", "severity": "warning", "message": plan.warnings[0]},
        {"code": "no-parameters", "severity": "error", "message": plan.errors[0]}]
    with pytest.raises(PreparationError) as excinfo:
        prepare_model_for_kbit_training(model)
    assert excinfo.value.problems == plan.diagnostics[1:]
    assert excinfo.value.lines() == ["cannot prepare the model; nothing was changed:", plan.errors[0]]
    assert str(excinfo.value) == "cannot prepare the model; nothing was changed:\n- " + plan.errors[0]


def test_command_line_renders_each_problem_of_an_error_without_its_bullet() -> None:
    from kbitprep.cli import _one_line

    problems = [CODES["meta-device"]("weights never loaded - load them"), CODES["no-parameters"]("no parameters")]
    error = PreparationError("cannot prepare the model; nothing was changed", problems)
    assert _one_line(error) == ("cannot prepare the model; nothing was changed:; weights never loaded - load them; "
                                "no parameters")
