"""`kbitprep finetune MODEL DATA --output DIR`: QLoRA fine-tuning of a local model on a JSONL file."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..plan import UPCAST_POLICIES
from ..sizing import QUANTIZE_CHOICES
from .options import module_names, positive_float, positive_int, probability

HELP = "fine-tune a local model with QLoRA on a JSONL file; write the adapter, a report and a loss plot"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "finetune", help=HELP, description=HELP[0].upper() + HELP[1:] + ".",
        epilog="DATA rows: {\"text\": ...} (every token trained) or {\"prompt\": ..., \"completion\": ...} "
               "(only the completion trained). Runs unchanged under `torchrun --nproc_per_node N`.",
    )
    parser.add_argument("model", metavar="MODEL", help="local model folder: config.json, weights, tokenizer")
    parser.add_argument("data", metavar="DATA", help="JSONL training data")
    parser.add_argument("--output", metavar="DIR", required=True,
                        help="run folder for adapter, report, plot, checkpoints")
    add_run_options(parser)
    model = parser.add_argument_group("model and adapter")
    model.add_argument("--quantize", choices=list(QUANTIZE_CHOICES), default="nf4",
                       help="weight format (default: %(default)s)")
    model.add_argument("--upcast", choices=list(UPCAST_POLICIES), default="all",
                       help="which half-precision weights go to float32 (default: %(default)s)")
    model.add_argument("--lora-r", type=positive_int, default=16, metavar="R", help="LoRA rank (default: %(default)s)")
    model.add_argument("--lora-alpha", type=positive_float, default=32.0, metavar="A",
                       help="LoRA alpha; the update is scaled by alpha / r (default: %(default)s)")
    model.add_argument("--lora-dropout", type=probability, default=0.05, metavar="P",
                       help="dropout on the LoRA input (default: %(default)s)")
    model.add_argument("--target-modules", type=module_names, default=None, metavar="NAMES",
                       help="comma-separated module names to adapt (default: all linear layers but the output head)")
    training = parser.add_argument_group("training")
    training.add_argument("--lr", type=positive_float, default=2e-4, help="peak learning rate (default: %(default)s)")
    training.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                          help="examples per device per step (default: %(default)s)")
    training.add_argument("--grad-accum", type=positive_int, default=1, metavar="N",
                          help="micro-batches per optimizer step (default: %(default)s)")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=positive_int, default=None, metavar="N", help="optimizer steps to train")
    length.add_argument("--epochs", type=positive_float, default=1.0, metavar="E",
                        help="passes over the data (default: %(default)s)")
    training.add_argument("--seq-len", type=positive_int, default=512, metavar="N",
                          help="longest sequence in tokens; longer rows are cut (default: %(default)s)")
    training.add_argument("--seed", type=int, default=0,
                          help="seed for LoRA init, dropout and data order (default: %(default)s)")
    training.add_argument("--save-steps", type=positive_int, default=50, metavar="N",
                          help="save a checkpoint every N steps (default: %(default)s)")
    training.add_argument("--sample", action="append", default=[], metavar="PROMPT",
                          help="a prompt to complete before and after training (repeatable)")
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in the output folder from its last complete checkpoint")


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.finetune import FinetuneSettings, finetune
    from .console import RichObserver, render_finetune_report

    settings = FinetuneSettings(
        model=args.model, data=args.data, output=args.output, quantize=args.quantize, upcast=args.upcast,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps, epochs=args.epochs, seq_len=args.seq_len, seed=args.seed,
        save_steps=args.save_steps, resume=args.resume, overwrite=args.overwrite, samples=tuple(args.sample),
    )
    with RichObserver(console) as observer:
        report = finetune(settings, observer)
    if _is_main_process():
        render_finetune_report(console, report)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
