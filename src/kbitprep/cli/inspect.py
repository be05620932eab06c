"""`kbitprep inspect MODEL`: the preparation plan under each upcast policy, and a training step's memory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from ..app.config.settings import SETTINGS, add_arguments

# The `finetune` settings that change a training step's memory; inspect takes them as finetune does.
RUN_OPTIONS = ("quantize", "upcast", "compute_dtype", "lora_r", "lora_dropout", "target_modules", "lora_variant",
               "batch_size",
               "seq_len", "loss", "gradient_checkpointing", "optim", "method")

HELP = ("show the preparation plan of a local model under each upcast policy, and the peak memory of a "
        "training step (no weights needed)")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("inspect", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("model", metavar="MODEL", help="local model folder (config.json; weights optional)")
    parser.add_argument("--meta", action="store_true",
                        help="size from config.json on the meta device even when weights are present")
    parser.add_argument("--devices", type=_processes, default=1, metavar="N",
                        help="also size a run sharded over N processes (finetune --fsdp): bytes per process "
                             "and what breaks flattening (default: %(default)s, no sharding)")
    parser.add_argument("--json", action="store_true", help="print the plans and the memory estimate as JSON")
    declared = {s.name for s in SETTINGS}
    add_arguments(parser, [name for name in RUN_OPTIONS if name in declared])
    add_memory_options(parser, missing=[name for name in RUN_OPTIONS if name not in declared])
    return parser


def _processes(text: str) -> int:
    """--devices: a whole number of processes, at least 1."""
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def add_memory_options(parser: argparse.ArgumentParser, missing: list[str]) -> None:
    """What a step's memory depends on beyond `finetune`'s settings (`missing` of them too), and the budget."""
    from ..app.memory.estimate import COMPUTE_DTYPES, DEVICES, LOSSES, OPTIMIZERS, MemorySettings

    defaults = MemorySettings()
    group = parser.add_argument_group("training step memory")
    if "loss" in missing:
        group.add_argument("--loss", choices=list(LOSSES), default=defaults.loss,
                           help="the loss (default: %(default)s)")
    if "compute_dtype" in missing:
        group.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default=defaults.compute_dtype,
                           help="the dtype quantized layers compute in (default: %(default)s)")
    if "gradient_checkpointing" in missing:
        group.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                           help="estimate without gradient checkpointing (every layer keeps its activations)")
    if "optim" in missing:
        group.add_argument("--optim", choices=list(OPTIMIZERS), default=defaults.optim,
                           help="the optimizer (default: %(default)s)")
    group.add_argument("--device", choices=list(DEVICES), default=defaults.device,
                       help="where the run trains; decides the compute dtype (default: this machine's, %(default)s)")
    group.add_argument("--memory", metavar="SIZE", default=None,
                       help="a memory budget such as 24GiB or 80GB: say whether the run fits, and the largest "
                            "batch size and sequence length that do")


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.memory.estimate import MemorySettings, parse_memory_size, plan_memory
    from ..app.memory.step import SimulationError
    from ..app.model.inspection import inspect_model
    from .console import render_inspect_report, render_memory_report

    budget = parse_memory_size(args.memory) if args.memory is not None else None  # a typo costs nothing
    report = inspect_model(args.model, quantize=args.quantize, meta=args.meta, devices=args.devices)
    try:
        memory = plan_memory(args.model, MemorySettings.from_run(args), budget)
    except SimulationError as error:  # the plans stand; only the step's estimate is missing
        memory, problem = None, str(error)
    changes = _changes(args.model, memory, budget) if memory is not None and budget is not None else ()
    if args.json:
        memory_json = {**memory.to_dict(), "changes": [c.to_dict() for c in changes]} if memory else {"error": problem}
        print(json.dumps({**report.to_dict(), "memory": memory_json}, indent=2))
    else:
        render_inspect_report(console, report)
        if memory is not None:
            render_memory_report(console, memory)
            _render_changes(console, changes)
        else:
            console.print(f"training step memory: not estimated: {problem}", style="yellow", markup=False,
                          highlight=False)
    return 1 if memory is None and budget is not None else 0  # a budget asked for an answer it did not get


def _changes(model: str, memory: Any, budget: int) -> tuple[Any, ...]:
    """What buys the most memory (`kbitprep.app.memory.planner`); none when a change cannot be simulated."""
    from ..app.memory.planner import suggest_changes
    from ..app.memory.step import SimulationError

    try:
        return suggest_changes(model, memory.estimate, budget)
    except SimulationError:
        return ()


def _render_changes(console: Console, changes: tuple[Any, ...]) -> None:
    from ..report import format_bytes

    if changes:
        console.print("what buys the most memory, each alone:", markup=False, highlight=False)
    for change in changes:
        verdict = "" if change.fits is None else (", fits" if change.fits else ", does not fit")
        console.print(f"  {change.what} ({change.option}): peak {format_bytes(change.peak)}, "
                      f"saves {format_bytes(max(change.saves, 0))}{verdict}", markup=False, highlight=False)
