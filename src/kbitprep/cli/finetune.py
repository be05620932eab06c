"""`kbitprep finetune MODEL DATA --output DIR`: QLoRA fine-tuning of a local model on a JSONL file.

The options come from the declaration of `FinetuneSettings` (kbitprep.app.config.settings).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from ..app.config.settings import FinetuneSettings, add_arguments

HELP = "fine-tune a local model with QLoRA on a JSONL file; write the adapter, a report and a loss plot"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "finetune", help=HELP, description=HELP[0].upper() + HELP[1:] + ".",
        epilog="DATA rows: {\"text\": ...} (every token trained), {\"prompt\": ..., \"completion\": ...} "
               "(only the completion trained) or {\"messages\": [{\"role\": ..., \"content\": ...}, ...]} "
               "(rendered with the chat template; the assistant turns trained). "
               "Runs unchanged under `torchrun --nproc_per_node N`.",
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.training.run import finetune
    from .console import RichObserver, render_finetune_report

    with RichObserver(console) as observer:
        report = finetune(FinetuneSettings.from_args(args), observer)
    if _is_main_process():
        render_finetune_report(console, report)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
