"""LoRA training of a ~110M-parameter 4-bit model, each variant in a process of its own.

`run_training` saves the model once (random bf16 weights, seeded) and starts one worker
per variant (`python -m benchmarks.training ...`); each worker loads the checkpoint in
4-bit NF4, prepares it with its variant and attaches the same seeded LoRA (every linear
layer). The workers then take turns, one training step each per round, on the same
synthetic batches, and finally report as JSON:

- losses and wall/CPU time of every step;
- peak resident memory, from the kernel's high-water mark (VmHWM): the process's
  whole-life peak, and the peak from preparation on (the mark is reset once the model is
  loaded, so the peak of loading a bf16 checkpoint does not hide the training peak).
  `getrusage`'s maxrss is not used: Linux carries it across exec, so a worker would
  report the size of the parent it was forked from whenever that is larger;
- warnings emitted by preparation and by the first three training steps, with attaching
  LoRA (peft's `get_peft_model`) recorded apart: it warns on its own account.

The data has a pattern LoRA can learn in a few steps: every sequence walks a fixed
random successor table over 512 token ids (next = successor[current]), from a random start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .capture import Emitted, capture_warnings
from .checkpoints import load_4bit, save_random_checkpoint
from .pace import Progress, StepBudget, treat_bf16_as_configured

__all__ = ["TrainingResult", "TrainingSettings", "VariantRun", "run_training", "synthetic_batches", "train_variant"]

REPO_ROOT = Path(__file__).resolve().parent.parent
WARNING_STEPS = 3  # warnings are counted over preparation plus this many training steps
PATTERN_TOKENS = 512
# glibc adapts its mmap threshold to the sizes freed, after which large tensors come from a heap
# that is not given back: resident memory then depends on allocation history, and two identical
# runs differ by tens of MiB. A fixed threshold maps every large tensor on its own and unmaps it
# when freed, so peak RSS follows the tensors alive at the peak.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """How each variant trains.

    Args:
        steps (int): optimizer steps. Default: 16
        warmup (int): first steps left out of the median step time. Default: 4
        batch_size (int): sequences per step. Default: 2
        seq_len (int): tokens per sequence. Default: 256
        lr (float): AdamW learning rate for the LoRA weights. Default: 3e-3
        rank (int): LoRA rank (alpha is twice the rank, dropout 0). Default: 16
        seed (int): seeds the weights, the LoRA init and the data. Default: 0
        threads (int | None): torch intra-op threads per worker; None keeps torch's default (all
            cores). One thread keeps step times steady on a shared machine, where a thread that
            waits for a busy core stalls every parallel op. Default: 1
        budget_s (float | None): seconds the rounds of steps may take; fewer rounds run (never
            fewer than warm-up + 2) when the rounds done so far say they would not fit. None: no
            budget. Default: 480
    """

    steps: int = 16
    warmup: int = 4
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 3e-3
    rank: int = 16
    seed: int = 0
    threads: int | None = 1
    budget_s: float | None = 480.0


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """A worker's losses and step times, the first `warmup` steps left out of the medians."""

    variant: str
    losses: list[float]
    step_wall_s: list[float]
    step_cpu_s: list[float]
    warmup: int

    @property
    def steps(self) -> int:
        """Steps run: the settings' steps, or fewer where a time budget cut the rounds."""
        return len(self.step_wall_s)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_wall_s[self.warmup:])

    @property
    def median_step_cpu_s(self) -> float:
        return statistics.median(self.step_cpu_s[self.warmup:])

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


@dataclasses.dataclass(frozen=True)
class TrainingResult(StepTimes):
    """One variant's training run, as its worker reported it."""

    peak_rss_bytes: int
    peak_rss_from_prepare_bytes: int | None
    ru_maxrss_bytes: int
    rss_after_load_bytes: int
    warnings_prepare: list[dict[str, str]]
    warnings_lora: list[dict[str, str]]
    warnings_steps: list[dict[str, str]]
    trainable_parameters: int
    torch_threads: int
    compute_dtype: str = "bfloat16"  # what the 4-bit layers computed in (`pace.bench_compute_dtype`)

    @property
    def warnings_prepare_and_steps(self) -> list[dict[str, str]]:
        return self.warnings_prepare + self.warnings_steps


def synthetic_batches(vocab_size: int, settings: TrainingSettings) -> list[torch.Tensor]:
    """`settings.steps` batches of token ids, (batch_size, seq_len) each, the same for every seed."""
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = min(PATTERN_TOKENS, vocab_size)
    offset = min(1000, vocab_size - tokens)  # stay clear of the low ids tokenizers reserve
    successor = torch.randperm(tokens, generator=generator)
    batches = []
    for _ in range(settings.steps):
        current = torch.randint(0, tokens, (settings.batch_size,), generator=generator)
        columns = []
        for _ in range(settings.seq_len):
            columns.append(current)
            current = successor[current]
        batches.append(torch.stack(columns, dim=1) + offset)
    return batches


