"""QLoRA fine-tuning end to end: the library behind `kbitprep finetune` and `kbitprep demo`.

    model folder ──> load (nf4 | fp4 | int8 | none) ──> plan + prepare (kbitprep)
        ──> LoRA (peft) ──> train (Trainer or the sharded loop, checkpoints) ──> adapter,
        report.json, loss.png, written atomically into the run folder

Everything that can be checked before loading a model is checked first (options, the
model folder, every line of the data), so a typo costs seconds and writes nothing.
The run folder is managed by `kbitprep.app.runs.folder`: it is marked INCOMPLETE until the last
file is in place, checkpoints count only once their completeness marker is written, and
`resume=True` continues from the newest complete one.

A run is a `FinetuneRun` over values: its inputs are read once (`inputs.RunRequest`, then
`inputs.RunInputs`), and each phase (claim → load → prepare → adapt → train → report →
save) takes the values the earlier ones returned and returns what it builds (`Session`,
`Built`, `Measured`, `Trained`, `FinetuneReport`); the run object holds none of them.
What differs between one process and several is its executor (`executor`): one process
or DDP under torchrun (`TrainerExecutor`: the transformers Trainer takes the steps), or
the base sharded across the processes with `--fsdp` (`sharded.ShardedExecutor`).
Only the main process writes the run folder's files.

Where a new feature goes: something to do after every step is a `hooks.StepHook` in
`step_hooks` (both step loops call it); a different loss in `kbitprep.loss`; a figure for
the report in `FinetuneRun.report`; a change to the data in `inputs.read_inputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...loss.preference import method_strength
from ..config.runfile import write_run_file
from ..config.settings import FinetuneError, FinetuneSettings
from ..data.files import data_fingerprint, read_data
from ..data.packing import PackedData, check_packing
from ..data.rows import IGNORE_INDEX, Row
from ..distributed.processes import barrier, main_decides, start_processes
from ..memory.live_bytes import PeakMeter, measured_peak
from ..model.loading import error_summary, model_fingerprint, resolve_compute_dtype
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
from ..runs.report import FinetuneReport, loss_history, package_versions, read_report
from .divergence import DivergenceGuard, check_finite_weights
from .evaluation import Evaluation, eval_history
from .executor import Built, Executor, Session, Trained, TrainerExecutor
from .hooks import CheckpointMarker, Progress, StepHook, StepHooks
from .inputs import (
    RunInputs,
    RunRequest,
    check_chat_rows,
    check_positions,
    check_vocabulary,
    evaluation_rows,
    read_inputs,
    resolve_settings,
)
from .observer import FinetuneObserver
from .sampling import batch_loss, first_batch, generate
from .tensorboard_log import open_tensorboard

if TYPE_CHECKING:
    from ...loss import LossPlan
    from ...plan import PreparationPlan

__all__ = [
    "FinetuneError",
    "FinetuneObserver",
    "FinetuneReport",
    "FinetuneRun",
    "FinetuneSettings",
    "Measured",
    "RunInputs",
    "RunRequest",
    "batch_loss",
    "check_chat_rows",
    "evaluation_rows",
    "finetune",
    "first_batch",
    "linear_layer_names",
    "plot_loss",
    "read_report",
    "run_pipeline",
    "step_hooks",
]

# What the run read, recorded beside its settings in INCOMPLETE and checked on --resume.
_INPUT_KEYS = (("data_sha256", "DATA's content"), ("eval_data_sha256", "--eval-data's content"),
               ("chat_template_sha256", "--chat-template's content"), ("model_fingerprint", "the model folder's files"))


def finetune(settings: FinetuneSettings, observer: FinetuneObserver | None = None) -> FinetuneReport:
    """Fine-tune a local model with QLoRA on a data file; write adapter, report and plot.

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
    resolved, config = resolve_settings(settings)
    rows = read_data(resolved.data, resolved.data_format)
    rows, eval_rows = evaluation_rows(resolved, rows)
    request = RunRequest(resolved, tuple(rows), tuple(eval_rows), config)
    return FinetuneRun(request, observer, inputs=read_inputs(request)).run()


def run_pipeline(
    settings: FinetuneSettings,
    rows: Sequence[Row],
    observer: FinetuneObserver | None = None,
    *,
    setup: Callable[[Path], object] | None = None,
    makes: tuple[str, ...] = (),
    eval_rows: Sequence[Row] = (),
) -> FinetuneReport:
    """The run after the rows are read: claim the folder, then load, prepare, train, save.

    `setup(run_folder)` runs on the main process once the folder is marked INCOMPLETE and
    before the model is read; `makes` names what it writes there (the demo writes its
    base model, which is then the run's model: made by the run, not read from the user).
    `eval_rows` are evaluated during training (`finetune` makes them from --eval-data or
    --eval-fraction).
    """
    resolved, config = resolve_settings(settings, model_made_by_run=setup is not None)
    request = RunRequest(resolved, tuple(rows), tuple(eval_rows), config)
    inputs = read_inputs(request) if setup is None else None
    return FinetuneRun(request, observer, inputs=inputs, setup=setup, makes=makes).run()


