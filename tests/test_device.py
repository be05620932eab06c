"""One answer to "is there an accelerator?" (kbitprep.device), used everywhere in the package."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kbitprep import device

SRC = Path(device.__file__).parent


def test_accelerator_agrees_with_torch() -> None:
    api = torch.accelerator
    expected = api.current_accelerator() if api.is_available() else None
    assert device.accelerator() == expected
    assert device.has_accelerator() == (expected is not None)


@pytest.mark.parametrize(("cuda", "xpu", "expected"), [(True, False, "cuda"), (False, True, "xpu"),
                                                        (True, True, "cuda"), (False, False, None)])
def test_without_torch_accelerator_cuda_then_xpu_are_asked(monkeypatch: pytest.MonkeyPatch, cuda: bool, xpu: bool,
                                                            expected: str | None) -> None:
    monkeypatch.delattr(torch, "accelerator")  # torch < 2.6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: xpu), raising=False)
    assert device.accelerator() == (torch.device(expected) if expected else None)


def test_the_cache_is_emptied_only_with_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[str] = []
    fake = SimpleNamespace(is_available=lambda: True, current_accelerator=lambda: torch.device("cuda"),
                           empty_cache=lambda: emptied.append("cuda"))
    monkeypatch.setattr(torch, "accelerator", fake)
    device.empty_accelerator_cache()
    assert emptied == ["cuda"]
    monkeypatch.setattr(fake, "is_available", lambda: False)
    device.empty_accelerator_cache()
    assert emptied == ["cuda"]


def test_no_other_module_asks_torch_itself() -> None:
    asking = re.compile(r"\b(cuda|xpu|mps|accelerator)\.is_available\(")
    found = [f"{path.relative_to(SRC)}:{number}" for path in sorted(SRC.rglob("*.py")) if path.name != "device.py"
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if asking.search(line)]
    assert found == []
