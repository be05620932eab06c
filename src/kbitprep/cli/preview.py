"""`kbitprep preview MODEL DATA`: the rows as `finetune` would train them, a summary of the file, the template checks.

The data options are `finetune`'s own (declared once in `kbitprep.app.config.settings`),
and `--config run.yaml` reads a run file as `finetune` does, so a preview shows the run
those settings make.
"""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console

from ..app.config.settings import add_arguments, given_settings
from ..app.data.formats import DATA_FORMAT_CHOICES

# The `finetune` settings that decide what the run trains on (batch size: for the padding figures).
DATA_OPTIONS = ("model", "data", "data_format", "chat_template", "seq_len", "pack", "batch_size")

HELP = ("show the first rows of a data file as finetune would train them (trained tokens in colour) and a "
        "summary of the whole file, and check the chat template; no weights are loaded")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "preview", help=HELP, description=HELP[0].upper() + HELP[1:] + ".",
        epilog=f"DATA: any file or folder finetune reads ({', '.join(DATA_FORMAT_CHOICES[1:])} rows). "
               "Exit status 1 when a template check finds an error (the run would refuse the data).",
    )
    parser.add_argument("--config", metavar="FILE", help="a finetune run file (YAML); its data settings are used, "
                        "and options given here override them")
    parser.add_argument("-n", "--rows", type=_rows, default=3, metavar="N",
                        help="rows to show, the file's first (default: %(default)s; 0: the summary alone)")
    parser.add_argument("--ids", action="store_true", help="show each token's id after it")
    parser.add_argument("--json", action="store_true", help="print the rows, the summary and the checks as JSON")
    add_arguments(parser, DATA_OPTIONS, only_given=True)
    return parser


def _rows(text: str) -> int:
    value = int(text) if text.strip().isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return value


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.config.runfile import settings_from
    from ..app.preview import preview
    from .console import render_preview_report

    # A preview writes nothing: the settings' run folder is only a placeholder for the declaration's sake.
    settings = settings_from({**given_settings(args), "output": os.devnull}, args.config)
    report = preview(settings, shown=args.rows)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_preview_report(console, report, ids=args.ids)
    return 1 if report.checks.errors else 0
