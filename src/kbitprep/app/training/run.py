"""QLoRA fine-tuning end to end: the library behind `kbitprep finetune` and `kbitprep demo`.

    model folder ──> load (nf4 | fp4 | int8 | none) ──> plan + prepare (kbitprep)
        ──> LoRA (peft) ──> train (transformers Trainer, checkpoints) ──> adapter,
        report.json, loss.png, written atomically into the run folder

Everything that can be checked before loading a model is checked first (options, the
model folder, every line of the data), so a typo costs seconds and writes nothing.
The run folder is managed by `kbitprep.app.runs.folder`: it is marked INCOMPLETE until the last
file is in place, checkpoints count only once their completeness marker is written, and
`resume=True` continues from the newest complete one.

A run is a `FinetuneRun`: one method per phase (claim → load → prepare → adapt → train →
report → save), each reading and setting the run's state on `self`, whatever executes it.
What differs between one process and several is its executor (`executor`): one process
or DDP under torchrun (`TrainerExecutor`: the transformers Trainer takes the steps), or
the base sharded across the processes with `--fsdp` (`sharded.ShardedExecutor`).
Only the main process writes the run folder's files.

Where a new feature goes: a different loss in `trainer.FinetuneTrainer.compute_loss`;
something to watch after every step as a TrainerCallback in `TrainerExecutor.callbacks`;
a figure for the report in `FinetuneRun.report`; a change to the data in `FinetuneRun.load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.runfile import write_run_file
from ..config.settings import FinetuneError, FinetuneSettings
from ..data.files import data_fingerprint, read_data
from ..data.packing import PackedData, check_packing, pack_examples
from ..data.rows import IGNORE_INDEX, Row
from ..data.tokenize import TokenizedData, check_token_ids, tokenize_rows
from ..distributed.processes import barrier, main_decides, start_processes
from ..memory.live_bytes import PeakMeter, measured_peak
from ..model.loading import (
    check_model_folder,
    error_summary,
    load_tokenizer,
    model_fingerprint,
    resolve_compute_dtype,
)
from ..model.lora import attach_lora, linear_layer_names
from ..model.quiet import without_log_notes
from ..runs.folder import (
    ADAPTER_DIR,
    LOSS_PLOT,
    REPORT,
    RUN_FILE,
    RUN_NAMES,
    RunFolder,
    atomic_directory,
    atomic_write_bytes,
    checkpoint_step,
    describe_owner,
    explain_write_failure,
)
from ..runs.plot import plot_loss
from ..runs.report import FinetuneReport, package_versions, read_report
from .divergence import check_finite_weights
from .executor import Executor, LossPlanLike, TrainerExecutor
from .observer import FinetuneObserver
from .sampling import batch_loss, first_batch, generate, pad_token_id

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from ...plan import PreparationPlan

__all__ = [
    "FinetuneError",
    "FinetuneObserver",
    "FinetuneReport",
    "FinetuneRun",
    "FinetuneSettings",
    "batch_loss",
    "check_chat_rows",
    "evaluation_rows",
    "finetune",
    "first_batch",
    "linear_layer_names",
    "plot_loss",
    "read_report",
    "run_pipeline",
]

# What the run read, recorded beside its settings in INCOMPLETE and checked on --resume.
_INPUT_KEYS = (("data_sha256", "DATA's content"), ("eval_data_sha256", "--eval-data's content"),
               ("chat_template_sha256", "--chat-template's content"), ("model_fingerprint", "the model folder's files"))


def finetune(settings: FinetuneSettings, observer: FinetuneObserver | None = None) -> FinetuneReport:
    """Fine-tune a local model with QLoRA on a JSONL file; write adapter, report and plot.

    Args:
        settings (FinetuneSettings): the run.
        observer (FinetuneObserver | None): receives progress (the CLI renders it). Default: None

    Returns:
        FinetuneReport: what the run did (also written to `<output>/report.json`).

    Raises:
        FinetuneError, ModelFolderError, DataError, RunFolderError: a problem that the
            message names; the run folder is left as it was, empty, or marked INCOMPLETE.

    Example:
        >>> report = finetune(FinetuneSettings("models/tiny", "train.jsonl", "runs/tiny", max_steps=100))
        >>> report.loss_drop
        0.62
    """
    settings.check()
    check_model_folder(settings.model)
    rows = read_data(settings.data, settings.data_format)
    rows, eval_rows = evaluation_rows(settings, rows)
    check_chat_rows(settings, rows)
    return run_pipeline(settings, rows, observer, eval_rows=eval_rows)


def evaluation_rows(settings: FinetuneSettings, rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    """(training rows, evaluation rows) as --eval-data or --eval-fraction say; no evaluation rows without either.

    Raises:
        DataError: the evaluation file is bad, holds rows of another kind than DATA, or
            DATA has too few rows to hold some out.
    """
    from ..data.rows import DataError
    from .evaluation import hold_out

    if settings.eval_fraction is not None:
        return hold_out(rows, settings.eval_fraction, settings.seed, settings.data)
    if settings.eval_data is None:
        return list(rows), []
    eval_rows = read_data(settings.eval_data, settings.data_format)
    if (eval_rows[0].kind == "messages") != (rows[0].kind == "messages"):
        raise DataError(f"{settings.eval_data}:{eval_rows[0].line}: --eval-data holds \"{eval_rows[0].kind}\" "
                        f"rows but DATA holds \"{rows[0].kind}\" rows; evaluate on rows of the kind you train on")
    return list(rows), eval_rows


def check_chat_rows(settings: FinetuneSettings, rows: Sequence[Row]) -> None:
    """Before anything is written: the --chat-template file reads, and chat rows have a template to render them.

    Raises:
        ChatTemplateError: naming the fix (`--chat-template FILE`).
    """
    from ..data.chat import check_chat_template, read_chat_template

    template = read_chat_template(settings.chat_template) if settings.chat_template else None
    if rows and rows[0].kind == "messages":
        tokenizer = load_tokenizer(settings.model)
        if template is not None:
            tokenizer.chat_template = template
        check_chat_template(tokenizer, settings.model, settings.chat_template)


def run_pipeline(
    settings: FinetuneSettings,
    rows: Sequence[Row],
    observer: FinetuneObserver | None = None,
    *,
    setup: Callable[[Path], object] | None = None,
    makes: tuple[str, ...] = (),
    eval_rows: Sequence[Row] = (),
) -> FinetuneReport:
    """The run after the cheap checks: claim the folder, then load, prepare, train, save.

    `setup(run_folder)` runs on the main process once the folder is marked INCOMPLETE and
    before the model is loaded; `makes` names what it writes there (the demo writes its
    base model, which is then the run's model: made by the run, not read from the user).
    `eval_rows` are evaluated during training (`finetune` makes them from --eval-data or
    --eval-fraction).
    """
    return FinetuneRun(settings, rows, observer, setup=setup, makes=makes, eval_rows=eval_rows).run()


def executor_for(settings: FinetuneSettings) -> Executor:
    """The executor the settings ask for: the base sharded across the processes with `--fsdp`, else the Trainer."""
    if settings.fsdp:
        from .sharded import ShardedExecutor

        return ShardedExecutor()
    return TrainerExecutor()


class FinetuneRun:
    """One fine-tuning run, phase by phase; `run()` calls the phases in order.

    Args:
        settings (FinetuneSettings): the run (checked here; paths made absolute).
        rows (Sequence[Row]): the training rows, already read.
        observer (FinetuneObserver | None): receives progress on the main process. Default: None
        setup (Callable[[Path], object] | None): runs on the main process once the folder is
            claimed, before loading. Default: None
        makes (tuple[str, ...]): the names `setup` writes into the run folder. Default: ()
        eval_rows (Sequence[Row]): rows to evaluate on during training, never trained. Default: ()
        executor (Executor | None): what places the model and takes the steps; None: the one
            the settings ask for (`executor_for`). Default: None

    Raises:
        FinetuneError, QuantizeConflictError, FsdpError: settings out of range, a --quantize
            the model folder contradicts, settings the executor cannot run; raised before the run
            folder is touched.
    """

    # The state the phases build, in the order they set it.
    args: TrainingArguments
    device: torch.device
    main: bool
    resume_from: Path | None
    tokenizer: Any
    data: TokenizedData
    train_data: TokenizedData | PackedData  # `data`, packed with --pack
    eval_data: TokenizedData | None
    model: Any  # a transformers causal LM; a peft PeftModel once adapted
    plan: PreparationPlan
    trainable: int
    total: int
    batch: dict[str, Any]
    loss_before: float
    loss_after: float
    samples: list[dict[str, str]]
    history: list[dict[str, float]]
    memory: dict[str, Any]  # predicted and measured peak
    evaluations: list[dict[str, float]]
    loss_plan: LossPlanLike
    peak: dict[str, Any]

    def __init__(self, settings: FinetuneSettings, rows: Sequence[Row], observer: FinetuneObserver | None = None,
                 *, setup: Callable[[Path], object] | None = None, makes: tuple[str, ...] = (),
                 eval_rows: Sequence[Row] = (), executor: Executor | None = None) -> None:
        self.executor = executor or executor_for(settings)
        settings.check()
        self.settings = settings.resolved()  # paths absolute, --quantize auto resolved against the model folder
        self.executor.check(self.settings)
        self.rows = rows
        self.eval_rows = eval_rows
        self.observer = observer or FinetuneObserver()
        self.setup = setup
        self.makes = makes
        self.folder = RunFolder(self.settings.output)
        self.timings: dict[str, float] = {}

    def run(self) -> FinetuneReport:
        """Claim the run folder, then load, prepare, adapt, train and save; clean up after a failure.

        The folder stays locked from the claim to the end, whatever happens.
        """
        state_before = self.claim()
        try:
            try:
                if self.main and self.setup is not None:
                    self.setup(self.folder.path)
                barrier()
                with without_log_notes("bnb-int8-cast"):
                    report = self.train_and_save()
            except BaseException as error:
                explained = explain_write_failure(error, self.folder)  # a full disk says so
                if self.main:
                    self.folder.abandon(explained, state_before)
                if explained is error:
                    raise
                raise explained from error
            barrier()
        finally:
            if self.main:
                self.folder.unlock()
        return report

    def train_and_save(self) -> FinetuneReport:
        """Every phase after the claim; the timings cover all but the writing of the files."""
        started = time.perf_counter()
        self.predict_memory()
        with self.timed("load_s"):
            self.load()
        with self.measured_memory():
            with self.timed("prepare_s"):
                if not self.executor.builds_while_loading:
                    self.build(self.model)
            self.measure_before()
            with self.timed("train_s"):
                self.train()
        self.measure_after()
        if self.main:
            self.timings["total_s"] = time.perf_counter() - started
        report = self.report()
        if self.main:
            self.save(report)
        return report

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the seconds the block takes as `timings[name]`."""
        started = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - started

    @contextlib.contextmanager
    def measured_memory(self) -> Iterator[None]:
        """Measure the peak of live tensor bytes over the block (from preparation to the end of training)."""
        meter = PeakMeter(self.model).start()
        try:
            yield
        finally:
            measured = meter.stop()
        self.memory = {**self.memory, "measured_peak_bytes": measured, "measured_by": meter.method}
        predicted = self.memory.get("predicted_peak_bytes")
        if predicted and measured:
            self.memory["error_percent"] = round(100 * (predicted - measured) / measured, 2)

    # --- the phases ----------------------------------------------------------------------

    def predict_memory(self) -> None:
        """The memory model's estimate of the run's peak, from config.json alone, before anything is loaded.

        The estimate is advice: a model it cannot size still trains, and report.json says why.
        """
        from ..memory.estimate import MemorySettings, estimate_memory

        try:  # the settings' device defaults to where this run trains
            estimate = estimate_memory(self.settings.model, MemorySettings.from_run(self.settings))
        except Exception as error:  # noqa: BLE001 - see the docstring
            self.memory = {"predicted": None, "why_not_predicted": error_summary(error)}
            return
        self.memory = {"predicted": estimate.to_dict(), "predicted_peak_bytes": estimate.total}

    def claim(self) -> str:
        """Start the processes; the main one locks the run folder, checks it and marks it INCOMPLETE.

        Returns:
            str: the folder's state before. Under torchrun every process gets the main
            one's answer (or its error), so all go on or all stop, with one lock taken.
        """
        from .trainer import training_arguments

        self.args = training_arguments(self.settings, self.folder.checkpoints_dir)
        self.device = start_processes(self.args)  # under torchrun: joins the process group, before any barrier
        self.main = self.args.process_index == 0
        if not self.main:
            self.observer = FinetuneObserver()  # only the main process reports progress
        return main_decides(self.main, self.claim_folder)

    def claim_folder(self) -> str:
        """Lock the folder, check that this run may use it (and may resume it), then mark it INCOMPLETE."""
        previous = self.folder.lock()
        try:
            made = {str(self.folder.path / name) for name in self.makes}
            reads = [path for path in (self.settings.model, self.settings.data, self.settings.eval_data)
                     if path and path not in made]
            writes = (*RUN_NAMES, *self.makes)
            state = self.folder.check_claim(overwrite=self.settings.overwrite, resume=self.settings.resume,
                                            inputs=reads, writes=writes)
            inputs = self.inputs_record(model_made_by_run=self.settings.model in made)
            if self.settings.resume and state == "incomplete":
                self.check_resume(inputs)
            self.folder.start(overwrite=self.settings.overwrite, settings={**self.settings.to_dict(), **inputs},
                              writes=writes)
            write_run_file(self.folder.path / RUN_FILE, self.settings)  # `--config DIR/run.yaml` repeats the run
        except BaseException:
            self.folder.unlock()
            raise
        if previous is not None:
            self.observer.on_message(f"the previous run in this folder ({describe_owner(previous)}) ended "
                                     "without finishing; its lock is taken over")
        return state

    def inputs_record(self, *, model_made_by_run: bool) -> dict[str, str]:
        """What identifies the run's inputs: the data files' hashes and the model folder's files."""
        record = {"data_sha256": data_fingerprint(self.settings.data)}
        for key, path in (("eval_data_sha256", self.settings.eval_data),
                          ("chat_template_sha256", self.settings.chat_template)):
            if path and Path(path).exists():  # a missing one is named by the phase that reads it
                record[key] = data_fingerprint(path)
        if not model_made_by_run:
            record["model_fingerprint"] = model_fingerprint(self.settings.model)
        return record

    def check_resume(self, inputs: dict[str, str]) -> None:
        """Refuse to resume with settings, data or model that differ from the unfinished run's."""
        recorded = self.folder.marker()["settings"]
        differ = self.settings.resume_differences(recorded)
        differ += [f"{what} changed since the run started" for key, what in _INPUT_KEYS
                   if key in recorded and key in inputs and recorded[key] != inputs[key]]
        if differ:
            raise FinetuneError(f"{self.folder.path}: --resume with settings that differ from the run's: "
                                f"{'; '.join(differ)}. Pass the run's settings and files, or --overwrite to start "
                                "again")

    def load(self) -> None:
        """Find the checkpoint to resume from, tokenize the rows, load the (quantized) model."""
        self.resume_from = self.resume_point() if self.settings.resume else None
        self.tokenizer = load_tokenizer(self.settings.model)
        if self.settings.chat_template:
            from ..data.chat import read_chat_template

            self.tokenizer.chat_template = read_chat_template(self.settings.chat_template)
        self.data = tokenize_rows(self.rows, self.tokenizer, self.settings.seq_len, source=self.settings.data)
        self.report_data_notes()
        self.train_data = self.data
        if self.settings.pack:
            self.train_data = pack_examples(self.data.examples, self.settings.seq_len, self.settings.batch_size)
        source = self.settings.eval_data or f"{self.settings.data} (held out)"
        self.eval_data = tokenize_rows(self.eval_rows, self.tokenizer, self.settings.seq_len, source=source) \
            if self.eval_rows else None
        vocab_size = configured_vocab_size(check_model_folder(self.settings.model))
        if vocab_size is not None:  # before loading: another model's tokenizer costs seconds, not a model load
            self.check_token_ids(vocab_size)
        self.load_model()

    def load_model(self) -> None:
        """The (quantized) model, placed by the executor; under --fsdp also prepared and adapted (`build`)."""
        self.model = self.executor.load_model(self)
        self.check_token_ids(self.model.get_input_embeddings().num_embeddings)

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse token ids (the padding id included) past the model's vocabulary."""
        for data in (self.data, self.eval_data):
            if data is not None:
                check_token_ids(data, vocab_size, tokenizer_source=self.settings.model,
                                pad_token_id=pad_token_id(self.tokenizer))

    def resume_point(self) -> Path | None:
        """The newest complete checkpoint, once checkpoints cut short while saving are removed."""
        if self.main:
            for path in self.folder.remove_incomplete_checkpoints():
                self.observer.on_message(f"removed {path.name}: it was cut short while saving")
        barrier()
        latest = self.folder.latest_checkpoint()
        self.observer.on_message(f"resuming from {latest.name}" if latest is not None
                                 else "no complete checkpoint to resume from: starting at step 0")
        return latest

    def report_data_notes(self) -> None:
        """Tell the observer about rows cut at --seq-len and rows skipped for having no completion token."""
        data, seq_len = self.data, self.settings.seq_len
        if data.truncated:
            self.observer.on_message(f"{data.truncated} row(s) longer than --seq-len {seq_len} were cut at its end")
        if data.dropped:
            shown = ", ".join(map(str, data.dropped[:5])) + (" ..." if len(data.dropped) > 5 else "")
            self.observer.on_message(f"{len(data.dropped)} row(s) had no completion token within --seq-len "
                                     f"and were skipped (lines {shown})")

    def build(self, model: Any) -> Any:
        """The prepare and adapt phases on `model`; returns the adapted model.

        Under --fsdp they run on rank 0's loaded model and on every process's meta skeleton,
        so that all build the same structure; a skeleton's build reports nothing, and the
        plan kept is the loaded model's where there is one.
        """
        skeleton = next(model.parameters()).device.type == "meta"
        reporting, kept = self.observer, self.__dict__.get("plan")
        if skeleton:
            self.observer = FinetuneObserver()
        try:
            self.model = model
            self.prepare()
            self.adapt()
        finally:
            self.observer = reporting
        if skeleton and kept is not None:
            self.plan = kept
        return self.model

    def prepare(self) -> None:
        """Plan the preparation as the executor trains (the observer sees the plan) and apply it."""
        from ...apply import apply_plan
        from ...errors import NotQuantizedWarning
        from ...plan import SLOW_HEAD_PRECISION

        self.plan = self.executor.plan_preparation(self.model, self.settings.upcast)
        if self.settings.loss == "chunked":  # the chunked loss computes the head in the device's fast precision
            self.plan = dataclasses.replace(self.plan, diagnostics=tuple(
                d for d in self.plan.diagnostics if d.code != SLOW_HEAD_PRECISION.code))
        self.observer.on_plan(self.plan)
        with warnings.catch_warnings():
            if self.settings.quantize == "none":  # asked for explicitly; the plan already says so
                warnings.simplefilter("ignore", NotQuantizedWarning)
            apply_plan(self.model, self.plan)
        if self.settings.pack:  # before any training: refuse a model whose packed rows would see each other
            check_packing(self.model, self.model.get_input_embeddings().num_embeddings)

    def adapt(self) -> None:
        """Attach LoRA with the run's seed (the initialisation is part of the seeded state); count parameters."""
        from transformers import set_seed

        set_seed(self.settings.seed)
        self.model = attach_lora(self.model, self.settings)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.observer.on_trainable(self.trainable, self.total)

    def measure_before(self) -> None:
        """The first batch's loss and the sample completions before training."""
        self.batch = first_batch(self.data, self.settings.batch_size, pad_token_id(self.tokenizer))
        self.loss_before = batch_loss(self.model, self.batch, self.settings.loss)
        generates = self.main or self.executor.every_process_generates
        self.samples = [{"prompt": prompt} for prompt in self.settings.samples] if generates else []
        self.complete_samples("before")

    def measure_after(self) -> None:
        """The same batch's loss and the sample completions after training."""
        self.loss_after = batch_loss(self.model, self.batch, self.settings.loss)
        self.complete_samples("after")

    def complete_samples(self, stage: str) -> None:
        """Greedy completions of the sample prompts, stored under `stage` (where the executor generates)."""
        for sample in self.samples:
            sample[stage] = generate(self.model, self.tokenizer, sample["prompt"], self.settings.max_new_tokens)
            self.observer.on_sample(stage, sample["prompt"], sample[stage])

    def train(self) -> None:
        """The executor takes the optimizer steps, from the resume checkpoint if there is one."""
        trained = self.executor.train(self)
        self.history, self.evaluations, self.loss_plan = trained.history, trained.evaluations, trained.loss_plan
        self.peak = measured_peak(self.device)

    def report(self) -> FinetuneReport:
        """What the run did, as report.json records it."""
        config = getattr(self.model, "config", None)
        return FinetuneReport(
            settings=self.settings.to_dict(),
            plan=self.plan.to_dict(),
            model={"architecture": (getattr(config, "architectures", None) or ["?"])[0],
                   "compute_dtype": self.compute_dtype_name(),
                   "trainable_parameters": self.trainable, "total_parameters": self.total,
                   **self.executor.report_model(self)},
            loss={**self.loss_plan.to_dict(), "measured_peak": self.peak},
            data=self.data_summary(),
            loss_history=self.history,
            eval_history=self.evaluations,
            batch_loss_before=self.loss_before,
            batch_loss_after=self.loss_after,
            samples=self.samples,
            resumed_from_step=checkpoint_step(self.resume_from) if self.resume_from is not None else None,
            world_size=self.args.world_size,
            timings=self.timings,
            versions=package_versions(),
            files={"adapter": str(self.folder.path / ADAPTER_DIR), "report": str(self.folder.path / REPORT),
                   "loss_plot": str(self.folder.path / LOSS_PLOT)},
            memory=self.memory,
        )

    def compute_dtype_name(self) -> str:
        """The dtype the quantized layers compute in (`--compute-dtype`, "auto" resolved)."""
        config = check_model_folder(self.settings.model)
        return str(resolve_compute_dtype(config, self.settings.compute_dtype, self.device)).removeprefix("torch.")

    def data_summary(self) -> dict[str, Any]:
        """Rows read, examples kept, rows cut or skipped, and the tokens trained on per epoch."""
        data = self.data
        trained = sum(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in data.examples)
        summary = {"file": self.settings.data, "rows": len(self.rows), "examples": len(data),
                   "truncated": data.truncated, "dropped_lines": list(data.dropped),
                   "trained_tokens_per_epoch": trained, "kind": self.rows[0].kind if self.rows else None}
        if isinstance(self.train_data, PackedData):
            summary["packing"] = self.train_data.summary()
        if self.eval_data is not None:
            summary["eval"] = {"file": self.settings.eval_data, "fraction": self.settings.eval_fraction,
                               "rows": len(self.eval_rows), "examples": len(self.eval_data)}
        return summary

    def save(self, report: FinetuneReport) -> None:
        """Adapter, loss plot, then report.json (the moment the run counts as finished), each atomically.

        An adapter holding a non-finite value is never written.
        """
        check_finite_weights(self.model, what="write the adapter", lr=self.settings.lr,
                             lora_alpha=self.settings.lora_alpha)
        path = self.folder.path
        with atomic_directory(path / ADAPTER_DIR) as staging:
            self.executor.save_adapter(self, staging)
        title = f"{Path(self.settings.model).name} · {self.settings.quantize} · LoRA r={self.settings.lora_r}"
        atomic_write_bytes(path / LOSS_PLOT, plot_loss(report.loss_history, title, report.eval_history))
        self.folder.finish(report.to_dict())
        self.observer.on_message(f"wrote {path / ADAPTER_DIR}, {path / REPORT}, {path / LOSS_PLOT}")


def configured_vocab_size(config: dict[str, Any]) -> int | None:
    """The vocabulary size config.json gives (its own, or its text model's); None if it gives none."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
