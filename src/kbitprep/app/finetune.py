"""QLoRA fine-tuning end to end: the library behind `kbitprep finetune` and `kbitprep demo`.

    model folder ──> load (nf4 | fp4 | int8 | none) ──> plan + prepare (kbitprep)
        ──> LoRA (peft) ──> train (transformers Trainer, checkpoints) ──> adapter,
        report.json, loss.png, written atomically into the run folder

Everything that can be checked before loading a model is checked first (options, the
model folder, every line of the data), so a typo costs seconds and writes nothing.
The run folder is managed by `kbitprep.app.outputs`: it is marked INCOMPLETE until the last
file is in place, checkpoints count only once their completeness marker is written, and
`resume=True` continues from the newest complete one.

The same code runs as one process or under `torchrun --nproc_per_node N` (DDP): the
Trainer does the distribution, and only the main process writes the run folder's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import IGNORE_INDEX, CausalLMCollator, Row, TokenizedData, read_jsonl, tokenize_rows
from .loading import check_model_folder, compute_dtype, error_summary, load_quantized_model, load_tokenizer
from .outputs import (ADAPTER_DIR, LOSS_PLOT, REPORT, RunFolder, atomic_directory, atomic_write_bytes,
                      checkpoint_step)
from .quiet import without_log_notes
from .settings import FinetuneError, FinetuneSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..plan import PreparationPlan

__all__ = [
    "FinetuneError",
    "FinetuneObserver",
    "FinetuneReport",
    "FinetuneSettings",
    "batch_loss",
    "finetune",
    "first_batch",
    "plot_loss",
    "read_report",
    "run_pipeline",
]

@dataclasses.dataclass(frozen=True)
class FinetuneReport:
    """What a finished run did: written as report.json and rendered by the CLI.

    Args:
        settings (dict): the run's settings.
        plan (dict): kbitprep's preparation plan (`PreparationPlan.to_dict()`).
        model (dict): architecture, compute dtype, parameter counts.
        data (dict): rows read, examples kept, rows truncated or dropped.
        loss_history (list[dict]): one entry per optimizer step: step, loss, learning_rate.
        batch_loss_before (float): loss on the first batch (file order) before training.
        batch_loss_after (float): the same batch after training; the saved adapter reproduces it.
        samples (list[dict]): prompt, completion before, completion after.
        resumed_from_step (int | None): the checkpoint step the run continued from.
        world_size (int): number of training processes.
        timings (dict[str, float]): seconds per phase.
        versions (dict[str, str]): package versions.
        files (dict[str, str]): the run's output files.
    """

    settings: dict[str, Any]
    plan: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    loss_history: list[dict[str, float]]
    batch_loss_before: float
    batch_loss_after: float
    samples: list[dict[str, str]]
    resumed_from_step: int | None
    world_size: int
    timings: dict[str, float]
    versions: dict[str, str]
    files: dict[str, str]

    @property
    def loss_drop(self) -> float:
        """Fractional fall of the first batch's loss: 0.4 means 40% lower after training."""
        return 1.0 - self.batch_loss_after / self.batch_loss_before if self.batch_loss_before else 0.0

    @property
    def steps(self) -> int:
        return int(self.loss_history[-1]["step"]) if self.loss_history else 0

    def to_dict(self) -> dict[str, Any]:
        return {"status": "finished", **dataclasses.asdict(self), "loss_drop": self.loss_drop, "steps": self.steps}


class FinetuneObserver:
    """Receives a run's progress on the main process; the CLI renders it. Every method is optional."""

    def on_message(self, text: str) -> None:
        """A line of news: resuming, settings chosen, files written."""

    def on_plan(self, plan: PreparationPlan) -> None:
        """The preparation plan, before it is applied."""

    def on_trainable(self, trainable: int, total: int) -> None:
        """Parameter counts once LoRA is attached."""

    def on_sample(self, stage: str, prompt: str, completion: str) -> None:
        """A greedy completion of a sample prompt; stage is "before" or "after"."""

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        """Training starts (at `start_step` when resumed)."""

    def on_step(self, step: int, loss: float | None) -> None:
        """An optimizer step finished; `loss` is its logged loss."""

    def on_train_end(self) -> None:
        """Training finished."""


# --- evaluation helpers ----------------------------------------------------------------


def first_batch(data: TokenizedData, batch_size: int, pad_token_id: int) -> dict[str, Any]:
    """The first `batch_size` examples in file order, collated: the batch the report's losses are measured on."""
    return CausalLMCollator(pad_token_id)(data.examples[:batch_size])


def batch_loss(model: nn.Module, batch: dict[str, Any]) -> float:
    """The model's loss on one batch in evaluation mode, without gradients."""
    import torch

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(model(**{key: value.to(device) for key, value in batch.items()}).loss)
    finally:
        model.train(was_training)


