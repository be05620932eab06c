"""`ChunkedLossMixin`: a transformers Trainer that trains with `causal_lm_loss`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .causal_lm import causal_lm_loss


class ChunkedLossMixin:
    """Mix into a transformers `Trainer` (or TRL's `SFTTrainer`) to train with `causal_lm_loss`.

    `class Trainer(ChunkedLossMixin, transformers.Trainer): pass` trains with the chunked
    loss, normalised exactly as the Trainer normalises its own (gradient accumulation and
    `average_tokens_across_devices` included). Evaluation that needs logits (a
    `compute_metrics`) gets the parent's full forward. Set `loss_mode = "full"` to compare.

    Example:
        >>> class Trainer(ChunkedLossMixin, transformers.Trainer):
        ...     pass
        >>> Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    """

    loss_mode: str = "chunked"
    loss_backward: str = "fused"
    args: Any  # the Trainer's
    accelerator: Any

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        # TRL's SFTTrainer marks evaluation batches with this key for its own compute_loss.
        loss_only = inputs.get("_prediction_loss_only") or getattr(self.args, "prediction_loss_only", False)
        if "labels" not in inputs or (return_outputs and not loss_only):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        inputs = {key: value for key, value in inputs.items() if key != "_prediction_loss_only"}
        value, outputs = causal_lm_loss(model, inputs, num_items_in_batch=num_items_in_batch, loss=self.loss_mode,
                                        backward=self.loss_backward, return_outputs=True)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            value = value * self._loss_processes()
        return (value, outputs) if return_outputs else value

    def _loss_processes(self) -> int:
        """The factor the Trainer multiplies a token-averaged loss by (its `compute_loss`'s rule)."""
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        tensor_parallel = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // tensor_parallel
