"""Run every benchmark and write BENCHMARKS.md: `make bench`, or `.venv/bin/python benchmarks/run.py`.

1. prepared footprint of five published model shapes (meta device), validated on a real
   4-bit Qwen2-0.5B;
2. LoRA training of a ~110M-parameter 4-bit model: memory, step time, loss;
3. preparation time on the real Qwen2-0.5B;
4. warnings of preparation and the first training steps;
5. packing: trained tokens per second with and without `--pack` on rows of mixed lengths;
6. the memory model's predicted peak against `finetune`'s measured one, on a grid of real runs;
7. the chunked loss: peak memory from preparation to the end of training, step time, final
   loss and memory per token of context, against peft's preparation + transformers' loss;
8. `finetune --fsdp`'s loading: per-process parameter bytes and peak RSS for N = 1 and 2;
9. kbitprep against TRL's SFTTrainer on the same QLoRA shape: peak memory and step time.
10. one DPO step's peak memory, chunked log-probabilities against the full logits, at Llama-3's
    vocabulary (`--only dpo` measures it alone and rewrites only its own section of BENCHMARKS.md).

Each compares kbitprep's policies with the reference, `peft.prepare_model_for_kbit_training`,
measured in the same run. The full run takes about ten minutes on two CPU cores (more
when they are busy); `--quick` runs every part on tiny models in well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path[0] = str(REPO_ROOT)

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.fit import FIT_GRID, QUICK_GRID, measure_fit_grid  # noqa: E402
from benchmarks.footprint import measure_footprint  # noqa: E402
from benchmarks.loss_memory import LossMemorySettings, bf16_speed, run_loss_memory  # noqa: E402
from benchmarks.machine import describe_machine  # noqa: E402
from benchmarks.markdown import render  # noqa: E402
from benchmarks.pace import SLOW_BF16_ENV, bench_compute_dtype, bf16_treated_slow, treat_bf16_as_configured  # noqa: E402
from benchmarks.packing import PackingSettings, measure_packing  # noqa: E402
from benchmarks.preference_memory import (  # noqa: E402
    PREFERENCE_CONFIG,
    PreferenceMemorySettings,
    render_preference_memory,
    run_preference_memory,
    write_preference_memory,
)
from benchmarks.real_model import measure_real_model  # noqa: E402
from benchmarks.results import BenchmarkResults, check_targets  # noqa: E402
from benchmarks.shapes import (  # noqa: E402
    LOSS_MEMORY_CONFIGS,
    PUBLISHED_CONFIGS,
    REAL_SHAPE,
    TINY_CONFIG,
    TRAINING_CONFIG,
)
from benchmarks.sharded import SHARDED_CONFIG, TINY_SHARDED_CONFIG, measure_sharded  # noqa: E402
from benchmarks.training import TrainingSettings, run_training  # noqa: E402
from benchmarks.trl_sft import QUICK_TRL_SETTINGS, TRL_CONFIG, TrlSettings, run_trl_comparison  # noqa: E402
from benchmarks.variants import VARIANTS  # noqa: E402

TRAINED_VARIANTS = ("reference", "all", "norms")
SECTIONS = ("real", "training", "packing", "fit", "loss-memory", "fsdp", "trl", "dpo")
QUICK_NAME = "tiny-Qwen2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainingSettings()
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="where to write the report")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="loads per variant for preparation time (default 3)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"training steps (default {defaults.steps})")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help=f"steps left out of the median step time (default {defaults.warmup})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help=f"torch threads per training worker, 0 for torch's default (default {defaults.threads})")
    parser.add_argument("--skip-real", action="store_true", help="skip the materialised model (validation, prep time)")
    parser.add_argument("--skip-training", action="store_true", help="skip training and its warnings")
    parser.add_argument("--skip-packing", action="store_true", help="skip the packing throughput comparison")
    parser.add_argument("--skip-fit", action="store_true", help="skip the memory model's grid of finetune runs")
    parser.add_argument("--skip-loss-memory", action="store_true",
                        help="skip the chunked loss's peak memory, step time and memory per token")
    parser.add_argument("--skip-fsdp", action="store_true", help="skip the sharded (FSDP) loading")
    parser.add_argument("--skip-trl", action="store_true", help="skip the comparison with TRL's SFTTrainer")
    parser.add_argument("--skip-dpo", action="store_true", help="skip the DPO step's peak memory")
    parser.add_argument("--only", type=lambda text: set(text.split(",")), metavar="SECTION[,SECTION]",
                        help=f"run only these sections, of: {', '.join(SECTIONS)} (the footprint always runs)")
    parser.add_argument("--budget-minutes", type=float, default=1.0,
                        help="scales each lockstep section's time budget (training 8 min, chunked loss 4 min per "
                             "model, TRL comparison 3 min, at 1.0); rounds beyond it are dropped and the report "
                             "says so; 0: no budget")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few steps everywhere: checks the script, measures nothing useful")
    return parser


_STARTED = time.perf_counter()


def _log(message: str) -> None:
    """A progress line; a section's heading carries the minutes since the start."""
    if message.startswith("["):
        message = f"{message}  ({(time.perf_counter() - _STARTED) / 60:.1f} min in)"
    print(message, flush=True)