def executor_for(settings: FinetuneSettings) -> Executor:
    """The executor the settings ask for: the base sharded across the processes with `--fsdp`, else the Trainer."""
    if settings.fsdp:
        from .sharded import ShardedExecutor

        return ShardedExecutor()
    return TrainerExecutor()


def step_hooks(inputs: RunInputs, session: Session, memory: dict[str, Any]) -> StepHooks:
    """The run's step hooks, in the order they must run (both step loops call them; see `hooks`).

    The divergence guard comes first: it stops a step with a non-finite loss, gradient norm
    or weight before anything records it. The evaluation comes before the progress and the
    TensorBoard log, which report what it adds, and all of them before the checkpoint marker.
    """
    settings = inputs.settings
    hooks: list[StepHook] = [DivergenceGuard(settings.lr, settings.lora_alpha)]
    if inputs.eval_data is not None:
        hooks.append(Evaluation(inputs.eval_data, settings.batch_size, inputs.pad_token_id, settings.eval_steps,
                                loss=settings.loss, method=settings.method,
                                strength=method_strength(settings.method, settings)))
    hooks.append(Progress(session.observer))
    board = open_tensorboard(settings, session.folder.path, session.device, memory, session.main)  # --report-to
    if board is not None:
        hooks.append(board)
    hooks.append(CheckpointMarker(session.folder))
    return StepHooks(hooks)


@dataclasses.dataclass(frozen=True)
class Measured:
    """The first batch's loss and the sample completions, before or after training."""

    loss: float
    samples: tuple[tuple[str, str], ...]  # (prompt, completion)


