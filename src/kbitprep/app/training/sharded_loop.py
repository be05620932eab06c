"""The training phase of `finetune --fsdp`: a plain loop over an FSDP2-sharded model.

The transformers Trainer cannot drive a model that kbitprep shards itself (on CPU its
FSDP does not engage, and without it accelerate wraps the model in DDP), so this loop
does the Trainer's job with the Trainer's defaults: the run's optimizer as the Trainer
builds it (`kbitprep.app.config.optimizer`), the run's learning-rate schedule
(`kbitprep.app.config.schedule`), gradients clipped to norm 1, the loss of
`kbitprep.causal_lm_loss` (chunked unless `--loss full`), the example order of
`order.global_order`, and the run's step hooks (`hooks`: divergence, evaluation,
progress, TensorBoard, checkpoint markers) at the points where the Trainer calls them.

One optimizer step on N processes computes exactly what one process computes on the
same global batch, up to float summation order::

    global batch = batch_size x grad_accum x N examples, in a seeded order per epoch
    rank r, micro-batch m takes  order[step*G + (m*N + r)*batch_size : ... + batch_size]
    loss = sum of token losses on this rank / label tokens in the whole global batch
    FSDP sums the gradients (divide factor 1), so they are the global batch's mean

Checkpoints hold the adapter (gathered, whole), the optimizer state (gathered, whole),
the step, the log (steps and evaluations) and every rank's random state; rank 0 writes them and
reads them back on resume, so the output folder need only be on rank 0's storage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...errors import KbitPrepError
from ..config.schedule import schedule
from ..data.packing import PackedData
from ..data.rows import IGNORE_INDEX
from ..data.tokenize import CausalLMCollator, TokenizedData
from ..distributed.fsdp import adapter_state, send_rows
from .hooks import StepHook, StepHooks, StepState
from .order import global_order, rank_batches

__all__ = ["MAX_GRAD_NORM", "ShardedTraining", "ShardedTrainingError"]

Examples = TokenizedData | PackedData
TRAINING_STATE = "training_state.pt"
ADAPTER = "adapter"
MAX_GRAD_NORM = 1.0


class ShardedTrainingError(KbitPrepError, ValueError):
    """The sharded run cannot go ahead as asked; the message names the setting to change."""


class ShardedTraining:
    """Trains the LoRA adapters of a sharded model; one object per run.

    Args:
        model (nn.Module): the model from `kbitprep.app.distributed.fsdp.load_sharded`.
        data (TokenizedData | PackedData): the training examples (tokenized, or packed with --pack).
        settings (Any): the run's settings (batch_size, grad_accum, lr, max_steps, epochs,
            seed, save_steps, loss, lr_scheduler, ...).
        pad_token_id (int): the padding token.
        checkpoints (Path): where checkpoints go (`checkpoint-<step>` folders).
        hooks (StepHook | None): the run's step hooks (see `hooks`). Default: None
    """

    def __init__(self, model: nn.Module, data: Examples, settings: Any, pad_token_id: int,
                 checkpoints: Path, hooks: StepHook | None = None) -> None:
        self.model, self.data, self.settings = model, data, settings
        self.collate = CausalLMCollator(pad_token_id)
        self.checkpoints = Path(checkpoints)
        self.hooks = hooks if hooks is not None else StepHooks([])
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = next(p.device for p in model.parameters())
        self.per_step = settings.batch_size * settings.grad_accum * self.world
        self.steps_per_epoch = len(data) // self.per_step
        if self.steps_per_epoch == 0:
            raise ShardedTrainingError(
                f"one optimizer step takes {self.per_step} examples (--batch-size {settings.batch_size} x "
                f"--grad-accum {settings.grad_accum} x {self.world} processes) but the data has {len(data)}; "
                "lower --batch-size or --grad-accum, or use fewer processes")
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        self.step = 0
        self.log: list[dict[str, float]] = []  # each step's entry and each evaluation's, as the Trainer's log
        self._set_up_optimizer()

    def _set_up_optimizer(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        from ..config.optimizer import make_optimizer

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # the loss is already divided by the global token count
                module.set_force_sum_reduction_for_comms(True)  # a plain sum, which gloo has (no PREMUL_SUM)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], self.settings,
                                        model=self.model)
        self.scheduler = schedule(self.optimizer, self.settings, self.total_steps)

    @property
    def state(self) -> StepState:
        """Where training stands, for the hooks."""
        return StepState(step=self.step, total_steps=self.total_steps, model=self.model, main=self.rank == 0)

    # --- one step ----------------------------------------------------------------------

    def _micro_batches(self) -> list[dict[str, Any]]:
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        order = global_order(len(self.data), self.settings.seed, epoch)
        indices = rank_batches(order, step_in_epoch, batch_size=self.settings.batch_size,
                               grad_accum=self.settings.grad_accum, rank=self.rank, world=self.world)
        return [{key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                 for key, value in self.collate([self.data[i] for i in batch]).items()} for batch in indices]

    def _global_tokens(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """Label tokens that count towards the loss in the whole global batch (every rank, every micro-batch)."""
        local = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
        count = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(count)
        return count.to(torch.float32).clamp_min(1.0).reshape(())

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its log entry (step, loss: the global batch's mean token loss,
        learning_rate, grad_norm before clipping)."""
        from ...loss import causal_lm_loss

        self.model.train()
        batches = self._micro_batches()
        tokens = self._global_tokens(batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:  # each loss: this rank's token losses / the global batch's tokens
            loss = causal_lm_loss(self.model, batch, num_items_in_batch=tokens, loss=self.settings.loss)
            assert isinstance(loss, torch.Tensor)
            loss.backward()
            total += loss.detach().to(torch.float64)
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over sharded gradients
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        self.step += 1
        return {"step": self.step, "loss": float(total), "learning_rate": float(learning_rate),
                "grad_norm": float(norm)}

    def train(self) -> list[dict[str, float]]:
        """Train to `total_steps`, calling the hooks and checkpointing every `save_steps`; returns the log."""
        self.hooks.on_train_begin(self.state)
        while self.step < self.total_steps:
            entries = [self.train_step()]
            self.hooks.on_step(self.state, entries)  # a hook that raises stops the run before this checkpoint
            self.log.extend(entries)
            if self.step % self.settings.save_steps == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        self.hooks.on_train_end(self.state)
        return self.log

    # --- checkpoints ---------------------------------------------------------------------

    def _full_optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<step>` (collective: every rank must call it); rank 0 writes the files."""
        adapter = adapter_state(self.model)
        optimizer = self._full_optimizer_state()
        rng = [None] * self.world
        dist.all_gather_object(rng, _rng_state())
        folder = self.checkpoints / f"checkpoint-{self.step}"
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            save_adapter(self.model, adapter, folder / ADAPTER)
            torch.save({"step": self.step, "log": self.log, "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(), "rng": rng, "world_size": self.world},
                       folder / TRAINING_STATE)
        dist.barrier()
        self.hooks.on_checkpoint(self.state, folder)  # every rank has written its part
        return folder

    def resume(self, checkpoint: Path) -> None:
        """Continue from a checkpoint that rank 0 can read: adapter, optimizer, schedule, step, random state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state = torch.load(Path(checkpoint) / TRAINING_STATE, weights_only=False) if self.rank == 0 else None
        adapter = load_adapter_tensors(Path(checkpoint) / ADAPTER, self.model) if self.rank == 0 else None
        shared: list[Any] = [None if state is None else {k: v for k, v in state.items() if k != "optimizer"}]
        dist.broadcast_object_list(shared, src=0)
        meta = shared[0]
        if meta["world_size"] != self.world:
            raise ShardedTrainingError(f"{checkpoint}: written by {meta['world_size']} processes, resumed with "
                                       f"{self.world}; resume with --nproc_per_node {meta['world_size']}")
        set_trainable(self.model, adapter)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"] if state is not None else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.log = meta["step"], list(meta["log"])
        _set_rng_state(meta["rng"][self.rank])


def _rng_state() -> dict[str, Any]:
    """This process's random state: the CPU generator's and, with an accelerator, its device generator's."""
    from ...device import accelerator

    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    found = accelerator()
    if found is not None and hasattr(getattr(torch, found.type, None), "get_rng_state"):
        state[found.type] = getattr(torch, found.type).get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    for device_type, device_state in state.items():
        if device_type != "cpu":
            getattr(torch, device_type).set_rng_state(device_state)


def save_adapter(model: Any, adapter: dict[str, torch.Tensor], directory: Path) -> None:
    """Save a PeftModel's adapter from its gathered trainable tensors (rank 0 only)."""
    model.save_pretrained(str(directory), state_dict=adapter)


def load_adapter_tensors(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors, keyed as `model.named_parameters()` names them."""
    from peft.utils import load_peft_weights

    saved = load_peft_weights(str(directory), device="cpu")
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    by_saved_key = {name.replace(".default.", "."): name for name in names}
    return {by_saved_key[key]: value for key, value in saved.items()}


def set_trainable(model: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """Copy whole trainable tensors from rank 0 into every rank's shards (collective)."""

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param.data
        mine = send_rows(None if tensors is None else tensors[name], tuple(param.shape), param.dtype, local.device)
        with torch.no_grad():
            local.copy_(mine.reshape(local.shape))
