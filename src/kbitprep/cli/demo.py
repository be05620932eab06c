"""`kbitprep demo`: the whole QLoRA pipeline on the tiny model and data shipped inside the package."""

from __future__ import annotations

import argparse

from rich.console import Console

from .options import positive_int

HELP = "fine-tune the embedded tiny model on the embedded data set (CPU, well under a minute)"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..app.demo import DEMO_STEPS

    parser = commands.add_parser("demo", help=HELP, description=HELP[0].upper() + HELP[1:] + ": build a tiny Llama, "
                                 "load it in 4-bit NF4, prepare it, attach LoRA, train, and write the results.")
    parser.add_argument("--output", metavar="DIR", default="kbitprep-demo", help="run folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    parser.add_argument("--max-steps", type=positive_int, default=DEMO_STEPS, metavar="N",
                        help="optimizer steps (default: %(default)s)")
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.demo import run_demo
    from .console import RichObserver, render_finetune_report

    console.print("[bold]kbitprep demo[/]: a tiny Llama (2 layers, hidden 64), 4-bit NF4, LoRA, "
                  "trained to continue the alphabet and the digits", highlight=False)
    with RichObserver(console) as observer:
        report = run_demo(args.output, max_steps=args.max_steps, overwrite=args.overwrite, observer=observer)
    render_finetune_report(console, report, title="demo finished")
    return 0