def _skip(args: argparse.Namespace, section: str) -> bool:
    """Whether `--skip-SECTION` or `--only` leaves `section` out."""
    return getattr(args, "skip_" + section.replace("-", "_")) or (args.only is not None and section not in args.only)


def _budget(args: argparse.Namespace, seconds: float) -> float | None:
    return seconds * args.budget_minutes if args.budget_minutes > 0 else None


def run(args: argparse.Namespace, command: str) -> BenchmarkResults:
    """Measure everything `args` asks for; write nothing."""
    unknown = (args.only or set()) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: unknown section(s) {', '.join(sorted(unknown))}; pick from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    started_utc = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = describe_machine(REPO_ROOT)
    shapes = {QUICK_NAME: TINY_CONFIG} if args.quick else dict(PUBLISHED_CONFIGS)
    real_name = QUICK_NAME if args.quick else REAL_SHAPE
    training_config = dict(TINY_CONFIG if args.quick else TRAINING_CONFIG)

    _log(f"4-bit layers compute in {bench_compute_dtype()} here (kbitprep's rule for this CPU"
         + (f"; bf16 treated as slow by {SLOW_BF16_ENV})" if bf16_treated_slow() else ")"))
    _log("[1] footprint of the published shapes, on the meta device")
    footprint = []
    for name, config in shapes.items():
        footprint.append(measure_footprint(name, config))
        _log(f"  {name}: norms/ref {footprint[-1].ratio('norms'):.3f}x")

    real = None
    if not _skip(args, "real"):
        _log(f"[1, 3] real {real_name}: validation of the sizing, preparation time")
        repeats = 1 if args.quick else args.repeats
        real = measure_real_model(real_name, shapes[real_name], list(VARIANTS), repeats=repeats, log=_log)

    settings, training = None, {}
    if not _skip(args, "training"):
        _log("[2, 4] training and its warnings, one process per variant")
        threads = args.threads or None
        settings = TrainingSettings(steps=5, warmup=1, batch_size=1, seq_len=32, threads=threads) if args.quick else \
            TrainingSettings(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                             threads=threads, budget_s=_budget(args, TrainingSettings().budget_s or 0))
        training = run_training(training_config, TRAINED_VARIANTS, settings, log=_log)

    packing = None
    if not _skip(args, "packing"):
        _log("[5] packing: trained tokens per second, padded and packed")
        quick = PackingSettings(rows=16, seq_len=64, steps=2, rounds=1)
        packing = measure_packing(quick if args.quick else PackingSettings(), log=_log)
    fit = None
    if not _skip(args, "fit"):
        _log("[6] fit check: predicted against measured peak, one finetune run per row")
        fit = measure_fit_grid(QUICK_GRID if args.quick else FIT_GRID, log=_log)
    loss_settings, loss_configs, loss_runs = None, {}, {}
    if not _skip(args, "loss-memory"):
        _log("[7] the chunked loss: peak memory from preparation, step time, memory per token")
        loss_configs = {QUICK_NAME: dict(TINY_CONFIG)} if args.quick else {k: dict(v) for k, v in
                                                                           LOSS_MEMORY_CONFIGS.items()}
        loss_settings = LossMemorySettings(seq_len=32, seq_lens=(16, 32, 64), batch_size=1, steps=2, warmup=1) \
            if args.quick else LossMemorySettings(threads=args.threads or None,
                                                  budget_s=_budget(args, LossMemorySettings().budget_s or 0))
        for label, config in loss_configs.items():
            _log(f"  {label}")
            loss_runs[label] = run_loss_memory(config, loss_settings, log=_log)

    sharded = None
    if not _skip(args, "fsdp"):
        _log("[8] finetune --fsdp: the 4-bit base sharded over 1 and 2 processes")
        sharded = measure_sharded(TINY_SHARDED_CONFIG if args.quick else SHARDED_CONFIG, log=_log)

    trl_settings, trl_config, trl = None, {}, {}
    if not _skip(args, "trl"):
        _log("[9] kbitprep against TRL's SFTTrainer, one process each")
        trl_config = dict(TINY_CONFIG if args.quick else TRL_CONFIG)
        trl_settings = QUICK_TRL_SETTINGS if args.quick else \
            TrlSettings(threads=args.threads or None, budget_s=_budget(args, TrlSettings().budget_s or 0))
        trl = run_trl_comparison(trl_config, trl_settings, log=_log)
    preference = None
    if not _skip(args, "dpo"):
        _log("[10] one DPO step's peak memory: chunked log-probabilities against the full logits")
        # quick: the tiny model with a vocabulary large enough for the logits to show
        config = {**TINY_CONFIG, "vocab_size": 32000} if args.quick else dict(PREFERENCE_CONFIG)
        dpo_settings = PreferenceMemorySettings(seq_len=32, threads=1) if args.quick else PreferenceMemorySettings()
        figures = run_preference_memory(config, dpo_settings, log=_log)
        preference = render_preference_memory(figures, config, dpo_settings, command)

    return BenchmarkResults(
        command=command, started_utc=started_utc, duration_s=time.perf_counter() - started, machine=machine,
        footprint=footprint, real=real, training_config=training_config,
        training_footprint=measure_footprint("training model", training_config),
        training_settings=settings, training=training, packing=packing, fit=fit, sharded=sharded,
        loss_memory_settings=loss_settings, loss_memory_configs=loss_configs, loss_memory=loss_runs,
        bf16_speed=bf16_speed() if not _skip(args, "loss-memory") else {},
        trl_settings=trl_settings, trl_config=trl_config, trl=trl,
        compute_dtype=str(bench_compute_dtype()).removeprefix("torch."), bf16_treated_slow=bf16_treated_slow(),
        preference_memory=preference,
    )


