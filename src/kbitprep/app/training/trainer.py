"""The transformers Trainer as a run uses it: its arguments, its subclass, and the run's callback.

This module imports transformers when it is imported; the application imports it only
once a run starts (`import kbitprep` stays light).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ...device import has_accelerator
from ...loss import ChunkedLossMixin
from ..config.settings import FinetuneSettings
from ..distributed.processes import barrier
from .hooks import StepHook, StepState
from .order import SeededOrder

__all__ = ["FinetuneTrainer", "HookCallback", "PreferenceTrainer", "restore_finished", "training_arguments",
           "training_done"]


def training_arguments(settings: FinetuneSettings, output_dir: Path) -> TrainingArguments:
    """The Trainer's arguments for a run: the schedule of `kbitprep.app.config.schedule`, a log entry every step."""
    from ..config.schedule import TRAINER_SCHEDULES, trainer_warmup

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        num_train_epochs=settings.epochs,
        lr_scheduler_type=TRAINER_SCHEDULES[settings.lr_scheduler],
        warmup_steps=trainer_warmup(settings),
        weight_decay=0.0,
        optim=settings.optim,  # --optim: the Trainer builds it (kbitprep.app.config.optimizer)
        logging_steps=1,
        logging_nan_inf_filter=False,  # log a non-finite loss as it is (the filter logs it as 0); it stops the run
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=None,  # kbitprep prunes checkpoints itself, only once a newer one is complete
        seed=settings.seed,
        data_seed=settings.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not has_accelerator(),
        dataloader_pin_memory=has_accelerator(),
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
    )


class FinetuneTrainer(ChunkedLossMixin, Trainer):
    """The Trainer of a fine-tuning run: its loss is `kbitprep.causal_lm_loss` (`loss_mode`: "chunked"
    or "full", the run's `--loss`), its example order the sharded loop's (`order.SeededOrder`).
    Progress goes to the run's observer, not to stdout."""

    def __init__(self, *args: Any, loss_mode: str = "chunked", loraplus_lr_ratio: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_mode = loss_mode
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.remove_callback(PrinterCallback)  # it prints every log dict; the observer shows progress instead

    def create_optimizer(self, model: Any = None) -> Any:
        """The Trainer's optimizer for `--optim`; with `--loraplus-lr-ratio`, peft's LoRA+ grouping of it."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from ..config.optimizer import loraplus_optimizer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        kwargs = {**kwargs, "weight_decay": self.args.weight_decay}
        self.optimizer = loraplus_optimizer(self.model if model is None else model, optimizer_cls, kwargs,
                                            self.loraplus_lr_ratio)
        return self.optimizer

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        dataset: Any = (args[0] if args else kwargs.get("train_dataset")) or self.train_dataset
        return SeededOrder(len(dataset), self.args.seed)


class PreferenceTrainer(FinetuneTrainer):
    """The Trainer of a preference run (--method dpo|orpo): its loss is `kbitprep.loss.preference_loss` on
    batches of pairs (`PreferenceCollator`), and each logged step carries the rewards of its micro-batches
    (`REWARD_KEYS`: their mean since the last log, as TRL logs them).

    The loss is a mean over each micro-batch's pairs, so the Trainer divides it by the accumulation steps.
    """

    def __init__(self, *args: Any, method: str, strength: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.strength = method, strength
        self.model_accepts_loss_kwargs = False  # the Trainer then scales the loss for gradient accumulation
        self.rewards: list[dict[str, float]] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        from ...loss import preference_loss

        result = preference_loss(model, inputs, self.method, self.strength, loss=self.loss_mode,
                                 backward=self.loss_backward)
        if model.training:
            self.rewards.append(result.metrics())
        return (result.loss, None) if return_outputs else result.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.rewards and "loss" in logs:
            logs = {**logs, **{key: sum(r[key] for r in self.rewards) / len(self.rewards) for key in self.rewards[0]}}
            self.rewards.clear()
        super().log(logs, *args, **kwargs)


class HookCallback(TrainerCallback):
    """The run's step hooks (`kbitprep.app.training.hooks`) as the Trainer's callback.

    The Trainer logs every optimizer step (`logging_steps=1`) before it saves that step's
    checkpoint, so `on_log` is where the hooks' `on_step` runs; the entries the hooks add
    (an evaluation's) go into the Trainer's log history, which the checkpoint saves.

    Args:
        hooks (StepHook): the run's hooks (a `StepHooks` list).
    """

    def __init__(self, hooks: StepHook) -> None:
        self.hooks = hooks

    @staticmethod
    def _state(state: Any, model: Any) -> StepState:
        return StepState(step=state.global_step, total_steps=state.max_steps, model=model,
                         main=state.is_world_process_zero)

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        self.hooks.on_train_begin(self._state(state, model))

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, float] | None = None,
               model: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:  # the end-of-training summary is no step
            return
        entries = [{**logs, "step": state.global_step}]
        self.hooks.on_step(self._state(state, model), entries)
        state.log_history.extend(entries[1:])

    def on_save(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # Every process has written its part of the checkpoint (its RNG state) before the hooks hear of it.
        barrier()
        checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        self.hooks.on_checkpoint(self._state(state, model), checkpoint)
        barrier()

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        self.hooks.on_train_end(self._state(state, model))


def training_done(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the run's last step (the Trainer records both in trainer_state.json)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def restore_finished(trainer: Trainer, checkpoint: Path) -> None:
    """Give `trainer` the adapter weights and the state (its log) saved in a checkpoint of the run's last step.

    Raises:
        FinetuneError: the checkpoint holds weights the run's adapter does not have.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    from ..config.settings import FinetuneError

    weights = load_file(checkpoint / "adapter_model.safetensors", device=str(trainer.args.device))
    result = set_peft_model_state_dict(trainer.model, weights)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise FinetuneError(f"{checkpoint}: holds weights this run's adapter does not have (first: {unexpected[0]}); "
                            "pass --overwrite to start again")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))