class FinetuneRun:
    """One fine-tuning run over values read once; `run()` calls the phases in order.

    Args:
        request (RunRequest): the settings (checked, resolved) and the rows.
        observer (FinetuneObserver | None): receives progress on the main process. Default: None
        inputs (RunInputs | None): the model's config and tokenizer and the tokenized rows;
            None: read once `setup` has made the model. Default: None
        setup (Callable[[Path], object] | None): runs on the main process once the folder is
            claimed, before the model is read. Default: None
        makes (tuple[str, ...]): the names `setup` writes into the run folder. Default: ()
        executor (Executor | None): what places the model and takes the steps; None: the one
            the settings ask for (`executor_for`). Default: None

    Raises:
        FsdpError: the executor cannot start here (--fsdp without torchrun); raised before
            the run folder is touched.
    """

    def __init__(self, request: RunRequest, observer: FinetuneObserver | None = None, *,
                 inputs: RunInputs | None = None, setup: Callable[[Path], object] | None = None,
                 makes: tuple[str, ...] = (), executor: Executor | None = None) -> None:
        self.request = request
        self.settings = request.settings
        self.inputs = inputs
        self.executor = executor or executor_for(self.settings)
        self.executor.check(self.settings)
        self.observer = observer or FinetuneObserver()
        self.setup = setup
        self.makes = makes
        self.folder = RunFolder(self.settings.output)
        self.warned: set[str] = set()  # codes of the plan's warnings shown before loading (`warn_before_loading`)

    def run(self) -> FinetuneReport:
        """Claim the run folder, then load, prepare, adapt, train and save; clean up after a failure.

        The folder stays locked from the claim to the end, whatever happens.
        """
        session, state_before = self.claim()
        try:
            try:
                if session.main and self.setup is not None:
                    self.setup(self.folder.path)
                barrier()
                inputs = self.inputs if self.inputs is not None else read_inputs(self.request)
                with without_log_notes("bnb-int8-cast"):
                    report = self.train_and_save(inputs, self.resumed(session))
            except BaseException as error:
                explained = explain_write_failure(error, self.folder)  # a full disk says so
                if session.main:
                    self.folder.abandon(explained, state_before)
                if explained is error:
                    raise
                raise explained from error
            barrier()
        finally:
            if session.main:
                self.folder.unlock()
        return report

    def train_and_save(self, inputs: RunInputs, session: Session) -> FinetuneReport:
        """Every phase after the claim; the timings cover all but the writing of the files."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if session.main:
            report_checks(inputs, session.observer)
        memory = self.predict_memory(inputs, warn=session.main)
        with timed(timings, "load_s"):
            built = self.executor.load(inputs, session, functools.partial(self.build, inputs, session))
        timings["prepare_s"] = built.prepare_s
        meter = PeakMeter(built.model).start()  # from the prepared model to the end of training
        try:
            batch = first_batch(inputs.data, self.settings.batch_size, inputs.pad_token_id)
            before = self.measure(built.model, inputs, session, batch, "before")
            loss_plan = self.plan_loss(built.model, session)
            with timed(timings, "train_s"):
                trained = self.executor.train(built.model, inputs, session, step_hooks(inputs, session, memory))
            peak = measured_peak(session.device)
        finally:
            measured = meter.stop()
        memory = measured_memory(memory, measured, meter.method)
        after = self.measure(built.model, inputs, session, batch, "after")
        if session.main:
            timings["total_s"] = time.perf_counter() - started
        report = self.report(inputs, session, built, trained, loss_plan, before, after, memory, peak, timings)
        if session.main:
            self.save(built, trained, report)
        return report

    # --- the phases ----------------------------------------------------------------------

    def predict_memory(self, inputs: RunInputs, *, warn: bool = True) -> dict[str, Any]:
        """The memory model's estimate of the run's peak, from config.json alone, before anything is loaded.

        The estimate is advice: a model it cannot size still trains, and report.json says why.
        Unpacked rows are padded to the longest in their batch, so the step is sized at the data's
        longest row (at most --seq-len); packed rows are all --seq-len long.
        """
        from ..data.tokenize import longest_row
        from ..memory.estimate import MemorySettings, TrainingSkeleton

        train = inputs.train_data
        longest = self.settings.seq_len if isinstance(train, PackedData) else longest_row(train)
        seq_len = max(2, min(self.settings.seq_len, longest or self.settings.seq_len))
        try:  # the settings' device defaults to where this run trains
            skeleton = TrainingSkeleton(inputs.config, MemorySettings.from_run(self.settings, seq_len=seq_len))
            if warn:
                self.warn_before_loading(skeleton.plan)
            estimate = skeleton.estimate()
        except Exception as error:  # noqa: BLE001 - see the docstring
            return {"predicted": None, "why_not_predicted": error_summary(error)}
        return {"predicted": estimate.to_dict(), "predicted_peak_bytes": estimate.total}

    def warn_before_loading(self, plan: PreparationPlan) -> None:
        """The plan's warnings about what loading will cost, from the model sized on meta: shown before the
        weights load (which may not fit), and not again when the real model is prepared."""
        from ...plan import WEIGHTS_NOT_QUANTIZED

        for diagnostic in plan.diagnostics:
            if diagnostic.code == WEIGHTS_NOT_QUANTIZED.code and diagnostic.code not in self.warned:
                self.warned.add(diagnostic.code)
                warnings.warn(diagnostic.as_warning(), stacklevel=2)

    def claim(self) -> tuple[Session, str]:
        """Start the processes; the main one locks the run folder, checks it and marks it INCOMPLETE.

        Returns:
            tuple[Session, str]: this process's session, and the folder's state before. Under
            torchrun every process gets the main one's answer (or its error), so all go on or
            all stop, with one lock taken.
        """
        from .trainer import training_arguments

        args = training_arguments(self.settings, self.folder.checkpoints_dir)
        device = start_processes(args)  # under torchrun: joins the process group, before any barrier
        main = args.process_index == 0
        observer = self.observer if main else FinetuneObserver()  # only the main process reports progress
        session = Session(args=args, device=device, main=main, folder=self.folder, observer=observer)
        return session, main_decides(main, functools.partial(self.claim_folder, observer))

    def claim_folder(self, observer: FinetuneObserver) -> str:
        """Lock the folder, check that this run may use it (and may resume it), then mark it INCOMPLETE."""
        previous = self.folder.lock()
        try:
            made = {str(self.folder.path / name) for name in self.makes}
            reads = [path for path in (self.settings.model, self.settings.data, self.settings.eval_data)
                     if path and path not in made]
            writes = (*RUN_NAMES, *self.makes)
            state = self.folder.check_claim(overwrite=self.settings.overwrite, resume=self.settings.resume,
                                            inputs=reads, writes=writes)
            inputs = self.inputs_record()
            if self.settings.resume and state == "incomplete":
                self.check_resume(inputs)
            self.folder.start(overwrite=self.settings.overwrite, settings={**self.settings.to_dict(), **inputs},
                              writes=writes)
            # `--config DIR/run.yaml` repeats the run
            write_run_file(self.folder.path / RUN_FILE, self.settings, self.request.config)
        except BaseException:
            self.folder.unlock()
            raise
        if previous is not None:
            observer.on_message(f"the previous run in this folder ({describe_owner(previous)}) ended "
                                "without finishing; its lock is taken over")
        return state

    def inputs_record(self) -> dict[str, str]:
        """What identifies the run's inputs: the data files' hashes and the model folder's files."""
        record = {"data_sha256": data_fingerprint(self.settings.data)}
        for key, path in (("eval_data_sha256", self.settings.eval_data),
                          ("chat_template_sha256", self.settings.chat_template)):
            if path and Path(path).exists():  # a missing one is named by the phase that reads it
                record[key] = data_fingerprint(path)
        if self.request.config is not None:  # a model the run makes itself is not the user's to compare
            record["model_fingerprint"] = model_fingerprint(self.settings.model, self.request.config)
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

    def resumed(self, session: Session) -> Session:
        """The session with the checkpoint to resume from (`--resume`), once checkpoints cut short are removed."""
        if not self.settings.resume:
            return session
        if session.main:
            for path in self.folder.remove_incomplete_checkpoints():
                session.observer.on_message(f"removed {path.name}: it was cut short while saving")
        barrier()
        latest = self.folder.latest_checkpoint()
        session.observer.on_message(f"resuming from {latest.name}" if latest is not None
                                    else "no complete checkpoint to resume from: starting at step 0")
        return dataclasses.replace(session, resume_from=latest)

    def build(self, inputs: RunInputs, session: Session, model: Any) -> Built:
        """The prepare and adapt phases on a loaded `model` (or, under --fsdp, a meta skeleton).

        A skeleton's build reports nothing: rank 0's loaded model reports the plan.
        """
        started = time.perf_counter()
        skeleton = next(model.parameters()).device.type == "meta"
        observer = FinetuneObserver() if skeleton else session.observer
        vocab_size = model.get_input_embeddings().num_embeddings
        if not skeleton:
            check_vocabulary(inputs, vocab_size)
            check_positions(inputs, model)
        model, plan = self.prepare(model, observer, check_packs=not skeleton)
        model, trainable, total = self.adapt(model, observer)
        return Built(model, plan, trainable, total, prepare_s=time.perf_counter() - started)

    def prepare(self, model: Any, observer: FinetuneObserver, *, check_packs: bool) -> tuple[Any, PreparationPlan]:
        """Plan the preparation as the executor trains (the observer sees the plan) and apply it."""
        from ...apply import apply_plan
        from ...errors import NotQuantizedWarning
        from ...plan import SLOW_HEAD_PRECISION

        plan = self.executor.plan_preparation(model, self.settings.upcast)
        # The chunked loss computes the head in the device's fast precision; some were shown before loading.
        shown = self.warned | ({SLOW_HEAD_PRECISION.code} if self.settings.loss == "chunked" else set())
        plan = dataclasses.replace(plan, diagnostics=tuple(d for d in plan.diagnostics if d.code not in shown))
        observer.on_plan(plan)
        with warnings.catch_warnings():
            if self.settings.quantize == "none":  # asked for explicitly; the plan already says so
                warnings.simplefilter("ignore", NotQuantizedWarning)
            apply_plan(model, plan)
        if self.settings.pack and check_packs:  # before any training: refuse a model whose packed rows see each other
            check_packing(model, model.get_input_embeddings().num_embeddings)
        return model, plan

    def adapt(self, model: Any, observer: FinetuneObserver) -> tuple[Any, int, int]:
        """Attach LoRA with the run's seed (the initialisation is part of the seeded state); count parameters."""
        from transformers import set_seed

        set_seed(self.settings.seed)
        model = attach_lora(model, self.settings)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        observer.on_trainable(trainable, total)
        return model, trainable, total

    def plan_loss(self, model: Any, session: Session) -> LossPlan:
        """The loss the steps will compute (on every process: its first call probes the model with a forward);
        the observer hears when the chunked loss was asked for but the head cannot be split."""
        from ...loss import plan_loss

        loss_plan = plan_loss(model, self.settings.loss)
        if loss_plan.reason:
            session.observer.on_message(f"--loss chunked: using the full loss instead, as {loss_plan.reason}")
        return loss_plan

    def measure(self, model: Any, inputs: RunInputs, session: Session, batch: dict[str, Any],
                stage: str) -> Measured:
        """The first batch's loss and the sample completions (where the executor generates), at `stage`."""
        loss = batch_loss(model, batch, self.settings.loss)
        samples = []
        if session.main or self.executor.every_process_generates:
            for prompt in self.settings.samples:
                completion = generate(model, inputs.tokenizer, prompt, self.settings.max_new_tokens)
                session.observer.on_sample(stage, prompt, completion)
                samples.append((prompt, completion))
        return Measured(loss, tuple(samples))

    def report(self, inputs: RunInputs, session: Session, built: Built, trained: Trained, loss_plan: LossPlan,
               before: Measured, after: Measured, memory: dict[str, Any], peak: dict[str, Any],
               timings: dict[str, float]) -> FinetuneReport:
        """What the run did, as report.json records it."""
        config = getattr(built.model, "config", None)
        compute = resolve_compute_dtype(inputs.config, self.settings.compute_dtype, session.device)
        return FinetuneReport(
            settings=self.settings.to_dict(),
            plan=built.plan.to_dict(),
            model={"architecture": (getattr(config, "architectures", None) or ["?"])[0],
                   "compute_dtype": str(compute).removeprefix("torch."),
                   "trainable_parameters": built.trainable, "total_parameters": built.total, **built.placement},
            loss={**loss_plan.to_dict(), "measured_peak": peak},
            data=data_summary(inputs),
            loss_history=loss_history(trained.log),
            eval_history=eval_history(trained.log),
            batch_loss_before=before.loss,
            batch_loss_after=after.loss,
            samples=[{"prompt": prompt, "before": first, "after": second}
                     for (prompt, first), (_, second) in zip(before.samples, after.samples, strict=True)],
            resumed_from_step=checkpoint_step(session.resume_from) if session.resume_from is not None else None,
            world_size=session.args.world_size,
            timings=timings,
            versions=package_versions(),
            files={"adapter": str(self.folder.path / ADAPTER_DIR), "report": str(self.folder.path / REPORT),
                   "loss_plot": str(self.folder.path / LOSS_PLOT)},
            memory=memory,
        )

    def save(self, built: Built, trained: Trained, report: FinetuneReport) -> None:
        """Adapter, loss plot, then report.json (the moment the run counts as finished), each atomically.

        An adapter holding a non-finite value is never written.
        """
        check_finite_weights(built.model, what="write the adapter", lr=self.settings.lr,
                             lora_alpha=self.settings.lora_alpha)
        path = self.folder.path
        with atomic_directory(path / ADAPTER_DIR) as staging:
            self.executor.save_adapter(built.model, trained, staging)
        title = f"{Path(self.settings.model).name} · {self.settings.quantize} · LoRA r={self.settings.lora_r}"
        atomic_write_bytes(path / LOSS_PLOT, plot_loss(report.loss_history, title, report.eval_history))
        self.folder.finish(report.to_dict())
        self.observer.on_message(f"wrote {path / ADAPTER_DIR}, {path / REPORT}, {path / LOSS_PLOT}")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the block takes as `timings[name]`."""
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def measured_memory(memory: dict[str, Any], measured: int | None, method: str) -> dict[str, Any]:
    """The memory record with the measured peak beside the prediction, and the prediction's error in percent."""
    memory = {**memory, "measured_peak_bytes": measured, "measured_by": method}
    predicted = memory.get("predicted_peak_bytes")
    if predicted and measured:
        memory["error_percent"] = round(100 * (predicted - measured) / measured, 2)
    return memory


