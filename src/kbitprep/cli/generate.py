"""`kbitprep generate RUN_DIR --prompt TEXT` (or `--chat`): what a run trained, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

HELP = "complete prompts, or chat, with a finished run's model (base + adapter) or a merged folder"


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "generate", help=HELP, description=HELP[0].upper() + HELP[1:] + ".",
        epilog="Tokens are printed as they are generated. A run folder's base is loaded as the run loaded it "
               "(its --quantize) with the adapter on top; a folder written by `kbitprep merge` loads as it is.",
    )
    parser.add_argument("run", metavar="RUN_DIR",
                        help="the --output folder of a finished `kbitprep finetune` run, or a `kbitprep merge` folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt to complete (repeatable)")
    what.add_argument("--chat", action="store_true",
                      help="a conversation: each line read from stdin is a user turn, rendered with the tokenizer's "
                           "chat template; ends at end of input or /exit")
    parser.add_argument("--max-new-tokens", type=_at_least_one, default=128, metavar="N",
                        help="at most N new tokens per completion or reply (default: %(default)s)")
    parser.add_argument("--temperature", type=_not_negative, default=0.0, metavar="T",
                        help="0 decodes greedily; above 0 samples at that temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (default: %(default)s)")
    return parser


def _at_least_one(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, not {text!r}")
    return value


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace, console: Console) -> int:
    from ..app.export.generate import chat, end_of_turn, load_generator

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    with console.status("loading the model"):
        generator = load_generator(args.run)
    if args.chat:
        end_of_turn(generator.tokenizer)  # no chat template: one line, before waiting for input
        chat(generator, sys.stdin, _write, **options)
        return 0
    for prompt in args.prompt:
        generator.complete(prompt, stream=_write, **options)
        _write("\n")
    return 0