def _generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    import torch

    device = next(p.device for p in model.parameters())
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=_pad_id(tokenizer), use_cache=True)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# --- the run ---------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("kbitprep", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def linear_layer_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (bitsandbytes ones included), without the output head.

    The default LoRA targets. Naming them, rather than asking peft for "all-linear", keeps
    peft from also wrapping the fused expert parameters of mixture-of-experts models, which
    its parameter wrapper trains only without dropout.
    """
    from torch import nn as torch_nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch_nn.Linear, Conv1D)) and module is not head})


def _attach_lora(model: nn.Module, settings: FinetuneSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    linear = linear_layer_names(model)
    config = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout, bias="none",
        target_modules=list(settings.target_modules or linear), task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft's get_peft_model reads the deprecated `is_gradient_checkpointing` property
            # (peft's bug, not ours); transformers answers with exactly this FutureWarning.
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        raise FinetuneError(f"--target-modules: {error_summary(error)}; the model's linear layers are "
                            f"{', '.join(linear) or 'none'}") from None


def _training_arguments(settings: FinetuneSettings, output_dir: Path):
    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,  # kbitprep prunes checkpoints itself, only once a newer one is complete
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
    )
    assert args.device is not None  # sets up the device and, under torchrun, the process group, before any barrier
    return args


def _trainer_callback(folder: RunFolder, observer: FinetuneObserver):
    """A TrainerCallback that marks complete checkpoints and forwards progress to the observer."""
    from transformers import TrainerCallback

    class _RunCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                observer.on_train_begin(state.max_steps, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                observer.on_step(state.global_step, float(logs["loss"]))

        def on_save(self, args, state, control, **kwargs):
            # Every process has written its part of the checkpoint (its RNG state) before
            # the main process declares the checkpoint complete.
            _barrier()
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                folder.mark_checkpoint_complete(checkpoint, state.global_step)
            _barrier()

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                observer.on_train_end()

    return _RunCallback()


def _loss_history(log_history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    history: dict[int, dict[str, float]] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            history[int(entry["step"])] = {"step": int(entry["step"]), "loss": float(entry["loss"]),
                                           "learning_rate": float(entry.get("learning_rate", 0.0))}
    return [history[step] for step in sorted(history)]


def plot_loss(history: Sequence[dict[str, float]], title: str) -> bytes:
    """The loss curve as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _check_resume(folder: RunFolder, settings: FinetuneSettings) -> None:
    differ = settings.resume_differences(folder.marker().get("settings", {}))
    if differ:
        raise FinetuneError(f"{folder.path}: --resume with settings that differ from the run's: {'; '.join(differ)}. "
                            "Pass the run's settings, or --overwrite to start again")


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
    rows = read_jsonl(settings.data)
    return run_pipeline(settings, rows, observer)


def run_pipeline(
    settings: FinetuneSettings,
    rows: Sequence[Row],
    observer: FinetuneObserver | None = None,
    *,
    setup: Callable[[Path], None] | None = None,
) -> FinetuneReport:
    """The run after the cheap checks: claim the folder, then load, prepare, train, save.

    `setup(run_folder)` runs on the main process once the folder is marked INCOMPLETE and
    before the model is loaded (the demo writes its base model there).
    """
    settings.check()
    settings = settings.resolved()
    observer = observer or FinetuneObserver()
    folder = RunFolder(settings.output)
    state_before = folder.check_claim(overwrite=settings.overwrite, resume=settings.resume)
    if settings.resume and state_before == "incomplete":
        _check_resume(folder, settings)

    args = _training_arguments(settings, folder.checkpoints_dir)  # starts torch.distributed under torchrun
    main = args.process_index == 0
    _barrier()  # every process has read the folder's state before the main process changes it
    if main:
        folder.start(overwrite=settings.overwrite, settings=settings.to_dict())
    _barrier()
    try:
        if main and setup is not None:
            setup(folder.path)
        _barrier()
        report = _train(settings, rows, folder, observer, args, main)
    except BaseException as error:
        if main:
            _abandon(folder, state_before, error)
        raise
    _barrier()
    return report


def _abandon(folder: RunFolder, state_before: str, error: BaseException) -> None:
    """After a failure: leave nothing if nothing worth keeping was made, else a marked INCOMPLETE run."""
    if folder.latest_checkpoint() is not None or state_before == "incomplete":
        folder.record_failure(error)
    elif state_before == "absent":
        shutil.rmtree(folder.path, ignore_errors=True)
    else:
        folder.clear()


def _resume_point(folder: RunFolder, observer: FinetuneObserver, main: bool) -> Path | None:
    """The newest complete checkpoint, once checkpoints cut short while saving are removed."""
    if main:
        for path in folder.remove_incomplete_checkpoints():
            observer.on_message(f"removed {path.name}: it was cut short while saving")
    _barrier()
    latest = folder.latest_checkpoint()
    observer.on_message(f"resuming from {latest.name}" if latest is not None
                        else "no complete checkpoint to resume from: starting at step 0")
    return latest