def _rss_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc (VmRSS, VmHWM), None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class VariantRun:
    """One variant's training, step by step, in this process.

    `__init__` loads, prepares and attaches LoRA; `step()` runs the next optimizer step;
    `figures()` reports. Meant for a fresh process: its peak memory is the process's.
    """

    def __init__(self, checkpoint: Path, variant_name: str, settings: TrainingSettings) -> None:
        import transformers
        from peft import LoraConfig, get_peft_model

        from .variants import VARIANTS

        transformers.utils.logging.disable_progress_bar()
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.variant, self.settings = variant_name, settings
        model = load_4bit(checkpoint)
        self.rss_after_load = _rss_bytes("VmRSS") or 0
        self.peak_of_load = _rss_bytes("VmHWM")
        self.peak_reset = _reset_peak_rss()

        with capture_warnings() as self.prepare_warnings:
            VARIANTS[variant_name].prepare(model)
        with capture_warnings() as self.lora_warnings:
            torch.manual_seed(settings.seed)
            model = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        self.model = model
        self.trainable = [param for param in model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr)
        self.batches = synthetic_batches(model.config.vocab_size, settings)
        self.losses: list[float] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.step_warnings: list[Emitted] = []
        model.train()

    def step(self) -> None:
        """Run the next optimizer step; warnings of the first `WARNING_STEPS` are recorded."""
        with capture_warnings() if len(self.losses) < WARNING_STEPS else contextlib.nullcontext([]) as emitted:
            input_ids = self.batches[len(self.losses)]
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.wall.append(time.perf_counter() - wall_start)
            self.cpu.append(time.process_time() - cpu_start)
            self.losses.append(float(loss.detach()))
        self.step_warnings.extend(emitted)

    def _peak_rss(self) -> int:
        """The process's peak RSS: the larger of the load's and the one since, else getrusage's."""
        peaks = [peak for peak in (self.peak_of_load, _rss_bytes("VmHWM")) if peak is not None]
        return max(peaks) if peaks else _ru_maxrss_bytes()

    def figures(self) -> dict[str, Any]:
        """What `TrainingResult` holds, as JSON-ready data."""
        def as_dicts(items: Sequence[Emitted]) -> list[dict[str, str]]:
            return [dataclasses.asdict(item) for item in items]

        return {
            "variant": self.variant,
            "losses": self.losses,
            "step_wall_s": self.wall,
            "step_cpu_s": self.cpu,
            "warmup": self.settings.warmup,
            "peak_rss_bytes": self._peak_rss(),
            "peak_rss_from_prepare_bytes": _rss_bytes("VmHWM") if self.peak_reset else None,
            "ru_maxrss_bytes": _ru_maxrss_bytes(),
            "rss_after_load_bytes": self.rss_after_load,
            "warnings_prepare": as_dicts(self.prepare_warnings),
            "warnings_lora": as_dicts(self.lora_warnings),
            "warnings_steps": as_dicts(self.step_warnings),
            "trainable_parameters": sum(param.numel() for param in self.trainable),
            "torch_threads": torch.get_num_threads(),
            "compute_dtype": _compute_dtype(self.model),
        }


def _compute_dtype(model: torch.nn.Module) -> str:
    """The dtype the 4-bit layers compute in ("none" for a model without any)."""
    found = {module.compute_dtype for module in model.modules() if isinstance(getattr(module, "compute_dtype", None),
                                                                              torch.dtype)}
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in found)) or "none"


def train_variant(checkpoint: Path, variant_name: str, settings: TrainingSettings) -> dict[str, Any]:
    """All of one variant's training in this process, without interleaving; returns `VariantRun.figures()`."""
    run = VariantRun(checkpoint, variant_name, settings)
    for _ in range(settings.steps):
        run.step()
    return run.figures()


# The lockstep protocol between `run_training` and its workers: one line each way per command.
_READY, _DONE, _STEP, _FINISH = "@@ready", "@@done", "step", "finish"


class _Worker:
    """A worker process as `run_training` drives it."""

    def __init__(self, checkpoint: Path, name: str, settings: Any, output: Path, log_dir: Path,
                 module: str = "benchmarks.training") -> None:
        self.name, self.output = name, output
        self.stderr_path = log_dir / f"{name}.stderr"
        command = [sys.executable, "-m", module, "--checkpoint", str(checkpoint), "--variant", name,
                   "--output", str(output), "--settings", json.dumps(dataclasses.asdict(settings))]
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **WORKER_ENV, "PYTHONPATH": pythonpath}
        with open(self.stderr_path, "w", encoding="utf-8") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, text=True)

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, reply: str) -> None:
        """Wait for `reply`, skipping anything else a library printed to stdout."""
        for line in self.process.stdout:
            if line.strip() == reply:
                return
        self.process.wait()
        stderr = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        raise RuntimeError(f"training worker for {self.name!r} exited ({self.process.returncode}) before "
                           f"{reply!r}:\n{stderr[-4000:]}")


