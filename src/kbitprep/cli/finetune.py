"""`kbitprep finetune MODEL DATA --output DIR`: QLoRA fine-tuning of a local model on a data file.

The options come from the declaration of `FinetuneSettings` (kbitprep.app.config.settings);
`--config run.yaml` gives any of them from a file (kbitprep.app.config.runfile), and the
options given on the command line override the file's.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from ..app.config.settings import add_arguments, given_settings

HELP = "fine-tune a local model with QLoRA on a data file; write the adapter, a report and a loss plot"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "finetune", help=HELP, description=HELP[0].upper() + HELP[1:] + ".",
        epilog="DATA: a JSONL file, a JSON array, a Parquet or CSV file, or a folder saved by the datasets "
               "library, with rows of one of these forms (recognised from their keys; --data-format to say it): "
               "messages ({\"messages\": [{\"role\", \"content\"}, ...]}, the assistant turns trained), sharegpt "
               "({\"conversations\": [{\"from\", \"value\"}, ...]}, the same), alpaca ({\"instruction\", \"input\", "
               "\"output\"}, the output trained), text ({\"text\"}, every token trained), prompt-completion "
               "({\"prompt\", \"completion\"}, the completion trained). "
               "Runs unchanged under `torchrun --nproc_per_node N`.",
    )
    parser.add_argument("--config", metavar="FILE", help="a YAML run file whose keys are these settings' names "
                        "(relative paths in it are relative to its folder); options given here override it; "
                        "every run writes its settings as DIR/run.yaml")
    add_arguments(parser, only_given=True)
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.config.runfile import settings_from
    from ..app.training.run import finetune
    from .console import RichObserver, render_finetune_report

    settings = settings_from(given_settings(args), args.config)
    with RichObserver(console) as observer:
        report = finetune(settings, observer)
    if _is_main_process():
        render_finetune_report(console, report)
    return 0


def _is_main_process() -> bool:
    from ..app.distributed.processes import one_of_several

    launch = one_of_several()  # a RANK left in the shell is no torchrun launch
    return launch is None or launch.rank == 0
