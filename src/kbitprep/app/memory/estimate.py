"""The memory model: a QLoRA training step's peak bytes, predicted from config.json alone.

    config.json ──> quantized skeleton on meta (kbitprep.sizing)
                ──> prepared (plan + apply) and LoRA attached, as `finetune` does
                ──> static bytes, read off the skeleton:
                      quantized weights, quantization state, weights the backend left
                      unquantized (3-D experts), other frozen weights, fp32 casts,
                      LoRA parameters, optimizer state (OPTIMIZERS)
                ──> one training step run on meta tensors (kbitprep.app.memory.step):
                      gradients, activations kept for the backward pass (the inputs of
                      checkpointed layers, what the loss saves), the batch, and the
                      working set of the moment the step peaks (a layer's recompute,
                      attention, the loss)
                ──> MemoryEstimate: each component named, summing to the total

Nothing is looked up by model name: the step is the model's own forward and backward,
so a family nobody listed works the same way. What the model does not count: the CUDA
context (300-600 MiB per process, outside torch's allocator), the caching allocator's
fragmentation and reserved-but-free blocks (torch.cuda.memory_reserved minus allocated,
typically 5-15% of the peak), kernels' private scratch space (cuBLAS workspaces, the
flash-attention backward's accumulators) and, on a CPU, the interpreter and the
libraries. Budget the device's memory minus the context and about 10%.

`fit_memory` answers "does it fit in N bytes, and what is the largest batch size and
sequence length that does", searching over the same estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...errors import KbitPrepError
from ...precision import planned_compute_dtype
from .live_bytes import quantization_state
from .optimizers import OPTIMIZERS, OptimizerSpec
from .simulated_loss import LOSSES, simulated_loss
from .step import Moment, StepProfile, simulate_step

if TYPE_CHECKING:
    from ...plan import PreparationPlan

__all__ = [
    "LOSSES",
    "NOT_COUNTED",
    "OPTIMIZERS",
    "FitReport",
    "MemoryComponent",
    "MemoryEstimate",
    "MemoryModelError",
    "MemoryReport",
    "MemorySettings",
    "OptimizerSpec",
    "TrainingSkeleton",
    "estimate_memory",
    "fit_memory",
    "parse_memory_size",
    "plan_memory",
]


class MemoryModelError(KbitPrepError, ValueError):
    """A memory estimate cannot be made as asked (a bad setting or budget); the message names the fix."""


DEVICES = ("cpu", "cuda")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _default_device() -> str:
    """Where a run on this machine trains: on its accelerator (as a GPU) when it has one."""
    from ...device import has_accelerator

    return "cuda" if has_accelerator() else "cpu"


def _run_default(name: str, fallback: Any = None) -> Any:
    """The default of a `kbitprep finetune` setting, from its one declaration (`fallback` where it has none)."""
    from ..config.settings import SETTINGS

    return next((s.default for s in SETTINGS if s.name == name), fallback)


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """What decides a training step's memory. Names and defaults are `kbitprep finetune`'s settings.

    Args:
        quantize (str): "auto" (as a config saved quantized records, else nf4), "nf4", "fp4", "int8" or
            "none". Default: finetune's
        upcast (str): "all", "norms" or "none". Default: finetune's
        lora_r (int): LoRA rank. Default: finetune's
        lora_alpha (float): LoRA scaling numerator (no effect on memory; peft is given it). Default: finetune's
        lora_dropout (float): dropout on the LoRA input (it keeps a mask per adapted layer). Default: finetune's
        target_modules (tuple[str, ...] | None): adapted layers; None: every linear layer but the head.
            Default: finetune's (None)
        lora_variant (str): "lora" or "dora": DoRA adds a trained magnitude per output row (its parameters,
            gradients and optimizer state) and, in every step, each adapted layer's dequantized weight and its
            norm (the simulated step's own forward). Default: finetune's
        batch_size (int): sequences per step. Default: finetune's
        seq_len (int): tokens per sequence (every sequence full length, every token trained). Default: finetune's
        compute_dtype (str): the dtype quantized layers compute in, "auto" (the model's where the device
            computes it fast, else float32), "bfloat16", "float16" or "float32". Default: finetune's
        gradient_checkpointing (bool): recompute each layer in the backward pass. Default: True
        loss (str): a name in `LOSSES`. Default: finetune's
        optim (str): a name in `OPTIMIZERS`. Default: finetune's
        method (str): "sft", or a preference method ("dpo", "orpo"): each step then scores both sides of
            `batch_size` pairs, 2 x batch_size rows in one forward pass, and DPO adds the reference's forward
            pass (the adapter off, under no_grad). Default: finetune's
        device (str): "cpu" or "cuda": where the run would train (it decides the compute dtype).
            Default: "cuda" when this machine has one, else "cpu"
    """

    quantize: str = _run_default("quantize")
    upcast: str = _run_default("upcast")
    lora_r: int = _run_default("lora_r")
    lora_alpha: float = _run_default("lora_alpha")
    lora_dropout: float = _run_default("lora_dropout")
    target_modules: tuple[str, ...] | None = _run_default("target_modules")
    lora_variant: str = _run_default("lora_variant", "lora")
    batch_size: int = _run_default("batch_size")
    seq_len: int = _run_default("seq_len")
    compute_dtype: str = _run_default("compute_dtype", "auto")
    gradient_checkpointing: bool = _run_default("gradient_checkpointing", True)
    loss: str = _run_default("loss", "full")
    optim: str = _run_default("optim", "adamw_torch")
    method: str = _run_default("method", "sft")
    device: str = dataclasses.field(default_factory=_default_device)

    def check(self) -> None:
        """Raise `MemoryModelError` naming the first setting that is out of range."""
        from ...loss import METHOD_CHOICES
        from ...plan import UPCAST_POLICIES
        from ...sizing import QUANTIZE_AUTO, QUANTIZE_CHOICES
        from ..model.lora import LORA_VARIANTS

        quantize_choices = (QUANTIZE_AUTO, *QUANTIZE_CHOICES)  # auto: as the config is saved quantized, else nf4
        rules = [
            (self.quantize in quantize_choices, f"quantize must be one of {', '.join(quantize_choices)}"),
            (self.upcast in UPCAST_POLICIES, f"upcast must be one of {', '.join(UPCAST_POLICIES)}"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.lora_variant in LORA_VARIANTS, f"lora_variant must be one of {', '.join(LORA_VARIANTS)}"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.seq_len >= 2, "seq_len must be at least 2"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
            (self.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}"),
            (self.method in METHOD_CHOICES, f"method must be one of {', '.join(METHOD_CHOICES)}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}"),
        ]
        for ok, rule in rules:
            if not ok:
                raise MemoryModelError(f"{rule}; got {dataclasses.asdict(self)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules) if self.target_modules else "all-linear"
        return data

    @classmethod
    def from_run(cls, run: Any, **overrides: Any) -> MemorySettings:
        """The memory settings of a fine-tuning run's settings (a `FinetuneSettings`): the fields both have."""
        names = {field.name for field in dataclasses.fields(cls)}
        given = {name: getattr(run, name) for name in names if hasattr(run, name)}
        return cls(**{**given, **overrides})


@dataclasses.dataclass(frozen=True)
class MemoryComponent:
    """One named part of the peak.

    Args:
        name (str): short name, e.g. "activations kept".
        bytes (int): its size at the peak.
        detail (str): what it is.
    """

    name: str
    bytes: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """A training step's predicted peak and its parts; the components sum to `total`.

    Args:
        settings (MemorySettings): what was estimated.
        components (tuple[MemoryComponent, ...]): the parts of the peak.
        peak_at (str): the moment of the step the peak falls on, e.g. "backward: layer 0".
        phase_peaks (dict[str, int]): the total at each phase's own peak.
        compute_dtype (str): the dtype activations are computed in.
        seconds (float): how long the estimate took.
    """

    settings: MemorySettings
    components: tuple[MemoryComponent, ...]
    peak_at: str
    phase_peaks: Mapping[str, int]
    compute_dtype: str
    seconds: float

    @property
    def total(self) -> int:
        return sum(component.bytes for component in self.components)

    def component(self, name: str) -> int:
        """The bytes of the named component."""
        return next(c.bytes for c in self.components if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "total_bytes": self.total, "peak_at": self.peak_at,
                "components": [c.to_dict() for c in self.components], "phase_peaks": dict(self.phase_peaks),
                "compute_dtype": self.compute_dtype, "seconds": round(self.seconds, 3)}


# --- the skeleton: the model as the run would hold it, on meta -----------------------------------


def _dtypes(config: Any, settings: MemorySettings) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype `finetune` loads the weights in, the dtype its 4-/8-bit layers compute in).

    The weights: the config's dtype, float16 on a CPU made float32. The compute dtype:
    `--compute-dtype`, or for "auto" the config's dtype where the device computes it fast,
    else float32. A model that is not quantized loads in its compute dtype.
    """
    from ..model.loading import compute_dtype

    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(named).removeprefix("torch.") if named else None
    weights = compute_dtype({"dtype": name}, device=settings.device)
    configured = getattr(torch, name or "float32", None)
    configured = configured if isinstance(configured, torch.dtype) and configured.is_floating_point else torch.float32
    computes = (planned_compute_dtype(configured, settings.device) if settings.compute_dtype == "auto"
                else getattr(torch, settings.compute_dtype))
    return (computes if settings.quantize == "none" else weights), computes


class TrainingSkeleton:
    """The model prepared and adapted as `finetune` would, on the meta device; estimates any batch shape.

    Building it is the slow part (seconds for 70B); `estimate` then runs one simulated step.

    Args:
        model (Any): a model folder, config.json path, config dict or transformers config.
        settings (MemorySettings): the run; `batch_size` and `seq_len` are only defaults for `estimate`.

    Raises:
        MemoryModelError: a setting is out of range, or the config cannot be read.
    """

    def __init__(self, model: Any, settings: MemorySettings) -> None:
        from ...sizing import build_meta_model, load_config

        settings.check()
        self.settings = settings
        try:
            config = load_config(os.fspath(model) if isinstance(model, os.PathLike) else model)
        except (FileNotFoundError, ValueError) as error:
            raise MemoryModelError(f"{error}") from None
        weights, self.dtype = _dtypes(config, settings)
        try:
            self.model = build_meta_model(config, quantize=settings.quantize, dtype=weights, compute_dtype=self.dtype)
            self.plan = self._prepare()
            self.model = self._adapt()
        except KbitPrepError:
            raise
        except Exception as error:  # the library failing to build this config: said in words
            from .step import SimulationError, cannot_simulate

            raise SimulationError(f"the model cannot be built from this config on the meta device: "
                                  f"{cannot_simulate(error)}; check the config against the model's "
                                  "documentation, or measure it with real weights") from error
        self.model.train()
        self.static = self._static_components()

    def _prepare(self) -> PreparationPlan:
        from ...apply import apply_plan
        from ...plan import plan_preparation
        from ..model.inspection import without_meta_error

        plan = without_meta_error(plan_preparation(self.model, upcast=self.settings.upcast,
                                                   use_gradient_checkpointing=self.settings.gradient_checkpointing))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan's notices are inspect's to show, not the estimate's
            apply_plan(self.model, plan)
        return plan

    def _adapt(self) -> nn.Module:
        from ..model.lora import attach_lora

        with torch.device("meta"):  # adapters are made where they live: no host memory, no initialisation cost
            return attach_lora(self.model, self.settings)  # the function `finetune` attaches its adapters with

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [param for param in self.model.parameters() if param.requires_grad]

    def _static_components(self) -> list[MemoryComponent]:
        """The bytes held for the whole run, by kind, each storage once."""
        from ...backends import is_plain_tensor

        cast = {c.name for c in self.plan.casts}
        params = {name.removeprefix("base_model.model."): p for name, p in self.model.named_parameters()}
        groups: dict[str, list[torch.Tensor]] = {
            "LoRA parameters": [p for p in params.values() if p.requires_grad],
            "quantized weights": [p for p in params.values() if not is_plain_tensor(p)],
            "quantization state": list(quantization_state(self.model)),
            "fp32 casts": [p for name, p in params.items() if name in cast and not p.requires_grad],
            "unquantized weights": [params[name] for name in self.plan.unquantized_weights if name in params],
            "frozen weights": [*params.values(), *self.model.buffers()],  # whatever the kinds above left
        }
        seen: set[int] = set()
        sizes = {}
        for name, tensors in groups.items():
            storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
            sizes[name] = sum(size for key, size in storages.items() if key not in seen)
            seen.update(storages)
        spec = OPTIMIZERS[self.settings.optim]
        details = {
            "quantized weights": "packed 4-bit / int8 weights",
            "quantization state": "their block scales and code tables",
            "unquantized weights": "outside linear layers (3-D experts), as stored",
            "frozen weights": "embeddings, head, norms, buffers as stored",
            "fp32 casts": f"held in float32 by --upcast {self.settings.upcast}",
            "LoRA parameters": f"rank-{self.settings.lora_r} adapters"
                               + (", DoRA magnitudes" if self.settings.lora_variant == "dora" else "") + ", float32",
        }
        order = ("quantized weights", "quantization state", "unquantized weights", "frozen weights", "fp32 casts",
                 "LoRA parameters")
        parts = [MemoryComponent(name, sizes[name], details[name]) for name in order
                 if sizes[name] or name != "unquantized weights"]  # a row only where the backend left some
        parts.append(MemoryComponent("optimizer state", spec.state(self.trainable),
                                     f"{spec.name}: {spec.state_bytes} B per trainable value"
                                     + (" and its block scales" if spec.block else "")))
        return parts

    @property
    def rows_per_example(self) -> int:
        """The batch rows one example takes: 2 for a preference pair (chosen and rejected), else 1."""
        return 1 if self.settings.method == "sft" else 2

    def _batch(self, batch_size: int, seq_len: int) -> Callable[[], dict[str, torch.Tensor]]:
        held: list[torch.Tensor] = []
        rows = batch_size * self.rows_per_example

        def make() -> dict[str, torch.Tensor]:
            ids = torch.zeros(rows, seq_len, dtype=torch.long, device="meta")
            # The collator's all-ones mask is held (and counted) but not passed: with no padding
            # the model builds no mask from it, and on meta it cannot read that it is all ones.
            held[:] = [torch.ones_like(ids)]
            return {"input_ids": ids, "labels": torch.zeros_like(ids)}
        return make

    def estimate(self, batch_size: int | None = None, seq_len: int | None = None) -> MemoryEstimate:
        """The peak of a training step at this batch shape (default: the settings').

        Raises:
            SimulationError: the model's step cannot run on the meta device.
        """
        started = time.perf_counter()
        batch_size = batch_size or self.settings.batch_size
        seq_len = seq_len or self.settings.seq_len
        loss = simulated_loss(self.settings.loss, self.settings.device, self.settings.method)
        profile = simulate_step(self.model, self._batch(batch_size, seq_len), loss)
        moments = dict(profile.moments)
        rows = batch_size * self.rows_per_example
        moments["optimizer step"] = self._optimizer_moment(profile, rows * seq_len * 8 * 3)
        static = sum(part.bytes for part in self.static)
        peak = max(moments.values(), key=lambda moment: moment.total)
        settings = dataclasses.replace(self.settings, batch_size=batch_size, seq_len=seq_len)
        return MemoryEstimate(
            settings=settings, components=tuple(self.static) + _dynamic_components(peak), peak_at=peak.where,
            phase_peaks={name: static + moment.total for name, moment in moments.items()},
            compute_dtype=str(self.dtype).removeprefix("torch."), seconds=time.perf_counter() - started,
        )

    def _optimizer_moment(self, profile: StepProfile, batch_bytes: int) -> Moment:
        spec = OPTIMIZERS[self.settings.optim]
        return Moment("optimizer step", gradients=profile.gradient_bytes, activations=0, batch=batch_bytes,
                      transient=spec.transient(self.trainable, self.settings.device))


def _dynamic_components(peak: Moment) -> tuple[MemoryComponent, ...]:
    return (
        MemoryComponent("gradients", peak.gradients, "LoRA gradients alive at the peak"),
        MemoryComponent("activations kept", peak.activations,
                        "saved for the backward pass: checkpointed layers' inputs, what the loss keeps"),
        MemoryComponent("batch", peak.batch, "token ids, attention mask, labels"),
        MemoryComponent("transient", peak.transient, f"working set of {peak.where}"),
    )


def estimate_memory(model: Any, settings: MemorySettings | None = None) -> MemoryEstimate:
    """Predict the peak bytes of one QLoRA training step, from the model's config alone.

    Args:
        model (Any): a model folder, config.json path, config dict or transformers config.
        settings (MemorySettings | None): the run. Default: `MemorySettings()`

    Returns:
        MemoryEstimate: the named components and their total.

    Raises:
        MemoryModelError: a setting is out of range or the config cannot be read.
        SimulationError: the model's step cannot run on the meta device.

    Example:
        >>> estimate = estimate_memory("models/llama-3-70b", MemorySettings(seq_len=2048, batch_size=1))
        >>> estimate.total / 2**30
        40.3
    """
    settings = settings or MemorySettings()
    return TrainingSkeleton(model, settings).estimate()


# --- does it fit ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Whether a run fits a memory budget, and the largest batch size and sequence length that do.

    Args:
        budget (int): the budget in bytes.
        estimate (MemoryEstimate): the estimate at the asked batch size and sequence length.
        largest_batch_size (int): at the asked sequence length; 0 when none fits.
        largest_seq_len (int): at the asked batch size; 0 when none fits.
        search_limit (int): the largest value searched; a result equal to it means "at least".
    """

    budget: int
    estimate: MemoryEstimate
    largest_batch_size: int
    largest_seq_len: int
    search_limit: int

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "fits": self.fits, "largest_batch_size": self.largest_batch_size,
                "largest_seq_len": self.largest_seq_len, "search_limit": self.search_limit}


