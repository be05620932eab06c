"""`import kbitprep` stays light and the core stays apart from the application.

Each check runs in a fresh interpreter, so modules other tests imported do not hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("peft", "matplotlib", "rich")


def modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", ["kbitprep", "kbitprep.app.config.settings", "kbitprep.app.training.run"])
def test_importing_does_not_pull_peft_matplotlib_or_rich(module: str) -> None:
    loaded = modules_after_import(module)
    assert module in loaded  # the probe itself worked
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_the_core_imports_nothing_from_the_application() -> None:
    loaded = modules_after_import("kbitprep")
    assert "kbitprep.plan" in loaded
    assert not {name for name in loaded if name.split(".")[:2] in (["kbitprep", "app"], ["kbitprep", "cli"])}
