"""kbitprep against TRL's SFTTrainer on the same QLoRA shape: peak memory and step time, each in its own process.

Two workers (`python -m benchmarks.trl_sft ...`) on the same checkpoint, nf4 base
(`checkpoints.load_4bit`: bitsandbytes' `BitsAndBytesConfig`, computing in the dtype kbitprep
picks on this CPU), the same peft `LoraConfig`, batch, sequence length, steps, AdamW
(learning rate, weight decay 0.01) and synthetic data:

- "kbitprep": `kbitprep.prepare_model_for_kbit_training(upcast="norms")` (gradient
  checkpointing on) and `kbitprep.causal_lm_loss`, its chunked loss, in a plain loop;
- "trl": TRL's `SFTTrainer` with its defaults for memory: gradient checkpointing on, and its
  own chunked LM head (`loss_type="nll"`, which never builds the full logits). Its other
  memory options do not apply on a CPU: `use_liger_kernel` needs liger-kernel (Triton,
  CUDA), `padding_free` needs FlashAttention, `activation_offloading` moves activations to
  the CPU, where they already are. Gradient clipping is off (the kbitprep loop has none).

The workers step in turns (`training.run_rounds`): a callback holds TRL's loop at each step
until the driver says "step". Each worker resets the kernel's high-water mark of its resident
memory (VmHWM) once the 4-bit model is loaded; the mark at the end is the peak from
preparation (peft / TRL's trainer set-up) to the end of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_4bit, save_random_checkpoint
from .loss_memory import LossMemorySettings, LossRun
from .pace import bench_compute_dtype, treat_bf16_as_configured
from .shapes import PUBLISHED_CONFIGS
from .training import (
    _DONE,
    _FINISH,
    _READY,
    _STEP,
    StepTimes,
    _reset_peak_rss,
    _rss_bytes,
    _serve,
    _Worker,
    drive_workers,
    synthetic_batches,
)

__all__ = ["QUICK_TRL_SETTINGS", "TRL_CONFIG", "TRL_VARIANTS", "TrlResult", "TrlSettings", "render_trl",
           "run_trl_comparison"]

BEGIN, END = "<!-- trl-sft: begin -->", "<!-- trl-sft: end -->"
TRL_VARIANTS: Mapping[str, str] = {
    "kbitprep": 'kbitprep "norms" + chunked loss',
    "trl": "TRL SFTTrainer (its chunked LM head)",
}

# Qwen2-0.5B's real head (151,936 x 896, tied) on 2 of its 24 layers: the head is most of the step.
TRL_LAYERS = 2
TRL_CONFIG: Mapping[str, Any] = {**PUBLISHED_CONFIGS["Qwen2-0.5B"], "num_hidden_layers": TRL_LAYERS,
                                 "max_window_layers": TRL_LAYERS}


@dataclasses.dataclass(frozen=True)
class TrlSettings:
    """How both workers train.

    Args:
        seq_len (int): tokens per sequence. Default: 512
        batch_size (int): sequences per step. Default: 2
        steps (int): optimizer steps. Default: 5
        warmup (int): first steps left out of the median step time. Default: 1
        lr (float): AdamW learning rate. Default: 3e-3
        rank (int): LoRA rank (alpha twice the rank, dropout 0, every linear layer). Default: 16
        seed (int): seeds the weights, the LoRA init and the data. Default: 0
        threads (int | None): torch threads per worker; None keeps torch's default. Default: 1
        budget_s (float | None): seconds the rounds may take (`training.run_rounds`). Default: 180
    """

    seq_len: int = 512
    batch_size: int = 2
    steps: int = 5
    warmup: int = 1
    lr: float = 3e-3
    rank: int = 16
    seed: int = 0
    threads: int | None = 1
    budget_s: float | None = 180.0

    def loss_settings(self) -> LossMemorySettings:
        return LossMemorySettings(seq_len=self.seq_len, seq_lens=(), batch_size=self.batch_size, steps=self.steps,
                                  warmup=self.warmup, lr=self.lr, rank=self.rank, seed=self.seed, threads=self.threads,
                                  budget_s=self.budget_s)


# `--quick`: the tiny model, a few seconds; checks the section, measures nothing useful.
QUICK_TRL_SETTINGS = TrlSettings(seq_len=32, batch_size=1, steps=3, warmup=1)


@dataclasses.dataclass(frozen=True)
class TrlResult(StepTimes):
    """One worker's figures."""

    peak_from_prepare_bytes: int
    rss_after_load_bytes: int
    compute_dtype: str
    options: str


class _KbitprepRun:
    """kbitprep's preparation and chunked loss in a plain loop (`loss_memory.LossRun`), peak read at the end."""

    def __init__(self, checkpoint: Path, settings: TrlSettings) -> None:
        self.run = LossRun(checkpoint, "kbitprep", settings.loss_settings())
        self.step = self.run.step

    def figures(self) -> dict[str, Any]:
        run = self.run
        return {"variant": "kbitprep", "losses": run.losses, "step_wall_s": run.wall, "step_cpu_s": run.cpu,
                "warmup": run.settings.warmup,
                "peak_from_prepare_bytes": _rss_bytes("VmHWM") or 0, "rss_after_load_bytes": run.rss_after_load,
                "compute_dtype": str(bench_compute_dtype()).removeprefix("torch."),
                "options": "upcast=norms, gradient checkpointing, causal_lm_loss (chunked)"}


