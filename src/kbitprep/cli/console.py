"""Rendering for the command line: rich consoles, live training progress, and report summaries.

Rendering only reads the report objects the library returns; it never computes results.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..app.model.quiet import without_log_notes
from ..app.training.observer import FinetuneObserver
from ..report import format_bytes, format_count

if TYPE_CHECKING:
    from ..app.data.preview import PreviewReport, PreviewRow
    from ..app.memory.estimate import MemoryReport
    from ..app.model.inspection import InspectReport
    from ..app.runs.report import FinetuneReport
    from ..plan import PreparationPlan

__all__ = ["RichObserver", "make_consoles", "quiet_third_party", "render_finetune_report", "render_inspect_report",
           "render_memory_report", "render_preview_report"]


def make_consoles() -> tuple[Console, Console]:
    """(stdout console, stderr console)."""
    return Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def quiet_third_party(err: Console) -> Iterator[None]:
    """While a command runs: no notes from other libraries that say nothing to a kbitprep user
    (bitsandbytes' missing-kernel note, transformers' loading progress bars), and
    kbitprep's own warnings as one yellow line each. Everything is restored afterwards."""
    from ..errors import KbitPrepWarning

    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KbitPrepWarning):
            err.print(f"warning: {message}", markup=False, highlight=False, style="yellow")
        else:
            default_show(message, category, filename, lineno, file, line)

    with without_log_notes("bnb-cpu-kernels"):  # before anything imports bitsandbytes
        import transformers

        progress_bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = default_show
            if progress_bars:
                transformers.utils.logging.enable_progress_bar()


def print_plan(console: Console, plan: PreparationPlan) -> None:
    console.print(str(plan), markup=False, highlight=False)


