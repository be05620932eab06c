"""`kbitprep demo`: the whole QLoRA pipeline on the tiny model and data shipped inside the package."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..app.config.settings import add_arguments

HELP = "fine-tune the embedded tiny model on the embedded data set (CPU, well under a minute)"
DEFAULT_OUTPUT = "kbitprep-demo"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..app.demo import DEMO_STEPS

    parser = commands.add_parser("demo", help=HELP, description=HELP[0].upper() + HELP[1:] + ": build a tiny Llama, "
                                 "load it in 4-bit NF4, prepare it, attach LoRA, train, and write the results.")
    # The demo shares these options with `finetune`, with its own defaults.
    add_arguments(parser, ("output", "overwrite", "resume", "max_steps", "method"),
                  defaults={"output": DEFAULT_OUTPUT, "max_steps": DEMO_STEPS}, groups=False)
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.demo import run_demo
    from .console import RichObserver, render_finetune_report

    console.print("[bold]kbitprep demo[/]: a tiny Llama (2 layers, hidden 64), 4-bit NF4, LoRA, "
                  "trained to continue the alphabet and the digits", highlight=False)
    with RichObserver(console) as observer:
        report = run_demo(args.output, max_steps=args.max_steps, overwrite=args.overwrite, resume=args.resume,
                          observer=observer, method=args.method)
    render_finetune_report(console, report, title="demo finished")
    return 0