def _tokenizer() -> Any:
    """A word-level tokenizer with a pad token: SFTTrainer wants one for its collator; the data is token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _run_trl(checkpoint: Path, settings: TrlSettings, output: Path) -> None:
    """TRL's SFTTrainer, held at each step by a callback until the driver says "step"."""
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    transformers.utils.logging.disable_progress_bar()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    model = load_4bit(checkpoint)
    rss_after_load = _rss_bytes("VmRSS") or 0
    _reset_peak_rss()
    batches = synthetic_batches(model.config.vocab_size, settings.loss_settings().data(settings.seq_len,
                                                                                         settings.steps))
    rows = [row.tolist() for batch in batches for row in batch]
    compute = bench_compute_dtype()
    config = SFTConfig(
        output_dir=str(output.parent / "trl-out"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1, max_length=settings.seq_len,
        learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        optim="adamw_torch", max_grad_norm=0.0, bf16=compute == torch.bfloat16, fp16=False, use_cpu=True,
        gradient_checkpointing=True, loss_type="nll", report_to="none", save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, seed=settings.seed, dataloader_num_workers=0)
    lora = LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    wall: list[float] = []
    cpu: list[float] = []
    started = [0.0, 0.0]
    losses: list[float] = []

    def next_command() -> str:
        line = sys.stdin.readline().strip()
        if line not in (_STEP, _FINISH):
            raise SystemExit(f"unknown command {line!r}")
        return line

    class Lockstep(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started[:] = [time.perf_counter(), time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            wall.append(time.perf_counter() - started[0])
            cpu.append(time.process_time() - started[1])
            print(_DONE, flush=True)
            if next_command() == _FINISH:
                control.should_training_stop = True
            return control

    torch.manual_seed(settings.seed)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=_tokenizer(), peft_config=lora, callbacks=[Lockstep()])
    print(_READY, flush=True)
    if next_command() == _STEP:
        result = trainer.train()
        losses.append(float(result.training_loss))
    figures = {"variant": "trl", "losses": losses, "step_wall_s": wall, "step_cpu_s": cpu, "warmup": settings.warmup,
               "peak_from_prepare_bytes": _rss_bytes("VmHWM") or 0, "rss_after_load_bytes": rss_after_load,
               "compute_dtype": str(compute).removeprefix("torch."),
               "options": f"trl {_trl_version()}, gradient checkpointing, loss_type=nll, bf16={config.bf16} "
                          "(autocast), LoRA weights cast to bf16 (TRL's QLoRA rule)"}
    output.write_text(json.dumps(figures), encoding="utf-8")
    print(_DONE, flush=True)


def _trl_version() -> str:
    import trl

    return trl.__version__


def run_trl_comparison(config: Mapping[str, Any], settings: TrlSettings, *, workdir: Path | None = None,
                       log=print) -> dict[str, TrlResult]:
    """Train kbitprep and TRL's SFTTrainer on `config`, each in a process of its own, steps in turns.

    Args:
        config (Mapping): the model config (a dict with "model_type").
        settings (TrlSettings): batch, length, steps, seed, threads, budget.
        workdir (Path | None): where to save the checkpoint; a temp dir if None. Default: None
        log (Callable): progress lines. Default: print

    Returns:
        dict[str, TrlResult]: by variant name ("kbitprep", "trl").

    Raises:
        RuntimeError: a worker failed; its stderr is in the message.
    """
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-trl-", dir=workdir) as tmp:
        checkpoint = save_random_checkpoint(config, Path(tmp) / "model", seed=settings.seed)
        workers = [_Worker(checkpoint, name, settings, Path(tmp) / f"{name}.json", Path(tmp),
                           module="benchmarks.trl_sft") for name in TRL_VARIANTS]
        drive_workers(workers, settings, "trl rounds", log)
        results = {w.name: TrlResult(**json.loads(w.output.read_text())) for w in workers}
    for name, result in results.items():
        log(f"    {name}: peak {result.peak_from_prepare_bytes / 2**20:,.0f} MiB, median step "
            f"{result.median_step_s:.2f} s over {result.steps - result.warmup} steps")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """A worker (`--variant`, started by `run_trl_comparison`), or, without `--variant`, this section alone.

    `python -m benchmarks.trl_sft [--quick] [--output BENCHMARKS.md]` measures the comparison and
    replaces its section of the output file (between its markers); nothing else there changes.
    """
    parser = argparse.ArgumentParser(description="kbitprep against TRL's SFTTrainer: this section of BENCHMARKS.md "
                                                 "alone, or (with --variant) one of its workers.")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--variant", choices=list(TRL_VARIANTS))
    parser.add_argument("--output", type=Path, help="the worker's JSON; the report without --variant "
                                                    "(default BENCHMARKS.md)")
    parser.add_argument("--settings", help="TrlSettings as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps: checks the script")
    args = parser.parse_args(argv)
    treat_bf16_as_configured()
    if args.variant is None:
        _write_section(args.output or Path(__file__).resolve().parent.parent / "BENCHMARKS.md", args.quick)
        return
    settings = TrlSettings(**json.loads(args.settings))
    if args.variant == "trl":
        _run_trl(args.checkpoint, settings, args.output)
    else:
        _serve(_KbitprepRun(args.checkpoint, settings), args.output)



def render_trl(settings: TrlSettings | None, config: Mapping[str, Any], results: Mapping[str, TrlResult],
               command: str = "") -> list[str]:
    """The section of BENCHMARKS.md, between its markers: one row per worker, and kbitprep / TRL from the same run.

    `command` (with when it started) is named in the section: `python -m benchmarks.trl_sft` rewrites this
    section alone, so it may come from another run than the rest of the file.
    """
    if settings is None or not results:
        return []
    mine, theirs = results["kbitprep"], results["trl"]
    steps = min(mine.steps, theirs.steps)
    cut = (f" (**fewer than {settings.steps}: the section's time budget of {(settings.budget_s or 0) / 60:.1f} min "
           "ran out on this CPU**)" if steps < settings.steps else "")
    lines = [
        BEGIN,
        "## kbitprep against TRL's SFTTrainer (QLoRA)",
        "",
        *([f"This section: {command}.", ""] if command else []),
        f"Model: {config['architectures'][0]} shape, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
        f"layers, vocabulary {config['vocab_size']:,} ({'tied' if config.get('tie_word_embeddings') else 'untied'} "
        "LM head), random bf16 weights saved once and loaded by both workers in NF4 (bitsandbytes' "
        f"`BitsAndBytesConfig`, double quantization, computing in {mine.compute_dtype}: what kbitprep picks on this "
        f"CPU). peft `LoraConfig` r={settings.rank}, alpha={2 * settings.rank}, dropout 0, every linear layer; "
        f"AdamW lr {settings.lr}, weight decay 0.01, no gradient clipping; {steps} steps{cut} of batch "
        f"{settings.batch_size} x {settings.seq_len} tokens, every token trained; gradient checkpointing on in both.",
        "",
        "- kbitprep: " + mine.options + ", a plain training loop.",
        "- TRL: " + theirs.options + ". TRL's chunked head is its own default (`loss_type=\"nll\"`); "
        "`use_liger_kernel` needs liger-kernel (Triton, CUDA), `padding_free` needs FlashAttention, and "
        "`activation_offloading` moves activations to the CPU, where they already are, so TRL runs its defaults.",
        "",
        f"Each worker is a process of its own ({_threads(settings.threads)}); the two take turns, one "
        "step each per round. Peak = the kernel's high-water mark (VmHWM), reset once the 4-bit model is loaded: "
        "from preparation (TRL: building the trainer) to the end of training. It includes each process's imports "
        "(TRL's process also holds trl, datasets and accelerate), so the growth above the loaded model is shown "
        f"too. Median step over steps {settings.warmup + 1}-{steps}; CPU time is the process's CPU seconds per step, "
        "steadier than wall time on a shared machine.",
        "",
    ]
    header = ["variant", "peak from preparation (MiB)", "above the loaded model (MiB)", "median step (s)",
              "median CPU per step (s)"]
    rows = [[TRL_VARIANTS[name], _mib(r.peak_from_prepare_bytes),
             _mib(r.peak_from_prepare_bytes - r.rss_after_load_bytes), f"{r.median_step_s:.2f}",
             f"{r.median_step_cpu_s:.2f}"]
            for name, r in results.items()]
    rows.append(["**kbitprep / TRL**", f"{mine.peak_from_prepare_bytes / theirs.peak_from_prepare_bytes:.3f}x",
                 f"{_growth(mine) / _growth(theirs):.3f}x" if _growth(theirs) > 0 else "n/a",
                 f"{mine.median_step_s / theirs.median_step_s:.3f}x",
                 f"{mine.median_step_cpu_s / theirs.median_step_cpu_s:.3f}x"])
    return lines + ["| " + " | ".join(header) + " |", "| --- | ---: | ---: | ---: | ---: |"] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [END, ""]


def _write_section(path: Path, quick: bool) -> None:
    from datetime import datetime, timezone

    from .memory_sweep import write_section
    from .shapes import TINY_CONFIG

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    config = dict(TINY_CONFIG if quick else TRL_CONFIG)
    settings = QUICK_TRL_SETTINGS if quick else TrlSettings()
    results = run_trl_comparison(config, settings)
    command = "python -m benchmarks.trl_sft" + (" --quick" if quick else "")
    write_section("\n".join(render_trl(settings, config, results, f"`{command}`, started {started}")).rstrip("\n"),
                  path, begin=BEGIN, end=END)
    print(f"wrote its section of {path}", flush=True)


def _threads(threads: int | None) -> str:
    return "torch's default threads" if threads is None else f"{threads} torch thread{'s' if threads != 1 else ''} each"


def _growth(result: TrlResult) -> int:
    return result.peak_from_prepare_bytes - result.rss_after_load_bytes


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f}"


if __name__ == "__main__":
    main()
