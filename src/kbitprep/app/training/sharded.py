"""`kbitprep finetune --fsdp`: the executor that shards a run's 4-bit base across the processes.

The run's phases are the one-process run's (`kbitprep.app.training.run.FinetuneRun`); this
executor changes only where the model goes and how the steps are taken::

    load: rank 0 loads the model, every rank builds its skeleton on the meta device; the
          run's own prepare and adapt phases build both, then FSDP2 shards the skeleton and
          rank 0 fills it (`kbitprep.app.distributed.fsdp.load_sharded`)
    train: `ShardedTraining` (one process's numbers on the same global batch)
    save: the adapter gathered whole, written once by rank 0

What can be checked before the run folder is claimed is: a run without torchrun, or
with int8 weights (which FSDP cannot shard), stops with the fix and writes nothing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed.fsdp import FsdpError, adapter_state, load_sharded, plan_for_sharding, shard_stats
from ..model.loading import check_model_folder, compute_dtype, load_quantized_model, resolve_compute_dtype
from .executor import Executor, RunState, Trained

if TYPE_CHECKING:
    from torch import nn

    from ...plan import PreparationPlan
    from ..config.settings import FinetuneSettings

__all__ = ["SHARDABLE_QUANTIZE", "ShardedExecutor", "check_sharded_settings"]

# --quantize values whose weights FSDP can shard (int8's Int8Params cannot be cut into rows).
SHARDABLE_QUANTIZE = ("nf4", "fp4", "none")


def check_sharded_settings(settings: FinetuneSettings) -> None:
    """Refuse, before anything is written, a sharded run that cannot start.

    Raises:
        FsdpError: `--quantize int8`, `--pack` or evaluation rows (not in the sharded loop
            yet), or the command was not started by torchrun.
    """
    if settings.quantize not in SHARDABLE_QUANTIZE:
        raise FsdpError(f"--fsdp cannot shard --quantize {settings.quantize} weights (FSDP cuts weights into rows, "
                        "which int8 quantization state does not survive); pass --quantize nf4")
    unsupported = [flag for flag, given in (("--pack", settings.pack), ("--eval-data", settings.eval_data),
                                            ("--eval-fraction", settings.eval_fraction)) if given]
    if unsupported:
        raise FsdpError(f"--fsdp does not train with {' or '.join(unsupported)} yet (its loop has no packing or "
                        "evaluation); drop it, or train without --fsdp")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise FsdpError("--fsdp runs one process per device under torchrun: start it with "
                        "`torchrun --nproc_per_node N -m kbitprep finetune MODEL DATA --output DIR --fsdp`")


class ModelOwnLoss:
    """The loss plan of a sharded run: the model's own loss (the chunked loss is not in its loop yet)."""

    reason = "--fsdp computes the model's own loss over the full logits"

    def to_dict(self) -> dict[str, Any]:
        return {"loss": "full", "reason": self.reason}


class ShardedExecutor(Executor):
    """The base model sharded across the torchrun processes with FSDP2; a plain loop takes the steps."""

    builds_while_loading = True  # FSDP shards the prepared, adapted model
    every_process_generates = True  # each forward gathers the units collectively

    def __init__(self) -> None:
        self.adapter: dict[str, Any] = {}
        self.sharding: dict[str, Any] = {}

    def check(self, settings: FinetuneSettings) -> None:
        check_sharded_settings(settings)  # resolved: --quantize auto on a saved-int8 folder is int8

    def plan_preparation(self, model: Any, upcast: str) -> PreparationPlan:
        return plan_for_sharding(model, upcast=upcast)

    def load_model(self, run: RunState) -> Any:
        """Load on rank 0, build the skeleton everywhere, prepare and adapt both (`run.build`), shard, fill."""
        from ...sizing import build_meta_model
        from ..distributed.fsdp import training_device

        settings = run.settings
        config = check_model_folder(settings.model)
        # Rank 0 loads on the host; the compute dtype is the one for the device the shards train on.
        computes_in = resolve_compute_dtype(config, settings.compute_dtype, training_device())
        stored = computes_in if settings.quantize == "none" else compute_dtype(config)
        compute = str(computes_in).removeprefix("torch.")

        def load() -> nn.Module:
            return load_quantized_model(settings.model, settings.quantize, compute=compute)

        def skeleton() -> nn.Module:
            return build_meta_model(settings.model, quantize=settings.quantize, dtype=stored)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
            model = load_sharded(load, skeleton, run.build)
        stats = shard_stats(model)
        self.sharding = {"processes": run.args.world_size, **stats.to_dict()}
        run.observer.on_message(
            f"sharded over {run.args.world_size} processes: each holds about "
            f"{stats.local_parameter_bytes / 2 ** 20:,.1f} MiB of the {stats.full_parameter_bytes / 2 ** 20:,.1f} MiB "
            "of parameters")
        return model

    def train(self, run: RunState) -> Trained:
        """Train with `ShardedTraining`, from the resume checkpoint if there is one; gather the adapter."""
        from ..distributed.loop import ShardedTraining
        from .sampling import pad_token_id
        from .tensorboard_log import open_tensorboard

        if run.settings.loss != "full":
            run.observer.on_message(f"--loss {run.settings.loss}: --fsdp computes the model's own (full) loss")
        board = open_tensorboard(run.settings, run.folder.path, run.device, run.memory, run.main)  # --report-to
        training = ShardedTraining(run.model, run.data, run.settings, pad_token_id(run.tokenizer),
                                   run.folder.checkpoints_dir, on_checkpoint=run.folder.mark_checkpoint_complete,
                                   on_log=board.log_step if board is not None else None)
        if run.resume_from is not None:
            training.resume(run.resume_from)
        history = training.train(run.observer)
        if board is not None:
            board.close()
        self.adapter = adapter_state(run.model)  # collective: every rank takes part, rank 0 saves it
        # No evaluation under --fsdp (check_sharded_settings refuses eval rows).
        return Trained(history=history, evaluations=[], loss_plan=ModelOwnLoss())

    def save_adapter(self, run: RunState, directory: Path) -> None:
        from ..distributed.loop import save_adapter

        save_adapter(run.model, self.adapter, directory)

    def report_model(self, run: RunState) -> dict[str, Any]:
        return {"sharding": self.sharding}
