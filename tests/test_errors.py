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
