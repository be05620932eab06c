"""One error base: every error kbitprep defines derives from KbitPrepError, and the CLI catches that base."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import kbitprep
from kbitprep.cli import inspect as inspect_command
from kbitprep.cli import main
from kbitprep.errors import KbitPrepError


def defined_errors() -> list[type[BaseException]]:
    """Every exception class (warnings aside) defined in a kbitprep module."""
    found = []
    for info in pkgutil.walk_packages(kbitprep.__path__, "kbitprep."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        found += [value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, BaseException)
                  and not issubclass(value, Warning) and value.__module__ == module.__name__]
    return found


def test_every_error_kbitprep_defines_derives_from_the_base() -> None:
    errors = defined_errors()
    names = {error.__name__ for error in errors}
    assert {"DataError", "FinetuneError", "ModelFolderError", "RunFolderError", "PreparationError"} <= names
    assert [error.__name__ for error in errors if not issubclass(error, KbitPrepError)] == []


@pytest.mark.parametrize(("raised", "expected"), [
    (type("SomeNewError", (KbitPrepError,), {})("the folder is odd; rename it"),
     "kbitprep: error: the folder is odd; rename it"),
    (RuntimeError("deep inside"), "kbitprep: error: unexpected RuntimeError: deep inside (run again with --debug"),
])
def test_the_cli_boundary_catches_the_base(raised: Exception, expected: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def fail(args: object, console: object) -> int:
        raise raised

    monkeypatch.setattr(inspect_command, "run", fail)
    assert main(["inspect", "some-model"]) == 1
    assert capsys.readouterr().err.startswith(expected)


def raised_builtins() -> list[str]:
    """`raise ValueError(...)` and the like in kbitprep's source: errors that bypass the base.

    A module's `__getattr__` raising AttributeError is Python's protocol, not an error for
    users; AssertionError marks code that cannot be reached, and SystemExit ends a developer
    script (`python -m kbitprep.app.config.settings`).
    """
    import ast
    import builtins
    from pathlib import Path

    found = []
    for path in Path(kbitprep.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                        and isinstance(node.exc.func, ast.Name)):
                    continue
                name = node.exc.func.id
                builtin = getattr(builtins, name, None)
                if isinstance(builtin, type) and issubclass(builtin, BaseException) \
                        and name not in ("AssertionError", "SystemExit") \
                        and not (function.name == "__getattr__" and name == "AttributeError"):
                    found.append(f"{path.name}:{node.lineno} raises {name}")
    return sorted(set(found))


def test_kbitprep_raises_no_bare_builtin_error() -> None:
    assert raised_builtins() == []


def test_argument_errors_keep_the_builtin_types_the_api_promises() -> None:
    from kbitprep import plan_preparation
    from kbitprep.errors import ArgumentTypeError, InvalidArgumentError

    with pytest.raises(ArgumentTypeError) as wrong_type:
        plan_preparation("not a model")  # type: ignore[arg-type]
    assert isinstance(wrong_type.value, TypeError) and isinstance(wrong_type.value, KbitPrepError)
    assert issubclass(InvalidArgumentError, ValueError)
