"""Everything one benchmark run measured, and the product's targets checked against it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .fit import FitGridResult, check_mean, check_worst
from .footprint import FootprintRow
from .loss_memory import LossMemoryResult, LossMemorySettings
from .machine import Machine
from .packing import PackingResult
from .real_model import RealModelResult
from .sharded import ShardedResult
from .training import TrainingResult, TrainingSettings
from .trl_sft import TrlResult, TrlSettings
from .variants import REFERENCE

__all__ = ["TARGETS", "BenchmarkResults", "Target", "check_targets", "ratio_of"]


@dataclasses.dataclass(frozen=True)
class BenchmarkResults:
    """One run's figures; `markdown.render` turns them into BENCHMARKS.md."""

    command: str
    started_utc: str
    duration_s: float
    machine: Machine
    footprint: list[FootprintRow]
    real: RealModelResult | None
    training_config: dict
    training_footprint: FootprintRow
    training_settings: TrainingSettings | None
    training: dict[str, TrainingResult]
    packing: PackingResult | None = None
    fit: FitGridResult | None = None
    # The chunked loss's memory benchmark: model label -> its config, and -> variant -> result.
    loss_memory_settings: LossMemorySettings | None = None
    loss_memory_configs: dict[str, dict] = dataclasses.field(default_factory=dict)
    loss_memory: dict[str, dict[str, LossMemoryResult]] = dataclasses.field(default_factory=dict)
    bf16_speed: dict[str, float] = dataclasses.field(default_factory=dict)
    sharded: ShardedResult | None = None
    # kbitprep against TRL's SFTTrainer: the settings, the model config, and variant -> result.
    trl_settings: TrlSettings | None = None
    trl_config: dict = dataclasses.field(default_factory=dict)
    trl: dict[str, TrlResult] = dataclasses.field(default_factory=dict)
    # What the 4-bit layers computed in (the product's rule here), and whether bf16 was treated as slow.
    compute_dtype: str = "bfloat16"
    bf16_treated_slow: bool = False
    # The DPO step's section of BENCHMARKS.md (`benchmarks.preference_memory`), between its markers.
    preference_memory: str | None = None

    def footprint_of(self, model: str) -> FootprintRow | None:
        return next((row for row in self.footprint if row.model == model), None)


@dataclasses.dataclass(frozen=True)
class Target:
    """One promise of the product, as a check over the results.

    Args:
        name (str): what is promised, in words.
        check (Callable): results -> (measured value in words, met?), or None when not measured.
    """

    name: str
    check: Callable[[BenchmarkResults], tuple[str, bool] | None]


def _footprint_ratio(model: str, variant: str, limit: float) -> Callable[[BenchmarkResults], tuple[str, bool] | None]:
    def check(results: BenchmarkResults) -> tuple[str, bool] | None:
        row = results.footprint_of(model)
        if row is None:
            return None
        ratio = row.ratio(variant)
        return f"{ratio:.3f}x", ratio <= limit
    return check


def _all_equals_reference(results: BenchmarkResults) -> tuple[str, bool] | None:
    pairs = [(row.model, row.after["all"], row.after[REFERENCE.name]) for row in results.footprint]
    if results.real is not None:
        pairs.append((f"{results.real.model} (real)", results.real.measured("all"),
                      results.real.measured(REFERENCE.name)))
    if not pairs:
        return None
    differing = [model for model, ours, theirs in pairs if ours != theirs]
    measured = f"equal on all {len(pairs)} models" if not differing else f"differs on {', '.join(differing)}"
    return measured, not differing


def _training_ratio(variant: str, measure: Callable[[TrainingResult], float], limit: float, *,
                    strict: bool = False) -> Callable[[BenchmarkResults], tuple[str, bool] | None]:
    def check(results: BenchmarkResults) -> tuple[str, bool] | None:
        if variant not in results.training or REFERENCE.name not in results.training:
            return None
        ratio = measure(results.training[variant]) / measure(results.training[REFERENCE.name])
        return f"{ratio:.3f}x", ratio < limit if strict else ratio <= limit
    return check


def _final_loss(variant: str) -> Callable[[BenchmarkResults], tuple[str, bool] | None]:
    def check(results: BenchmarkResults) -> tuple[str, bool] | None:
        if variant not in results.training or REFERENCE.name not in results.training:
            return None
        ours, theirs = results.training[variant].final_loss, results.training[REFERENCE.name].final_loss
        difference = (ours - theirs) / theirs
        return f"{difference:+.2%}", abs(difference) <= 0.01
    return check


