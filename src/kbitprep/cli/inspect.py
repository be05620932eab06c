"""`kbitprep inspect MODEL`: the preparation plan under each upcast policy, with bytes before and after."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from ..sizing import QUANTIZE_CHOICES

HELP = "show the preparation plan of a local model under each upcast policy (no weights needed)"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("inspect", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    parser.add_argument("model", metavar="MODEL", help="local model folder (config.json; weights optional)")
    parser.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default="nf4",
                        help="how the model would be loaded (default: %(default)s)")
    parser.add_argument("--meta", action="store_true",
                        help="size from config.json on the meta device even when weights are present")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.inspection import inspect_model
    from .console import render_inspect_report

    report = inspect_model(args.model, quantize=args.quantize, meta=args.meta)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_inspect_report(console, report)
    return 0
