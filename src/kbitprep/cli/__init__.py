"""The `kbitprep` command: `inspect`, `preview`, `finetune`, `demo`, `merge`, `generate`: thin layers over the library.

Each command lives in its own module with `add_parser` (its options) and `run` (calls
the library, then renders the report it returns). `main` wires them together and turns
every known error into one line on stderr and a non-zero exit code; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..app.distributed.processes import from_main_process, one_of_several
from ..errors import KbitPrepError
from . import demo, finetune, generate, inspect, merge, preview
from .console import make_consoles, quiet_third_party

__all__ = ["build_parser", "main"]

COMMANDS = (inspect, preview, finetune, demo, merge, generate)
_EXIT_ERROR = 1
_EXIT_INTERRUPTED = 130


def _debug_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite `kbitprep --debug COMMAND`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (also: KBITPREP_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `kbitprep` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="kbitprep",
        description="Prepare quantized (4-/8-bit) models for LoRA fine-tuning, and run that fine-tuning end to end.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _debug_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        subparser = command.add_parser(commands)
        _debug_option(subparser)
        subparser.set_defaults(handler=command.run)
    return parser


def _one_line(error: BaseException) -> str:
    # An error listing several problems (PreparationError) hands them over one by one.
    listed = getattr(error, "lines", None)
    lines = listed() if callable(listed) else str(error).splitlines()
    return "; ".join(line.strip() for line in lines if line.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `kbitprep` with `argv` (default: the command line); return the exit code."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("KBITPREP_DEBUG", "") not in ("", "0")
    out, err = make_consoles()
    try:
        with quiet_third_party(err):
            return args.handler(args, out)
    except BrokenPipeError:  # `kbitprep inspect ... --json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        err.print("kbitprep: interrupted", markup=False, highlight=False)
        return _EXIT_INTERRUPTED
    except Exception as error:  # the one place where every error becomes a message
        if debug:
            raise
        # KbitPrepError: the input or the situation is wrong, and the message says how to fix it;
        # OSError: the file system refused (a full disk, a permission). Anything else is a bug.
        # Under torchrun an error the main process decided is shown by it alone; every other
        # failure is this process's own and is shown with its rank. One process shows all.
        launch = one_of_several()
        if launch is not None and launch.rank != 0 and from_main_process(error):
            return _EXIT_ERROR
        prefix = "kbitprep: error" + (f" (rank {launch.rank} of {launch.world_size})" if launch else "")
        if isinstance(error, (KbitPrepError, OSError)):
            message = f"{prefix}: {_one_line(error)}"
        else:
            message = (f"{prefix}: unexpected {type(error).__name__}: {_one_line(error)} "
                       "(run again with --debug for the traceback)")
        err.print(message, markup=False, highlight=False, soft_wrap=True)
        return _EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