def _write_outputs(folder: RunFolder, model: nn.Module, report: FinetuneReport, title: str) -> None:
    """Adapter, loss plot, then report.json (the moment the run counts as finished), each atomically."""
    with atomic_directory(folder.path / ADAPTER_DIR) as staging:
        model.save_pretrained(staging)
    atomic_write_bytes(folder.path / LOSS_PLOT, plot_loss(report.loss_history, title))
    folder.finish(report.to_dict())


def _train(settings: FinetuneSettings, rows: Sequence[Row], folder: RunFolder, observer: FinetuneObserver,
           args: Any, main: bool) -> FinetuneReport:
    with without_log_notes("bnb-int8-cast"):
        return _train_quietly(settings, rows, folder, observer, args, main)


def _train_quietly(settings: FinetuneSettings, rows: Sequence[Row], folder: RunFolder, observer: FinetuneObserver,
                   args: Any, main: bool) -> FinetuneReport:
    import torch
    from transformers import PrinterCallback, Trainer, set_seed

    from ..apply import apply_plan
    from ..errors import NotQuantizedWarning
    from ..plan import plan_preparation

    timings: dict[str, float] = {}
    started = time.perf_counter()
    if not main:
        observer = FinetuneObserver()

    resume_from = _resume_point(folder, observer, main) if settings.resume else None
    tokenizer = load_tokenizer(settings.model)
    data = tokenize_rows(rows, tokenizer, settings.seq_len, source=settings.data)
    if data.truncated:
        observer.on_message(f"{data.truncated} row(s) longer than --seq-len {settings.seq_len} were cut at its end")
    if data.dropped:
        observer.on_message(f"{len(data.dropped)} row(s) had no completion token within --seq-len and were skipped "
                            f"(lines {', '.join(map(str, data.dropped[:5]))}{' ...' if len(data.dropped) > 5 else ''})")

    device_index = args.local_process_index if torch.cuda.is_available() else None
    model = load_quantized_model(settings.model, settings.quantize, device_index=device_index)
    timings["load_s"] = time.perf_counter() - started

    plan = plan_preparation(model, upcast=settings.upcast)
    observer.on_plan(plan)
    with warnings.catch_warnings():
        if settings.quantize == "none":  # asked for explicitly; the plan already says so
            warnings.simplefilter("ignore", NotQuantizedWarning)
        apply_plan(model, plan)

    set_seed(settings.seed)  # the LoRA initialisation is part of the run's seeded state
    model = _attach_lora(model, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    observer.on_trainable(trainable, total)
    timings["prepare_s"] = time.perf_counter() - started - timings["load_s"]

    batch = first_batch(data, settings.batch_size, _pad_id(tokenizer))
    loss_before = batch_loss(model, batch)
    samples = [{"prompt": prompt, "before": _generate(model, tokenizer, prompt, settings.max_new_tokens)}
               for prompt in settings.samples] if main else []
    for sample in samples:
        observer.on_sample("before", sample["prompt"], sample["before"])

    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=CausalLMCollator(_pad_id(tokenizer)),
                      callbacks=[_trainer_callback(folder, observer)])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the observer shows progress instead
    train_started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    timings["train_s"] = time.perf_counter() - train_started

    loss_after = batch_loss(model, batch)
    for sample in samples:
        sample["after"] = _generate(model, tokenizer, sample["prompt"], settings.max_new_tokens)
        observer.on_sample("after", sample["prompt"], sample["after"])

    history = _loss_history(trainer.state.log_history)
    config = getattr(model, "config", None)
    report = FinetuneReport(
        settings=settings.to_dict(),
        plan=plan.to_dict(),
        model={"architecture": (getattr(config, "architectures", None) or ["?"])[0],
               "compute_dtype": str(compute_dtype(check_model_folder(settings.model))).removeprefix("torch."),
               "trainable_parameters": trainable, "total_parameters": total},
        data={"file": settings.data, "rows": len(rows), "examples": len(data), "truncated": data.truncated,
              "dropped_lines": list(data.dropped),
              "trained_tokens_per_epoch": sum(sum(label != IGNORE_INDEX for label in e["labels"][1:])
                                              for e in data.examples)},
        loss_history=history,
        batch_loss_before=loss_before,
        batch_loss_after=loss_after,
        samples=samples,
        resumed_from_step=checkpoint_step(resume_from) if resume_from is not None else None,
        world_size=args.world_size,
        timings=timings,
        versions=_versions(),
        files={"adapter": str(folder.path / ADAPTER_DIR), "report": str(folder.path / REPORT),
               "loss_plot": str(folder.path / LOSS_PLOT)},
    )
    if main:
        timings["total_s"] = time.perf_counter() - started  # all but the writing of the files below
        title = f"{Path(settings.model).name} · {settings.quantize} · LoRA r={settings.lora_r}"
        _write_outputs(folder, model, report, title)
        observer.on_message(f"wrote {folder.path / ADAPTER_DIR}, {folder.path / REPORT}, {folder.path / LOSS_PLOT}")
    return report


def read_report(output: str | os.PathLike[str]) -> dict[str, Any]:
    """The report.json of a finished run."""
    return json.loads((Path(output) / REPORT).read_text(encoding="utf-8"))

