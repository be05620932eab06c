"""`kbitprep finetune --fsdp`: a `FinetuneRun` whose 4-bit base is sharded across the processes.

The phases are the one-process run's, changed where sharding changes them::

    claim ─> load: rank 0 loads the model, every rank builds its skeleton on the meta
             device; both go through the same prepare and adapt steps, then FSDP2 shards
             the skeleton and rank 0 fills it (`kbitprep.app.distributed.fsdp.load_sharded`)
          ─> measure (on every rank: FSDP gathers each unit collectively)
          ─> train: `ShardedTraining` (one process's numbers on the same global batch)
          ─> save: the adapter gathered whole, written once by rank 0

What can be checked before the run folder is claimed is: a run without torchrun, or
with int8 weights (which FSDP cannot shard), stops with the fix and writes nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.settings import FinetuneSettings
from ..data.rows import Row
from ..model.loading import check_model_folder, compute_dtype, load_quantized_model, resolve_compute_dtype
from ..runs.report import FinetuneReport
from ..training.observer import FinetuneObserver
from ..training.run import FinetuneRun, measured_peak
from ..training.sampling import generate
from .fsdp import FsdpError, adapter_state, load_sharded, prepare_for_sharding, shard_stats

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SHARDABLE_QUANTIZE", "ShardedFinetuneRun", "check_sharded_settings"]

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


class ShardedFinetuneRun(FinetuneRun):
    """A fine-tuning run whose base model is sharded across the torchrun processes (`--fsdp`).

    Args:
        settings (FinetuneSettings): the run; `settings.fsdp` is True.
        rows (Sequence[Row]): the training rows, already read.
        observer (FinetuneObserver | None): receives progress on rank 0. Default: None
        setup (Callable[[Path], object] | None): runs on rank 0 once the folder is claimed. Default: None
        makes (tuple[str, ...]): names in the run folder that `setup` writes (the demo's base model). Default: ()
        eval_rows (Sequence[Row]): rows to evaluate on; must be empty (no evaluation under --fsdp yet). Default: ()

    Raises:
        FsdpError: see `check_sharded_settings`; raised before the folder is touched.
    """

    adapter: dict[str, Any]
    sharding: dict[str, Any]

    def __init__(self, settings: FinetuneSettings, rows: Sequence[Row], observer: FinetuneObserver | None = None,
                 *, setup: Callable[[Path], object] | None = None, makes: tuple[str, ...] = (),
                 eval_rows: Sequence[Row] = ()) -> None:
        check_sharded_settings(settings)
        super().__init__(settings, rows, observer, setup=setup, makes=makes, eval_rows=eval_rows)

    def load_model(self) -> None:
        """Load on rank 0, build the skeleton everywhere, prepare and adapt both, shard, fill."""
        from ...sizing import build_meta_model
        from .fsdp import training_device

        settings = self.settings
        config = check_model_folder(settings.model)
        # Rank 0 loads on the host; the compute dtype is the one for the device the shards train on.
        computes_in = resolve_compute_dtype(config, settings.compute_dtype, training_device())
        stored = computes_in if settings.quantize == "none" else compute_dtype(config)
        compute = str(computes_in).removeprefix("torch.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
            def load() -> nn.Module:
                return load_quantized_model(settings.model, settings.quantize, compute=compute)

            def skeleton() -> nn.Module:
                return build_meta_model(settings.model, quantize=settings.quantize, dtype=stored)

            self.model = load_sharded(load, skeleton, self.prepare_and_adapt)
        self.check_token_ids(self.model.get_input_embeddings().num_embeddings)
        stats = shard_stats(self.model)
        self.sharding = {"processes": self.args.world_size, **stats.to_dict()}
        self.observer.on_message(
            f"sharded over {self.args.world_size} processes: each holds about "
            f"{stats.local_parameter_bytes / 2 ** 20:,.1f} MiB of the {stats.full_parameter_bytes / 2 ** 20:,.1f} MiB "
            "of parameters")

    def prepare_and_adapt(self, model: Any) -> Any:
        """The prepare and adapt phases on one model: rank 0's loaded one, or any rank's skeleton."""
        from ...errors import NotQuantizedWarning

        reporting = self.observer
        if next(model.parameters()).device.type == "meta":
            self.observer = FinetuneObserver()  # the skeleton repeats what the loaded model reports
        try:
            self.model = model
            with warnings.catch_warnings():
                if self.settings.quantize == "none":  # asked for explicitly; the plan already says so
                    warnings.simplefilter("ignore", NotQuantizedWarning)
                self.plan = prepare_for_sharding(model, upcast=self.settings.upcast)
            self.observer.on_plan(self.plan)
            FinetuneRun.adapt(self)
        finally:
            self.observer = reporting
        return self.model

    def prepare(self) -> None:
        """Done while loading (`prepare_and_adapt`): the sharded model is built prepared."""

    def adapt(self) -> None:
        """Done while loading (`prepare_and_adapt`): the sharded model is built adapted."""

    def complete_samples(self, stage: str) -> None:
        """Every rank generates (each forward gathers the units collectively); rank 0 keeps and reports."""
        for index, prompt in enumerate(self.settings.samples):
            completion = generate(self.model, self.tokenizer, prompt, self.settings.max_new_tokens)
            if self.main:
                self.samples[index][stage] = completion
                self.observer.on_sample(stage, prompt, completion)

    def train(self) -> None:
        """Train with `ShardedTraining`, from the resume checkpoint if there is one."""
        from ..training.sampling import pad_token_id
        from ..training.tensorboard_log import open_tensorboard
        from .loop import ShardedTraining

        self.loss_plan = ModelOwnLoss()  # type: ignore[assignment]  # LossPlan's reason/to_dict, no chunks
        if self.settings.loss != "full":
            self.observer.on_message(f"--loss {self.settings.loss}: --fsdp computes the model's own (full) loss")
        board = open_tensorboard(self.settings, self.folder.path, self.device, self.memory, self.main)  # --report-to
        training = ShardedTraining(self.model, self.data, self.settings, pad_token_id(self.tokenizer),
                                   self.folder.checkpoints_dir, on_checkpoint=self.folder.mark_checkpoint_complete,
                                   on_log=board.log_step if board is not None else None)
        if self.resume_from is not None:
            training.resume(self.resume_from)
        self.history = training.train(self.observer)
        if board is not None:
            board.close()
        self.peak = measured_peak(self.device)
        self.evaluations = []  # no evaluation under --fsdp (check_sharded_settings refuses eval rows)

    def measure_after(self) -> None:
        super().measure_after()
        self.adapter = adapter_state(self.model)  # collective: every rank takes part, rank 0 saves it

    def report(self) -> FinetuneReport:
        report = super().report()
        report.model["sharding"] = self.sharding
        return report

    def save_adapter(self, directory: Path) -> None:
        from .loop import save_adapter

        save_adapter(self.model, self.adapter, directory)