def _largest(total: Callable[[int], int], budget: int, start: int, low: int, limit: int) -> int:
    """The largest n in [low, limit] with total(n) <= budget, for a non-decreasing `total`; 0 when none.

    Gallops from `start` to bracket the crossing, then closes the bracket by false position
    (the totals are nearly linear in n, so a guess from the line through the bracket's ends
    lands next to the answer), falling back to halving whenever a guess gains little.
    """
    start = min(max(start, low), limit)
    if total(start) <= budget:
        good, bad = start, None
        while bad is None and good < limit:
            trial = min(limit, good * 2)
            good, bad = (trial, None) if total(trial) <= budget else (good, trial)
        if bad is None:
            return good
    else:
        if total(low) > budget:
            return 0
        good, bad = low, start
    while bad - good > 1:
        guess = _false_position(total, budget, good, bad)
        good, bad = (guess, bad) if total(guess) <= budget else (good, guess)
    return good


def _false_position(total: Callable[[int], int], budget: int, good: int, bad: int) -> int:
    """A guess strictly inside (good, bad): where the line through both ends meets the budget, nudged inward."""
    rise = total(bad) - total(good)
    guess = good + (budget - total(good)) * (bad - good) // rise if rise > 0 else (good + bad) // 2
    guess = min(max(guess, good + 1), bad - 1)
    # test both sides of the predicted crossing before halving: one of them usually closes the bracket
    if total(guess) <= budget:
        return guess if guess + 1 >= bad or total(guess + 1) > budget else guess + 1
    return guess if guess - 1 <= good or total(guess - 1) <= budget else (good + bad) // 2


