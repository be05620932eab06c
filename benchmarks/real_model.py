"""A real, materialised 4-bit model: validating the meta sizing, and timing preparation.

The shape is built with random bf16 weights (seeded), saved, and loaded back with a
4-bit NF4 `BitsAndBytesConfig` on CPU, exactly as a user loads a checkpoint. Each load
serves one variant once: the bytes before and after its real preparation are measured,
kbitprep's plan is made on the loaded model first, and the preparation call is timed.
Variants take turns within each repeat, so slow spells on a shared machine fall on all
of them alike.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import kbitprep

from .checkpoints import load_4bit, save_random_checkpoint
from .pace import Progress
from .variants import VARIANTS, reference_rule_bytes

__all__ = ["PreparedLoad", "RealModelResult", "measure_real_model", "quant_state_bytes"]


@dataclasses.dataclass(frozen=True)
class PreparedLoad:
    """One fresh load, prepared by one variant.

    Args:
        variant (str): the variant's name.
        floor (int): bytes after loading, before preparation.
        planned (int): bytes the plan (kbitprep) or the rule (reference) predicts on this model.
        measured (int): bytes after the real preparation.
        prepare_s (float): wall time of the preparation call.
    """

    variant: str
    floor: int
    planned: int
    measured: int
    prepare_s: float


@dataclasses.dataclass(frozen=True)
class RealModelResult:
    """All loads of the materialised model."""

    model: str
    loads: list[PreparedLoad]
    load_s: list[float]
    quant_state_bytes: int

    def of(self, variant: str) -> list[PreparedLoad]:
        return [load for load in self.loads if load.variant == variant]

    def median_prepare_s(self, variant: str) -> float:
        return statistics.median(load.prepare_s for load in self.of(variant))

    def measured(self, variant: str) -> int:
        """Bytes after preparation; raises if two loads disagree (they never should)."""
        values = {load.measured for load in self.of(variant)}
        if len(values) != 1:
            raise AssertionError(f"{variant}: loads of the same checkpoint measured different bytes: {sorted(values)}")
        return values.pop()

    def floors(self) -> set[int]:
        return {load.floor for load in self.loads}


def quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the 4-bit quantization state (absmax, code, nested state): not parameters or buffers."""
    tensors: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            for value in (getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)):
                if isinstance(value, torch.Tensor):
                    tensors[id(value)] = value
            state = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _prepare_once(checkpoint: Path, variant_name: str) -> tuple[PreparedLoad, float, int]:
    variant = VARIANTS[variant_name]
    started = time.perf_counter()
    model = load_4bit(checkpoint)
    load_s = time.perf_counter() - started
    floor = kbitprep.model_bytes(model)
    states = quant_state_bytes(model)
    planned = reference_rule_bytes(model) if variant.upcast is None else \
        kbitprep.plan_preparation(model, upcast=variant.upcast).bytes_after
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings are counted in `training`; here only the time matters
        started = time.perf_counter()
        variant.prepare(model)
        prepare_s = time.perf_counter() - started
    load = PreparedLoad(variant_name, floor, planned, kbitprep.model_bytes(model), prepare_s)
    del model
    gc.collect()
    return load, load_s, states


def measure_real_model(name: str, config: Mapping[str, Any], variants: Sequence[str], *, repeats: int = 3,
                       workdir: Path | None = None, log=print) -> RealModelResult:
    """Materialise `config`, then load and prepare it `repeats` times per variant.

    Args:
        name (str): the shape's name for the tables.
        config (Mapping): the model config (a dict with "model_type").
        variants (Sequence[str]): names from `variants.VARIANTS`; the reference should be one.
        repeats (int): loads per variant; prepare time is their median. Default: 3
        workdir (Path | None): where to save the checkpoint; a temp dir if None. Default: None
        log (Callable): progress lines. Default: print

    Returns:
        RealModelResult: every load's bytes and preparation time.
    """
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-real-", dir=workdir) as tmp:
        started = time.perf_counter()
        checkpoint = save_random_checkpoint(config, Path(tmp) / "model")
        log(f"  {name}: random bf16 checkpoint saved in {time.perf_counter() - started:.0f} s")
        loads, load_times, states = [], [], 0
        progress = Progress(f"{name} loads", repeats * len(variants), log, unit="load")
        for repeat in range(repeats):
            for variant in variants:
                load, load_s, states = _prepare_once(checkpoint, variant)
                loads.append(load)
                load_times.append(load_s)
                progress.advance()
            log(f"  {name}: repeat {repeat + 1}/{repeats} done ({len(variants)} loads, last {load_times[-1]:.0f} s)")
    return RealModelResult(model=name, loads=loads, load_s=load_times, quant_state_bytes=states)