class RichObserver(FinetuneObserver):
    """Shows a run's progress: the plan, samples, and a progress bar with the current loss."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: Any = None

    def on_message(self, text: str) -> None:
        self.console.print(f"[dim]·[/] {text}", highlight=False)

    def on_plan(self, plan: PreparationPlan) -> None:
        print_plan(self.console, plan)

    def on_trainable(self, trainable: int, total: int) -> None:
        self.console.print(f"LoRA attached: {format_count(trainable)} trainable of {format_count(total)} parameters "
                           f"({100 * trainable / max(total, 1):.2f}%)", highlight=False)

    def on_sample(self, stage: str, prompt: str, completion: str) -> None:
        self.console.print(f"sample {stage:<6} training: ", end="", highlight=False)
        self.console.print(repr(prompt), style="bold", end="", markup=False, highlight=False)
        self.console.print(" -> ", end="")
        self.console.print(repr(completion), style="green" if stage == "after" else "", markup=False, highlight=False)

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        self.progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[eval]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", eval="")
        self.progress.start()

    def on_step(self, step: int, loss: float | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-")

    def on_eval(self, step: int, loss: float, perplexity: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, eval=f"eval {loss:.4f} (ppl {perplexity:.3g}, step {step})")

    def on_train_end(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> RichObserver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.on_train_end()  # a run that failed mid-training still hands the terminal back


def render_finetune_report(console: Console, report: FinetuneReport, title: str = "fine-tuning finished") -> None:
    """A short summary of a finished run."""
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    before, after = report.batch_loss_before, report.batch_loss_after
    table.add_row("loss (first batch)", f"{before:.4f} -> {after:.4f}  ({-100 * report.loss_drop:+.1f}%)")
    if report.loss_history:
        first, last = report.loss_history[0], report.loss_history[-1]
        table.add_row("training loss",
                      f"step {first['step']}: {first['loss']:.4f} -> step {last['step']}: {last['loss']:.4f}")
    if report.eval_history:
        first, last = report.eval_history[0], report.eval_history[-1]
        table.add_row("eval loss", f"step {first['step']}: {first['loss']:.4f} -> step {last['step']}: "
                                   f"{last['loss']:.4f} (perplexity {last['perplexity']:.4g})")
    packing = report.data.get("packing")
    if packing:
        table.add_row("packing", f"{packing['rows']} rows in {packing['packs']} sequences, "
                                 f"{packing['padding_tokens_saved']:,} padding tokens saved per epoch")
    steps = f"{report.steps}"
    if report.resumed_from_step is not None:
        steps += f" (resumed from step {report.resumed_from_step})"
    table.add_row("steps", steps + (f" on {report.world_size} processes" if report.world_size > 1 else ""))
    timings = report.timings
    table.add_row("time", f"{timings.get('total_s', 0):.1f} s (training {timings.get('train_s', 0):.1f} s)")
    table.add_row("adapter", report.files["adapter"])
    table.add_row("report", report.files["report"])
    table.add_row("loss plot", report.files["loss_plot"])
    console.print(table)


def _render_sharding(console: Console, report: InspectReport) -> None:
    """Bytes per process for each upcast policy, then each sharding diagnostic once, with its code."""
    table = Table(title=f"sharded over {report.devices} processes (finetune --fsdp)", title_justify="left")
    for column in ("upcast", "parameters, whole", "largest share per process", "share", "whole on each"):
        table.add_column(column, justify="left" if column == "upcast" else "right")
    for policy, by_wrapper in report.sharding.items():
        plan = by_wrapper["fsdp2"]
        table.add_row(policy, format_bytes(plan.parameter_bytes), format_bytes(plan.largest_share),
                      f"x{plan.ratio:.3f}", format_bytes(plan.replicated_bytes))
    console.print(table)
    seen: set[str] = set()
    for policy, by_wrapper in report.sharding.items():
        for wrapper, plan in by_wrapper.items():
            for diagnostic in plan.diagnostics:
                if diagnostic.message not in seen:
                    seen.add(diagnostic.message)
                    where = "kbitprep --fsdp" if wrapper == "fsdp2" else "flat-parameter FSDP (FSDP1)"
                    console.print(f"{diagnostic.severity} [{diagnostic.code}] ({policy}, {where}): "
                                  f"{diagnostic.message}",
                                  markup=False, highlight=False, style="yellow")


def render_inspect_report(console: Console, report: InspectReport) -> None:
    """One table row per upcast policy, then what all policies share."""
    source = "sized from config.json on the meta device, no weights loaded" if report.source == "meta" \
        else "weights loaded"
    saved = f" (saved quantized: {report.saved})" if report.saved else ""
    console.print(f"[bold]{report.model}[/]  {report.architecture}  quantize={report.quantize}{saved}  "
                  f"[dim]{source}; {report.seconds:.1f} s[/]", highlight=False)
    first = next(iter(report.plans.values()))
    console.print(f"backend: {first.quantization or 'not quantized'} ({first.detection.evidence})",
                  markup=False, highlight=False)
    console.print("parameters: " + ", ".join(f"{kind} {format_count(n)}" for kind, n in first.parameter_counts.items()),
                  highlight=False)
    table = Table(title_justify="left")
    table.add_column("upcast", justify="left")
    for column in ("casts", "added", "bytes before", "bytes after", "ratio"):
        table.add_column(column, justify="right")
    for policy, plan in report.plans.items():
        ratio = plan.bytes_after / plan.bytes_before if plan.bytes_before else 1.0
        table.add_row(policy, str(len(plan.casts)), "+" + format_bytes(plan.bytes_after - plan.bytes_before),
                      format_bytes(plan.bytes_before), format_bytes(plan.bytes_after), f"x{ratio:.3f}")
    console.print(table)
    if report.sharding:
        _render_sharding(console, report)
    ckpt = first.checkpointing
    console.print(f"checkpointing: {'on via ' + str(ckpt.method) if ckpt.enabled else 'off (' + ckpt.reason + ')'}",
                  markup=False, highlight=False)
    seen: set[str] = set()
    for policy, plan in report.plans.items():
        for label, messages in (("warning", plan.warnings), ("error", plan.errors)):
            for message in messages:
                if message not in seen:
                    seen.add(message)
                    console.print(f"{label} ({policy}): {message}", markup=False, highlight=False, style="yellow")


def _step_rows(settings: Any) -> str:
    """The batch as the step holds it: "2" rows, or for a preference method "2 pairs (4 rows), dpo"."""
    if settings.method == "sft":
        return str(settings.batch_size)
    return f"{settings.batch_size} pairs ({2 * settings.batch_size} rows, {settings.method})"


def render_memory_report(console: Console, report: MemoryReport) -> None:
    """A training step's predicted peak, part by part, and what fits a budget."""
    estimate, settings = report.estimate, report.estimate.settings
    console.print(
        f"\n[bold]training step memory[/]  batch {_step_rows(settings)} x {settings.seq_len} tokens, LoRA r="
        f"{settings.lora_r}, loss {settings.loss}, upcast {settings.upcast}, checkpointing "
        f"{'on' if settings.gradient_checkpointing else 'off'}, {settings.optim}, on {settings.device} "
        f"({estimate.compute_dtype})", highlight=False)
    table = Table(title_justify="left")
    table.add_column("component", justify="left")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    table.add_column("what", justify="left")
    for part in estimate.components:
        table.add_row(part.name, format_bytes(part.bytes), f"{100 * part.bytes / max(estimate.total, 1):.1f}%",
                      part.detail)
    table.add_row("[bold]peak[/]", f"[bold]{format_bytes(estimate.total)}[/]", "100%", f"at {estimate.peak_at}")
    console.print(table)
    fit = report.fit
    if fit is not None:
        verdict = "[green]fits[/]" if fit.fits else "[red]does not fit[/]"
        console.print(f"budget {format_bytes(fit.budget)}: {verdict}; largest batch size at {settings.seq_len} "
                      f"tokens: {_at_least(fit.largest_batch_size, fit.search_limit)}; longest sequence at batch "
                      f"{settings.batch_size}: {_at_least(fit.largest_seq_len, fit.search_limit)} tokens",
                      highlight=False)
    console.print("not counted: the CUDA context, allocator slack and kernel workspaces; leave the context "
                  "(about 0.5 GiB) and ~10% of the device free", style="dim", highlight=False)


