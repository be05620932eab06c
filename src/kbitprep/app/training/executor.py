"""How a run's model is placed and its steps are taken: the part of a run that differs by executor.

A `FinetuneRun` goes through the same phases whatever executes it (claim → load → prepare →
adapt → train → report → save); an executor supplies only what differs between one
process and several:

    what differs                      TrainerExecutor (one process, DDP)   ShardedExecutor (--fsdp)
    where the model goes              whole, on this process's device      FSDP2 shards, rank 0 fills them
    when prepare + adapt run          after loading                        before sharding (on the loaded
                                                                           model and every rank's skeleton)
    checkpointing                     the plan's default                   non-reentrant (FSDP re-gathers)
    who runs sample generation        the main process                     every process (forwards are collective)
    the step loop                     the transformers Trainer             `sharded_loop.ShardedTraining`
    the adapter it saves              peft's save_pretrained               gathered whole, then saved once

Everything else is the same on both: the loss (`kbitprep.causal_lm_loss`), the example
order (`order`), the step hooks (`hooks`), the settings (what `--fsdp` cannot train with is
one table, `kbitprep.app.config.settings.SHARDED_LIMITS`). An executor keeps no state: each
method takes the values the run has built and returns what it builds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...device import has_accelerator
from ...loss.preference import method_strength
from ..data.tokenize import CausalLMCollator, PreferenceCollator
from ..model.loading import load_quantized_model

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from ...plan import PreparationPlan
    from ..config.settings import FinetuneSettings
    from ..runs.folder import RunFolder
    from .hooks import StepHook
    from .inputs import RunInputs
    from .observer import FinetuneObserver

__all__ = ["Built", "Executor", "Session", "Trained", "TrainerExecutor"]


@dataclasses.dataclass(frozen=True)
class Session:
    """This process's part in the run, from the claim on.

    Args:
        args (TrainingArguments): the Trainer's arguments (also the process group's source).
        device (torch.device): where this process computes.
        main (bool): the main process (it writes the run folder and reports).
        folder (RunFolder): the run folder, claimed.
        observer (FinetuneObserver): progress (a silent one on the other processes).
        resume_from (Path | None): the checkpoint training continues from.
    """

    args: TrainingArguments
    device: torch.device
    main: bool
    folder: RunFolder
    observer: FinetuneObserver
    resume_from: Path | None = None


@dataclasses.dataclass(frozen=True)
class Built:
    """The model prepared and adapted, and what preparing it found.

    Args:
        model (Any): the peft-wrapped model (sharded under --fsdp).
        plan (PreparationPlan): the preparation plan applied (the loaded model's).
        trainable (int): trainable parameters.
        total (int): all parameters.
        placement (dict): what the executor adds to report.json's "model" section. Default: {}
        prepare_s (float): the seconds preparing and adapting took. Default: 0.0
    """

    model: Any
    plan: PreparationPlan
    trainable: int
    total: int
    placement: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepare_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Trained:
    """What the step loop hands back to the run.

    Args:
        log (list[dict[str, float]]): the loop's log: one entry per optimizer step (step, loss,
            learning_rate, grad_norm) and one per evaluation (step, eval_loss, eval_perplexity).
        adapter (dict | None): the adapter's tensors gathered whole (sharded runs); None: the model's own.
    """

    log: list[dict[str, Any]]
    adapter: dict[str, Any] | None = None


Build = Callable[[Any], Built]  # prepare and adapt a loaded model (or a meta skeleton)


class Executor:
    """The one-process defaults; an executor for several processes overrides what differs.

    Attributes:
        every_process_generates (bool): each forward pass needs every process, so every
            process generates the sample completions (the main one reports them).
    """

    every_process_generates = False

    def check(self, settings: FinetuneSettings) -> None:
        """Refuse, before the run folder is touched, a run this executor cannot start where it was started."""

    def plan_preparation(self, model: Any, upcast: str) -> PreparationPlan:
        """The preparation plan for `model` as this executor trains it."""
        from ...plan import plan_preparation

        return plan_preparation(model, upcast=upcast)

    def load(self, inputs: RunInputs, session: Session, build: Build) -> Built:
        """The (quantized) model, whole, on this process's device, then prepared and adapted."""
        device_index = session.args.local_process_index if has_accelerator() else None
        settings = inputs.settings
        model = load_quantized_model(settings.model, settings.quantize, device_index=device_index,
                                     compute=settings.compute_dtype, config=inputs.config)
        return build(model)

    def train(self, model: Any, inputs: RunInputs, session: Session, hooks: StepHook) -> Trained:
        """Take the optimizer steps, from `session.resume_from` when there is one, calling `hooks`."""
        raise NotImplementedError

    def save_adapter(self, model: Any, trained: Trained, directory: Path) -> None:
        """Write the adapter (peft's safetensors and config) into `directory` (main process only)."""
        model.save_pretrained(directory)


class TrainerExecutor(Executor):
    """One process, or several under torchrun with DDP: the transformers Trainer takes the steps."""

    def train(self, model: Any, inputs: RunInputs, session: Session, hooks: StepHook) -> Trained:
        """Train with the Trainer and the run's hooks, from the resume checkpoint if there is one.

        A run killed after its last step resumes from a checkpoint of that step; the Trainer
        would train one step more, so the weights and the log are taken from it as they are.
        """
        from .trainer import FinetuneTrainer, HookCallback, PreferenceTrainer, restore_finished, training_done

        settings = inputs.settings
        common = {"model": model, "args": session.args, "train_dataset": inputs.train_data,
                  "callbacks": [HookCallback(hooks)], "loss_mode": settings.loss,
                  "loraplus_lr_ratio": settings.loraplus_lr_ratio}
        trainer: FinetuneTrainer
        if settings.method == "sft":
            trainer = FinetuneTrainer(data_collator=CausalLMCollator(inputs.pad_token_id), **common)
        else:  # a preference method: its strength is the setting its row names (--beta, --orpo-lambda)
            trainer = PreferenceTrainer(data_collator=PreferenceCollator(inputs.pad_token_id), method=settings.method,
                                        strength=method_strength(settings.method, settings), **common)
        resume_from = session.resume_from
        if resume_from is not None and training_done(resume_from):
            session.observer.on_message(f"{resume_from.name} is the run's last step: nothing left to train")
            restore_finished(trainer, resume_from)
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        return Trained(log=list(trainer.state.log_history))
