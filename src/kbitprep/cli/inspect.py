"""`kbitprep inspect MODEL`: the preparation plan under each upcast policy, and a training step's memory."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from ..plan import UPCAST_POLICIES
from ..sizing import QUANTIZE_CHOICES
from .options import module_names, positive_int, probability

HELP = ("show the preparation plan of a local model under each upcast policy, and the peak memory of a "
        "training step (no weights needed)")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("inspect", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("model", metavar="MODEL", help="local model folder (config.json; weights optional)")
    parser.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default="nf4",
                        help="how the model would be loaded (default: %(default)s)")
    parser.add_argument("--meta", action="store_true",
                        help="size from config.json on the meta device even when weights are present")
    parser.add_argument("--json", action="store_true", help="print the plans and the memory estimate as JSON")
    add_memory_options(parser)
    return parser


def add_memory_options(parser: argparse.ArgumentParser) -> None:
    """The options of a training run that change its memory, with `finetune`'s defaults, and the budget."""
    from ..app.memory import DEVICES, LOSSES, OPTIMIZERS, MemorySettings

    defaults = MemorySettings()
    group = parser.add_argument_group("training step memory (the options of `kbitprep finetune`)")
    group.add_argument("--upcast", choices=list(UPCAST_POLICIES), default=defaults.upcast,
                       help="upcast policy of the run (default: %(default)s)")
    group.add_argument("--lora-r", type=positive_int, default=defaults.lora_r, metavar="R",
                       help="LoRA rank (default: %(default)s)")
    group.add_argument("--lora-dropout", type=probability, default=defaults.lora_dropout, metavar="P",
                       help="dropout on the LoRA input (default: %(default)s)")
    group.add_argument("--target-modules", type=module_names, default=None, metavar="NAMES",
                       help="comma-separated module names to adapt (default: all linear layers but the output head)")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, metavar="N",
                       help="sequences per step (default: %(default)s)")
    group.add_argument("--seq-len", type=positive_int, default=defaults.seq_len, metavar="N",
                       help="tokens per sequence (default: %(default)s)")
    group.add_argument("--loss", choices=list(LOSSES), default=defaults.loss, help="the loss (default: %(default)s)")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS), default=defaults.optimizer,
                       help="the optimizer (default: %(default)s, the Trainer's)")
    group.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                       help="estimate without gradient checkpointing (every layer keeps its activations)")
    group.add_argument("--device", choices=list(DEVICES), default=defaults.device,
                       help="where the run trains; decides the compute dtype (default: this machine's, %(default)s)")
    group.add_argument("--memory", metavar="SIZE", default=None,
                       help="a memory budget such as 24GiB or 80GB: say whether the run fits, and the largest "
                            "batch size and sequence length that do")


def memory_settings(args: argparse.Namespace):
    """The `MemorySettings` the parsed options describe."""
    from ..app.memory import MemorySettings

    return MemorySettings(
        quantize=args.quantize, upcast=args.upcast, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, batch_size=args.batch_size, seq_len=args.seq_len, loss=args.loss,
        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing, device=args.device)


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.inspection import inspect_model
    from ..app.memory import parse_memory_size, plan_memory
    from .console import render_inspect_report, render_memory_report

    budget = parse_memory_size(args.memory) if args.memory is not None else None  # a typo costs nothing
    report = inspect_model(args.model, quantize=args.quantize, meta=args.meta)
    memory = plan_memory(args.model, memory_settings(args), budget)
    if args.json:
        print(json.dumps({**report.to_dict(), "memory": memory.to_dict()}, indent=2))
    else:
        render_inspect_report(console, report)
        render_memory_report(console, memory)
    return 0