def _at_least(value: int, limit: int) -> str:
    if value <= 0:
        return "none"
    return f"at least {value:,}" if value >= limit else f"{value:,}"


# Token boundaries show as alternating backgrounds; trained tokens are green, masked ones dim.
_TOKEN_STYLES = {True: ("bold green on grey15", "bold green on grey30"), False: ("dim on grey11", "dim on grey23")}
_VISIBLE = str.maketrans({"\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"})


def _row_text(row: PreviewRow, *, ids: bool, colour: bool) -> Text:
    """A row's tokens, each visibly apart: coloured backgrounds, or without colour [trained] and (masked)."""
    text = Text()
    for index, token in enumerate(row.tokens):
        shown = token.text.translate(_VISIBLE) + (f"\u2039{token.id}\u203a" if ids else "")
        if colour:
            text.append(shown, style=_TOKEN_STYLES[token.trained][index % 2])
        else:
            text.append(f"[{shown}]" if token.trained else f"({shown})")
        if "\n" in token.text:  # the row's own line breaks, after the token that holds them
            text.append("\n")
    text.rstrip()
    return text


def render_preview_report(console: Console, report: PreviewReport, *, ids: bool = False) -> None:
    """The rows shown, token by token, then the summary of the whole file and what the checks found."""
    colour = console.color_system is not None
    legend = "trained tokens green, masked dim" if colour else "[trained] (masked)"
    console.print(Text.assemble((report.data, "bold"), f"  {report.kind} rows, --seq-len {report.seq_len}"
                                f"{', --pack' if report.pack else ''}  ", (f"{report.model}; {legend}", "dim")))
    for row in report.rows:
        cut = f", cut at {len(row.tokens)} ({row.length - len(row.tokens)} lost)" if row.truncated else ""
        skipped = ", nothing trained: skipped" if row.dropped else ""
        console.print(f"\n[bold]line {row.line}[/]  {len(row.tokens)} tokens, {row.trained} trained{cut}{skipped}",
                      highlight=False)
        console.print(_row_text(row, ids=ids, colour=colour))
    summary = report.summary
    table = Table(title="\nthe whole file", show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("rows", f"{summary.rows:,} read, {summary.examples:,} trained on")
    share = 100 * summary.trained_tokens / max(summary.tokens, 1)
    table.add_row("tokens", f"{summary.tokens:,}, of which {summary.trained_tokens:,} trained ({share:.1f}%)")
    table.add_row("cut by --seq-len", f"{summary.truncated_rows:,} rows, {summary.tokens_lost:,} tokens lost")
    untrained = ", ".join(map(str, summary.untrained_rows[:5])) + (", ..." if len(summary.untrained_rows) > 5 else "")
    table.add_row("nothing trained", f"{len(summary.untrained_rows):,} rows" + (f" (lines {untrained}; skipped)"
                                                                              if untrained else ""))
    if summary.packing is not None:
        packing = summary.packing
        table.add_row("packing", f"{packing['rows']:,} rows in {packing['packs']:,} sequences, "
                                 f"{100 * packing['efficiency']:.1f}% of their tokens filled; "
                                 f"{packing['padding_tokens_saved']:,} padding tokens saved per epoch")
    console.print(table, highlight=False)
    for diagnostic in report.checks.diagnostics:
        console.print(f"{diagnostic.severity} [{diagnostic.code}]: {diagnostic.message}", markup=False,
                      highlight=False, style="red" if diagnostic.severity == "error" else "yellow")
    for note in report.checks.notes:
        console.print(f"note [{note.code}]: {note.message}", markup=False, highlight=False, style="dim")
    if not report.checks.diagnostics:
        console.print("template checks: nothing found", style="green", highlight=False)