def fit_memory(model: Any, settings: MemorySettings, budget: int, *, search_limit: int = 2**20,
               skeleton: TrainingSkeleton | None = None) -> FitReport:
    """Whether the run fits `budget` bytes, and the largest batch size and sequence length that do.

    Args:
        model (Any): a model folder, config.json path, config dict or transformers config.
        settings (MemorySettings): the run.
        budget (int): bytes available to tensors.
        search_limit (int): the largest batch size and sequence length tried. Default: 2**20
        skeleton (TrainingSkeleton | None): a skeleton already built for these settings. Default: None

    Raises:
        MemoryModelError: a setting is out of range or the config cannot be read.
    """
    skeleton = skeleton or TrainingSkeleton(model, settings)
    estimates: dict[tuple[int, int], MemoryEstimate] = {}

    def total(batch_size: int, seq_len: int) -> int:
        if (batch_size, seq_len) not in estimates:
            estimates[batch_size, seq_len] = skeleton.estimate(batch_size, seq_len)
        return estimates[batch_size, seq_len].total

    batch, seq = settings.batch_size, settings.seq_len
    total(batch, seq)
    return FitReport(
        budget=budget, estimate=estimates[batch, seq],
        largest_batch_size=_largest(lambda b: total(b, seq), budget, batch, 1, search_limit),
        largest_seq_len=_largest(lambda s: total(batch, s), budget, seq, 2, search_limit),
        search_limit=search_limit,
    )


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_memory_size(text: str) -> int:
    """Bytes from a size such as "24GiB", "80 GB", "1.5T" or "512MiB".

    KiB/MiB/GiB/TiB and the bare K/M/G/T are powers of 1024; KB/MB/GB/TB powers of 1000; a
    plain number is bytes.

    Raises:
        MemoryModelError: the text is not a positive size in one of those units.
    """
    match = _SIZE.fullmatch(text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise MemoryModelError(f"--memory {text!r}: not a memory size; write a number and a unit, "
                               "such as 24GiB, 80GB, 16G or 512MiB")
    size = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise MemoryModelError(f"--memory {text!r}: the budget must be at least one byte, such as 24GiB")
    return int(size)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What `kbitprep inspect` shows about a training step's memory.

    Args:
        estimate (MemoryEstimate): the step's peak and its parts.
        fit (FitReport | None): against a budget, when one was given.
    """

    estimate: MemoryEstimate
    fit: FitReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.estimate.to_dict(), "fit": self.fit.to_dict() if self.fit else None,
                "not_counted": NOT_COUNTED}


# What the estimate leaves out, for reports and the docs.
NOT_COUNTED = ("the CUDA context (300-600 MiB per process), the caching allocator's reserved but unused blocks and "
               "fragmentation (often 5-15% of the peak), kernels' private workspaces, and on a CPU the interpreter "
               "and libraries: budget the device's memory minus the context and about 10%")


def plan_memory(model: Any, settings: MemorySettings, budget: int | None = None) -> MemoryReport:
    """The estimate of a run's training step and, with a budget, what fits it.

    Args:
        model (Any): a model folder, config.json path, config dict or transformers config.
        settings (MemorySettings): the run.
        budget (int | None): bytes available to tensors. Default: None

    Raises:
        MemoryModelError: a setting is out of range or the config cannot be read.
        SimulationError: the model's step cannot run on the meta device.
    """
    skeleton = TrainingSkeleton(model, settings)
    if budget is None:
        return MemoryReport(skeleton.estimate())
    fit = fit_memory(model, settings, budget, skeleton=skeleton)
    return MemoryReport(fit.estimate, fit)
