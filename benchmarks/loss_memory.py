"""Training memory with the chunked loss: the peak from preparation to the end of training, and per token.

Two workers per model shape, each a process of its own (`python -m benchmarks.loss_memory ...`),
on the same checkpoint, LoRA, seed and data:

- "reference": peft's `prepare_model_for_kbit_training` and transformers' own loss
  (`model(input_ids, labels=...).loss`, the loss the Trainer takes: full logits);
- "kbitprep": kbitprep's preparation with `upcast="norms"` and `kbitprep.causal_lm_loss`.

Each worker loads the 4-bit model, resets the kernel's high-water mark of its resident
memory (VmHWM), prepares, attaches LoRA and trains `steps` steps at `seq_len`, in turns with
the other worker (as in `benchmarks.training`); the mark then is "the peak from preparation
to the end of training". After that, for each of `seq_lens`, it resets the mark and runs
one more step at that length: the peak per sequence length, whose slope (least squares,
bytes per token of the batch) says what each extra token of context costs.

Every token is trained (no prompt masking): the chunked loss drops nothing here, so its
saving is the chunking alone. The workers run with `benchmarks.training.WORKER_ENV` (a fixed
glibc mmap threshold), so peak RSS follows the tensors alive at the peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_4bit, save_random_checkpoint
from .pace import treat_bf16_as_configured
from .training import (
    _FINISH,
    StepTimes,
    TrainingSettings,
    _reset_peak_rss,
    _rss_bytes,
    _serve,
    _Worker,
    drive_workers,
    synthetic_batches,
)

__all__ = ["LOSS_VARIANTS", "LossMemoryResult", "LossMemorySettings", "LossRun", "bf16_speed", "run_loss_memory",
           "slope"]

_SLOPE = "slope"  # the driver's command for the per-length peaks, after the timed steps

# name -> (label, kbitprep upcast policy or None for peft's preparation, loss)
LOSS_VARIANTS: Mapping[str, tuple[str, str | None, str]] = {
    "reference": ("peft (reference) + transformers' loss", None, "full"),
    "kbitprep": ('kbitprep "norms" + chunked loss', "norms", "chunked"),
}


@dataclasses.dataclass(frozen=True)
class LossMemorySettings:
    """How each variant trains.

    Args:
        seq_len (int): tokens per sequence of the timed steps. Default: 512
        seq_lens (tuple[int, ...]): lengths whose peak gives the per-token slope. Default: (256, 512, 1024)
        batch_size (int): sequences per step. Default: 2
        steps (int): timed optimizer steps. Default: 6
        warmup (int): first steps left out of the median step time. Default: 2
        lr (float): AdamW learning rate. Default: 3e-3
        rank (int): LoRA rank (alpha twice the rank, dropout 0, every linear layer). Default: 16
        seed (int): seeds the weights, the LoRA init and the data. Default: 0
        threads (int | None): torch threads per worker; None keeps torch's default. Default: 1
        budget_s (float | None): seconds the timed rounds may take (`training.run_rounds`); None: no
            budget. Default: 240
    """

    seq_len: int = 512
    seq_lens: tuple[int, ...] = (256, 512, 1024)
    batch_size: int = 2
    steps: int = 6
    warmup: int = 2
    lr: float = 3e-3
    rank: int = 16
    seed: int = 0
    threads: int | None = 1
    budget_s: float | None = 240.0

    def data(self, seq_len: int, steps: int) -> TrainingSettings:
        """The settings `synthetic_batches` takes, for `steps` batches of `seq_len` tokens."""
        return TrainingSettings(steps=steps, batch_size=self.batch_size, seq_len=seq_len, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class LossMemoryResult(StepTimes):
    """One variant on one model shape, as its worker reported it."""

    peak_from_prepare_bytes: int
    rss_after_load_bytes: int
    peak_by_tokens: dict[str, int]  # batch tokens (as a string: JSON keys) -> peak RSS of one step
    loss_plan: dict[str, Any] | None

    @property
    def slope_bytes_per_token(self) -> float:
        return slope({int(tokens): peak for tokens, peak in self.peak_by_tokens.items()})


def slope(points: Mapping[int, int]) -> float:
    """Least-squares slope of peak bytes over batch tokens."""
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


class LossRun:
    """One variant's training in this process: `__init__` loads and prepares, `step()` trains, `slope()` measures."""

    def __init__(self, checkpoint: Path, variant: str, settings: LossMemorySettings) -> None:
        import transformers
        from peft import LoraConfig, get_peft_model

        import kbitprep

        from .variants import REFERENCE

        transformers.utils.logging.disable_progress_bar()
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.variant, self.settings = variant, settings
        _, upcast, self.loss = LOSS_VARIANTS[variant]
        model = load_4bit(checkpoint)
        self.rss_after_load = _rss_bytes("VmRSS") or 0
        _reset_peak_rss()
        if upcast is None:
            REFERENCE.prepare(model)
        else:
            kbitprep.prepare_model_for_kbit_training(model, upcast=upcast)
        torch.manual_seed(settings.seed)
        self.model = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=settings.lr)
        self.batches = synthetic_batches(model.config.vocab_size, settings.data(settings.seq_len, settings.steps))
        self.plan = kbitprep.plan_loss(self.model).to_dict() if self.loss == "chunked" else None
        self.losses: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.peaks: dict[str, int] = {}
        self.peak_from_prepare = 0

    def _train_step(self, input_ids: torch.Tensor) -> float:
        from kbitprep import causal_lm_loss

        batch = {"input_ids": input_ids, "labels": input_ids}
        loss = causal_lm_loss(self.model, batch) if self.loss == "chunked" else self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self) -> None:
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        self.losses.append(self._train_step(self.batches[len(self.losses)]))
        self.wall.append(time.perf_counter() - wall_start)
        self.cpu.append(time.process_time() - cpu_start)

    def slope(self) -> None:
        """The peak of one step at each of `seq_lens`, the mark reset before each."""
        self.peak_from_prepare = _rss_bytes("VmHWM") or 0
        vocab = self.model.config.vocab_size
        for seq_len in self.settings.seq_lens:
            batch = synthetic_batches(vocab, self.settings.data(seq_len, 1))[0]
            _reset_peak_rss()
            self._train_step(batch)
            self.peaks[str(batch.numel())] = _rss_bytes("VmHWM") or 0

    def figures(self) -> dict[str, Any]:
        return {"variant": self.variant, "losses": self.losses, "step_wall_s": self.wall, "step_cpu_s": self.cpu,
                "warmup": self.settings.warmup, "peak_from_prepare_bytes": self.peak_from_prepare,
                "rss_after_load_bytes": self.rss_after_load, "peak_by_tokens": self.peaks, "loss_plan": self.plan}