def _command(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    try:
        python = python.relative_to(REPO_ROOT)
    except ValueError:
        python = Path(python.name)
    return shlex.join([str(python), "benchmarks/run.py", *argv])


# A section another script writes between its own markers (`<!-- NAME: begin -->` ... `<!-- NAME: end -->`:
# make sweep, real_vocab_fit.py, make gguf-bench); a run that does not write it keeps it as it was.
_MARKED = re.compile(r"<!-- ([\w-]+): begin -->.*?<!-- \1: end -->", re.S)


def with_kept_sections(text: str, path: Path) -> str:
    """`text`, with the marked sections of the file at `path` that `text` does not write appended as they were."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = [match.group(0) for match in _MARKED.finditer(current) if f"<!-- {match.group(1)}: begin -->" not in text]
    return "\n\n".join([text.rstrip("\n"), *kept]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    torch.manual_seed(0)
    treat_bf16_as_configured()
    transformers.utils.logging.disable_progress_bar()
    results = run(args, _command(argv))
    if args.only != {"dpo"}:  # `--only dpo` rewrites its own section and nothing else
        args.output.write_text(with_kept_sections(render(results), args.output), encoding="utf-8")
    if results.preference_memory is not None:
        write_preference_memory(results.preference_memory, args.output)
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(results), default=str, indent=1), encoding="utf-8")
    _log(f"wrote {args.output} ({results.duration_s / 60:.1f} min)")
    for target, measured, met in check_targets(results):
        _log(f"  [{ {True: 'met', False: 'MISSED', None: 'n/a'}[met] }] {target.name}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
