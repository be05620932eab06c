"""How a run's model is placed and its steps are taken: the part of a run that differs by executor.

A `FinetuneRun` goes through the same phases whatever executes it (claim → load → prepare →
adapt → train → report → save); an executor supplies only what differs between one
process and several:

    what differs                      TrainerExecutor (one process, DDP)   ShardedExecutor (--fsdp)
    settings it cannot run            none                                 int8, --pack, evaluation, no torchrun
    where the model goes              whole, on this process's device      FSDP2 shards, rank 0 fills them
    when prepare + adapt run          after loading                        before sharding (on the loaded
                                                                           model and every rank's skeleton)
    checkpointing                     the plan's default                   non-reentrant (FSDP re-gathers)
    who runs sample generation        the main process                     every process (forwards are collective)
    the step loop                     the transformers Trainer             `distributed.loop.ShardedTraining`
    the adapter it saves              peft's save_pretrained               gathered whole, then saved once

An executor reads and writes the run through `RunState`, the state the phases keep.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...device import has_accelerator
from ..data.tokenize import CausalLMCollator
from ..model.loading import load_quantized_model
from .evaluation import eval_history
from .sampling import pad_token_id

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from ...plan import PreparationPlan
    from ..config.settings import FinetuneSettings
    from ..data.packing import PackedData
    from ..data.tokenize import TokenizedData
    from ..runs.folder import RunFolder
    from .observer import FinetuneObserver

__all__ = ["Executor", "RunState", "Trained", "TrainerExecutor"]


class LossPlanLike(Protocol):
    """What a run records of the loss it trained with (`kbitprep.LossPlan` is one)."""

    @property
    def reason(self) -> str | None: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class Trained:
    """What the step loop hands back to the run.

    Args:
        history (list[dict[str, float]]): one entry per optimizer step (step, loss, learning_rate, ...).
        evaluations (list[dict[str, float]]): one entry per evaluation (step, eval_loss, perplexity).
        loss_plan (LossPlanLike): the loss the steps computed, and why if it is not the one asked for.
    """

    history: list[dict[str, float]]
    evaluations: list[dict[str, float]]
    loss_plan: LossPlanLike


class RunState(Protocol):
    """The run as an executor sees it: its settings, where it reports and writes, what the phases built."""

    settings: FinetuneSettings
    observer: FinetuneObserver
    folder: RunFolder
    args: TrainingArguments
    device: torch.device
    main: bool
    resume_from: Path | None
    tokenizer: Any
    data: TokenizedData
    train_data: TokenizedData | PackedData
    eval_data: TokenizedData | None
    model: Any
    memory: dict[str, Any]  # the predicted peak, for the report and the TensorBoard log

    def build(self, model: Any) -> Any:
        """The prepare and adapt phases on `model`; returns the adapted model."""


class Executor:
    """The one-process defaults; an executor for several processes overrides what differs.

    Attributes:
        builds_while_loading (bool): prepare and adapt run inside `load_model` (a sharded
            model can only be sharded once prepared and adapted), not after it.
        every_process_generates (bool): each forward pass needs every process, so every
            process generates the sample completions (the main one reports them).
    """

    builds_while_loading = False
    every_process_generates = False

    def check(self, settings: FinetuneSettings) -> None:
        """Refuse, before the run folder is touched, settings this executor cannot run (resolved: paths
        absolute, `--quantize auto` resolved against the model folder)."""

    def plan_preparation(self, model: Any, upcast: str) -> PreparationPlan:
        """The preparation plan for `model` as this executor trains it."""
        from ...plan import plan_preparation

        return plan_preparation(model, upcast=upcast)

    def load_model(self, run: RunState) -> Any:
        """The (quantized) model, whole, on this process's device."""
        device_index = run.args.local_process_index if has_accelerator() else None
        return load_quantized_model(run.settings.model, run.settings.quantize, device_index=device_index,
                                    compute=run.settings.compute_dtype)

    def train(self, run: RunState) -> Trained:
        """Take the optimizer steps, from `run.resume_from` when there is one."""
        raise NotImplementedError

    def save_adapter(self, run: RunState, directory: Path) -> None:
        """Write the adapter (peft's safetensors and config) into `directory` (main process only)."""
        run.model.save_pretrained(directory)

    def report_model(self, run: RunState) -> dict[str, Any]:
        """What this executor adds to report.json's "model" section."""
        return {}


class TrainerExecutor(Executor):
    """One process, or several under torchrun with DDP: the transformers Trainer takes the steps."""

    def train(self, run: RunState) -> Trained:
        """Train with the Trainer and the run's callbacks, from the resume checkpoint if there is one.

        A run killed after its last step resumes from a checkpoint of that step; the Trainer
        would train one step more, so the weights and the log are taken from it as they are.
        """
        from ...loss import plan_loss
        from ..runs.report import loss_history
        from .trainer import FinetuneTrainer, restore_finished, training_done

        loss_plan = plan_loss(run.model, run.settings.loss)
        if loss_plan.reason:
            run.observer.on_message(f"--loss chunked: using the full loss instead, as {loss_plan.reason}")
        trainer = FinetuneTrainer(model=run.model, args=run.args, train_dataset=run.train_data,
                                  data_collator=CausalLMCollator(pad_token_id(run.tokenizer)),
                                  callbacks=self.callbacks(run), loss_mode=run.settings.loss)
        if run.resume_from is not None and training_done(run.resume_from):
            run.observer.on_message(f"{run.resume_from.name} is the run's last step: nothing left to train")
            restore_finished(trainer, run.resume_from)
        else:
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from is not None else None)
        log = trainer.state.log_history
        return Trained(history=loss_history(log), evaluations=eval_history(log), loss_plan=loss_plan)

    def callbacks(self, run: RunState) -> list[TrainerCallback]:
        """The Trainer callbacks of the run: the place for anything to do after each step or save.

        The divergence guard comes first: it stops a step with a non-finite loss, gradient
        norm or weight before that step's checkpoint is saved and marked complete.
        """
        from .divergence import divergence_callback
        from .evaluation import make_eval_callback
        from .tensorboard_log import tensorboard_callbacks
        from .trainer import RunCallback

        settings = run.settings
        callbacks: list[TrainerCallback] = [divergence_callback(settings.lr, settings.lora_alpha),
                                            RunCallback(run.folder, run.observer)]
        if run.eval_data is not None:  # before RunCallback's save: a checkpoint keeps the step's evaluation
            callbacks.insert(1, make_eval_callback(run.eval_data, settings.batch_size, pad_token_id(run.tokenizer),
                                                   settings.eval_steps, run.observer, loss=settings.loss))
        callbacks += tensorboard_callbacks(settings, run.folder.path, run.device, run.memory)  # --report-to
        return callbacks

