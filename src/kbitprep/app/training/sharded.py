"""`kbitprep finetune --fsdp`: the executor that shards a run's 4-bit base across the processes.

The run's phases are the one-process run's (`kbitprep.app.training.run.FinetuneRun`); this
executor changes only where the model goes and how the steps are taken::

    load: rank 0 loads the model, every rank builds its skeleton on the meta device; the
          run's own prepare and adapt phases build both, then FSDP2 shards the skeleton and
          rank 0 fills it (`kbitprep.app.distributed.fsdp.load_sharded`)
    train: `ShardedTraining` (one process's numbers on the same global batch), with the
          run's loss, data (packed or not) and step hooks (evaluation, divergence, ...)
    save: the adapter gathered whole, written once by rank 0

What `--fsdp` cannot train with is one table (`SHARDED_LIMITS`, checked with the settings);
this executor checks only that torchrun started the command.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed.fsdp import FsdpError, adapter_state, load_sharded, plan_for_sharding, shard_stats
from ..model.loading import compute_dtype, load_quantized_model, resolve_compute_dtype
from .executor import Build, Built, Executor, Session, Trained

if TYPE_CHECKING:
    from torch import nn

    from ...plan import PreparationPlan
    from ..config.settings import FinetuneSettings
    from .hooks import StepHook
    from .inputs import RunInputs

__all__ = ["ShardedExecutor"]


class ShardedExecutor(Executor):
    """The base model sharded across the torchrun processes with FSDP2; a plain loop takes the steps."""

    every_process_generates = True  # each forward gathers the units collectively

    def check(self, settings: FinetuneSettings) -> None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise FsdpError("--fsdp runs one process per device under torchrun: start it with "
                            "`torchrun --nproc_per_node N -m kbitprep finetune MODEL DATA --output DIR --fsdp`")

    def plan_preparation(self, model: Any, upcast: str) -> PreparationPlan:
        return plan_for_sharding(model, upcast=upcast)

    def load(self, inputs: RunInputs, session: Session, build: Build) -> Built:
        """Load on rank 0, build the skeleton everywhere, prepare and adapt both (`build`), shard, fill."""
        from ...sizing import build_meta_model
        from ..distributed.fsdp import training_device

        settings, config = inputs.settings, inputs.config
        # Rank 0 loads on the host; the compute dtype is the one for the device the shards train on.
        computes_in = resolve_compute_dtype(config, settings.compute_dtype, training_device())
        stored = computes_in if settings.quantize == "none" else compute_dtype(config)
        compute = str(computes_in).removeprefix("torch.")
        builds: list[tuple[bool, Built]] = []  # (a skeleton?, its build); the loaded model's plan is the run's

        def load() -> nn.Module:
            return load_quantized_model(settings.model, settings.quantize, compute=compute, config=config)

        def skeleton() -> nn.Module:
            return build_meta_model(config, quantize=settings.quantize, dtype=stored)

        def build_one(model: nn.Module) -> nn.Module:
            built = build(model)
            builds.append((next(model.parameters()).device.type == "meta", built))
            return built.model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
            model = load_sharded(load, skeleton, build_one)
        stats = shard_stats(model)
        session.observer.on_message(
            f"sharded over {session.args.world_size} processes: each holds about "
            f"{stats.local_parameter_bytes / 2 ** 20:,.1f} MiB of the {stats.full_parameter_bytes / 2 ** 20:,.1f} MiB "
            "of parameters")
        first = min(builds, key=lambda entry: entry[0])[1]  # rank 0's loaded model, else this rank's skeleton
        return Built(model, first.plan, first.trainable, first.total,
                     placement={"sharding": {"processes": session.args.world_size, **stats.to_dict()}},
                     prepare_s=first.prepare_s)

    def train(self, model: Any, inputs: RunInputs, session: Session, hooks: StepHook) -> Trained:
        """Train with `ShardedTraining`, from the resume checkpoint if there is one; gather the adapter."""
        from .sharded_loop import ShardedTraining

        training = ShardedTraining(model, inputs.train_data, inputs.settings, inputs.pad_token_id,
                                   session.folder.checkpoints_dir, hooks=hooks)
        if session.resume_from is not None:
            training.resume(session.resume_from)
        log = training.train()
        adapter = adapter_state(model)  # collective: every rank takes part, rank 0 saves it
        return Trained(log=log, adapter=adapter)

    def save_adapter(self, model: Any, trained: Trained, directory: Path) -> None:
        from .sharded_loop import save_adapter

        save_adapter(model, trained.adapter or {}, directory)