def report_checks(inputs: RunInputs, observer: FinetuneObserver) -> None:
    """The template checks' warnings as warnings (each with its `.code`), their notes as messages."""
    for diagnostic in inputs.checks.warnings:
        warnings.warn(diagnostic.as_warning(), stacklevel=2)
    for note in inputs.checks.notes:
        observer.on_message(note.message)


def data_summary(inputs: RunInputs) -> dict[str, Any]:
    """Rows read, examples kept, rows cut or skipped, and the tokens trained on per epoch."""
    data, settings, request = inputs.data, inputs.settings, inputs.request
    trained = sum(sum(label != IGNORE_INDEX for label in example["labels"][1:]) for example in data.examples)
    summary = {"file": settings.data, "rows": len(request.rows), "examples": len(data),
               "truncated": data.truncated, "dropped_lines": list(data.dropped),
               "trained_tokens_per_epoch": trained, "kind": request.rows[0].kind if request.rows else None,
               "preference": bool(request.rows) and request.rows[0].preference}
    summary["template_checks"] = inputs.checks.to_dict()
    if isinstance(inputs.train_data, PackedData):
        summary["packing"] = inputs.train_data.summary()
    if inputs.eval_data is not None:
        summary["eval"] = {"file": settings.eval_data, "fraction": settings.eval_fraction,
                           "rows": len(request.eval_rows), "examples": len(inputs.eval_data)}
    return summary
