"""Argument types shared by the commands: each rejects a bad value with a message argparse prints."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _checked(name: str, convert: Callable[[str], T], accept: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    """An argparse type: `convert` the text, then reject values `accept` refuses, naming what was expected."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked("positive_int", int, lambda value: value >= 1, "a whole number >= 1")
non_negative_int = _checked("non_negative_int", int, lambda value: value >= 0, "a whole number >= 0")
positive_float = _checked("positive_float", float, lambda value: value > 0 and math.isfinite(value), "a positive number")
probability = _checked("probability", float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def module_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names such as q_proj,v_proj, not {text!r}")
    return names