def run_loss_memory(config: Mapping[str, Any], settings: LossMemorySettings, *, workdir: Path | None = None,
                    log=print) -> dict[str, LossMemoryResult]:
    """Train both `LOSS_VARIANTS` on `config`, steps in turns, then measure each one's per-length peaks alone.

    Args:
        config (Mapping): the model config (a dict with "model_type").
        settings (LossMemorySettings): lengths, batch, steps, seed, threads.
        workdir (Path | None): where to save the checkpoint; a temp dir if None. Default: None
        log (Callable): progress lines. Default: print

    Returns:
        dict[str, LossMemoryResult]: by variant name.

    Raises:
        RuntimeError: a worker failed; its stderr is in the message.
    """
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-loss-", dir=workdir) as tmp:
        checkpoint = save_random_checkpoint(config, Path(tmp) / "model", seed=settings.seed)
        workers = [_Worker(checkpoint, name, settings, Path(tmp) / f"{name}.json", Path(tmp),
                           module="benchmarks.loss_memory") for name in LOSS_VARIANTS]
        drive_workers(workers, settings, "loss rounds", log, finish=(_SLOPE, _FINISH))
        results = {w.name: LossMemoryResult(**json.loads(w.output.read_text())) for w in workers}
    for name, result in results.items():
        log(f"    {name}: peak {result.peak_from_prepare_bytes / 2**20:,.0f} MiB, median step "
            f"{result.median_step_s:.2f} s, {result.slope_bytes_per_token / 1024:,.1f} KiB/token")
    return results


def bf16_speed(threads: int | None = 1, *, tokens: int = 512, vocabulary: int = 32000) -> dict[str, float]:
    """Forward + backward of a frozen `Linear(256, vocabulary)` on `tokens` tokens in fp32 and bf16, best of 3, seconds.

    The issue's yardstick (the defaults): on an AVX2-only CPU bf16 takes many times fp32's
    time (23 s against 0.135 s on one such machine); with AVX512 (oneDNN) it takes less.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        weight = torch.randn(vocabulary, 256) * 0.02
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            best = float("inf")
            for _ in range(3):
                x = torch.randn(tokens, 256, dtype=dtype, requires_grad=True)
                started = time.perf_counter()
                (x @ weight.to(dtype).t()).float().sum().backward()
                best = min(best, time.perf_counter() - started)
            times[str(dtype).removeprefix("torch.")] = best
        return times
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One variant's worker for the loss-memory benchmark.")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variant", required=True, choices=list(LOSS_VARIANTS))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="LossMemorySettings as JSON")
    args = parser.parse_args(argv)
    fields = json.loads(args.settings)
    settings = LossMemorySettings(**{**fields, "seq_lens": tuple(fields["seq_lens"])})
    treat_bf16_as_configured()
    run = LossRun(args.checkpoint, args.variant, settings)
    _serve(run, args.output, {_SLOPE: run.slope})


if __name__ == "__main__":
    main()