def _no_kbitprep_warnings(results: BenchmarkResults) -> tuple[str, bool] | None:
    counts = {name: len(result.warnings_prepare_and_steps) for name, result in results.training.items()
              if name != REFERENCE.name}
    if not counts:
        return None
    return ", ".join(f"{name}: {count}" for name, count in counts.items()), not any(counts.values())


def ratio_of(ours: float, theirs: float) -> float:
    """ours / theirs; a reference of 0 (a flat slope on a tiny model) gives 1 when ours is 0 too, else inf."""
    if theirs:
        return ours / theirs
    return 1.0 if not ours else float("inf")


def _loss_memory(model_kind: str, measure: Callable[[LossMemoryResult], float], limit: float,
                 relative_change: bool = False) -> Callable[[BenchmarkResults], tuple[str, bool] | None]:
    """kbitprep's figure over the reference's on every loss-memory model whose label starts with `model_kind`
    ("" for all): the worst one decides."""
    def check(results: BenchmarkResults) -> tuple[str, bool] | None:
        runs = {label: run for label, run in results.loss_memory.items() if label.startswith(model_kind)}
        if not runs:
            return None
        values = {}
        for label, run in runs.items():
            ratio = ratio_of(measure(run["kbitprep"]), measure(run["reference"]))
            values[label] = abs(ratio - 1) if relative_change else ratio
        shown = ", ".join(f"{label.split(' ')[0]}: " + (f"{v:.2%}" if relative_change else f"{v:.3f}x")
                          for label, v in values.items())
        return shown, max(values.values()) <= limit
    return check


def _sharded_bytes(results: BenchmarkResults) -> tuple[str, bool] | None:
    if results.sharded is None:
        return None
    ratio = results.sharded.bytes_ratio(2)
    return f"{ratio:.3f}x", ratio <= 0.55


TARGETS: tuple[Target, ...] = (
    Target('"norms" footprint <= 0.65x reference on Qwen2-0.5B', _footprint_ratio("Qwen2-0.5B", "norms", 0.65)),
    Target('"norms" footprint <= 0.80x reference on Llama-3-8B', _footprint_ratio("Llama-3-8B", "norms", 0.80)),
    Target('"all" footprint equal to the reference, to the byte', _all_equals_reference),
    Target('training peak memory (peak RSS) with "norms" below the reference\'s',
           _training_ratio("norms", lambda r: r.peak_rss_bytes, 1.0, strict=True)),
    Target('median step time with "all" <= 1.05x reference',
           _training_ratio("all", lambda r: r.median_step_s, 1.05)),
    Target('median step time with "norms" <= 1.05x reference',
           _training_ratio("norms", lambda r: r.median_step_s, 1.05)),
    Target('final loss with "all" within 1% of the reference\'s', _final_loss("all")),
    Target('final loss with "norms" within 1% of the reference\'s', _final_loss("norms")),
    Target("zero warnings from kbitprep (preparation + 3 training steps)", _no_kbitprep_warnings),
    Target("fit check: worst |error| of the predicted peak <= 10%", lambda results: check_worst(results.fit)),
    Target("fit check: mean |error| of the predicted peak <= 5%", lambda results: check_mean(results.fit)),
    Target('chunked loss + "norms": peak from preparation <= 0.55x reference on the Qwen2-0.5B shape',
           _loss_memory("Qwen2", lambda r: r.peak_from_prepare_bytes, 0.55)),
    Target('chunked loss + "norms": peak from preparation <= 0.85x reference on the 110M model',
           _loss_memory("110M", lambda r: r.peak_from_prepare_bytes, 0.85)),
    Target("chunked loss: memory per token of context <= 0.25x the reference's (both models)",
           _loss_memory("", lambda r: r.slope_bytes_per_token, 0.25)),
    Target("chunked loss: median step time <= 1.05x reference (both models)",
           _loss_memory("", lambda r: r.median_step_s, 1.05)),
    Target("chunked loss: final loss within 0.5% of the reference's (both models)",
           _loss_memory("", lambda r: r.final_loss, 0.005, relative_change=True)),
    Target("finetune --fsdp: per-process parameter bytes at N=2 <= 0.55x of one process", _sharded_bytes),
)


def check_targets(results: BenchmarkResults) -> list[tuple[Target, str, bool | None]]:
    """Each target with its measured value and whether it is met (None: not measured in this run)."""
    rows = []
    for target in TARGETS:
        outcome = target.check(results)
        rows.append((target, "not measured", None) if outcome is None else (target, *outcome))
    return rows