def run_training(config: Mapping[str, Any], variants: Sequence[str], settings: TrainingSettings,
                 *, workdir: Path | None = None, log=print) -> dict[str, TrainingResult]:
    """Train each variant in a process of its own, on the same checkpoint, seed and data, steps interleaved.

    All workers load and prepare at once, then take turns: step k of every variant runs
    while the others wait idle, in an order rotated each round. Separate processes keep
    the peak memory of each variant its own; the turns make a slow spell of a shared
    machine fall on every variant alike instead of on whichever ran at the time.

    Args:
        config (Mapping): the model config (a dict with "model_type").
        variants (Sequence[str]): names from `variants.VARIANTS`.
        settings (TrainingSettings): steps, batch, sequence length, seed, ...
        workdir (Path | None): where to save the checkpoint; a temp dir if None. Default: None
        log (Callable): progress lines. Default: print

    Returns:
        dict[str, TrainingResult]: by variant name, in the order of `variants`.

    Raises:
        RuntimeError: a worker failed; its stderr is in the message.
    """
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-train-", dir=workdir) as tmp:
        checkpoint = save_random_checkpoint(config, Path(tmp) / "model", seed=settings.seed)
        workers = [_Worker(checkpoint, name, settings, Path(tmp) / f"{name}.json", Path(tmp)) for name in variants]
        drive_workers(workers, settings, "training rounds", log)
        results = {worker.name: TrainingResult(**json.loads(worker.output.read_text())) for worker in workers}
    for name, result in results.items():
        log(f"  training {name}: median step {result.median_step_s:.2f} s, final loss {result.final_loss:.4f}")
    return results


def drive_workers(workers: Sequence[_Worker], settings: Any, label: str, log: Callable[[str], None], *,
                  finish: Sequence[str] = (_FINISH,)) -> int:
    """A lockstep section from start to end: each worker ready, the rounds, then each given `finish`'s
    commands in turn (one at a time: its last figures are measured without a neighbour's steps).
    A worker still running when this returns or fails is killed. Returns the rounds run.

    `settings` has `steps`, `warmup` and `budget_s` (TrainingSettings and the sections' own).
    """
    try:
        for worker in workers:
            worker.expect(_READY)
        log(f"  {len(workers)} workers loaded and prepared; {settings.steps} rounds of steps")
        rounds = run_rounds(workers, settings.steps, settings.warmup, settings.budget_s, label, log)
        for worker in workers:
            for command in finish:
                worker.send(command)
                worker.expect(_DONE)
            worker.process.wait()
        return rounds
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()


def run_rounds(workers: Sequence[_Worker], requested: int, warmup: int, budget_s: float | None, label: str,
               log: Callable[[str], None]) -> int:
    """Rounds of one step per worker, order rotated each round, as many as `budget_s` lets; returns how many ran.

    Progress, with the time left estimated from the rounds done, goes to `log`.
    """
    budget = StepBudget(requested, minimum=warmup + 2, budget_s=budget_s)
    progress = Progress(label, requested, log, unit="round")
    rounds, done = requested, 0
    while done < rounds:
        shift = done % len(workers)
        for worker in [*workers[shift:], *workers[:shift]]:
            worker.send(_STEP)
            worker.expect(_DONE)
        done += 1
        rounds = budget.rounds_after(done)
        progress.advance(total=rounds)
    if rounds < requested:
        log(f"    {label}: {rounds} of {requested} rounds, the time budget of {budget_s / 60:.1f} min")
    return rounds


def _serve(run: Any, output: Path, extra: Mapping[str, Callable[[], object]] | None = None) -> None:
    """Answer the lockstep protocol on stdin/stdout until told to finish.

    `run` has `step()` and `figures()`; `extra` maps a worker's own further commands to what they do.
    """
    commands: dict[str, Callable[[], object]] = {_STEP: run.step, **(extra or {})}
    print(_READY, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in commands:
            commands[command]()
        elif command == _FINISH:
            output.write_text(json.dumps(run.figures()), encoding="utf-8")
        else:
            raise SystemExit(f"unknown command {command!r}")
        print(_DONE, flush=True)
        if command == _FINISH:
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One variant's training worker (driven by benchmarks/run.py).")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="TrainingSettings as JSON")
    args = parser.parse_args(argv)
    settings = TrainingSettings(**json.loads(args.settings))
    treat_bf16_as_configured()
    _serve(VariantRun(args.checkpoint, args.variant, settings), args.output)


if __name__ == "__main__":
    main()
