"""`causal_lm_loss`: a model's causal-LM loss on a batch, chunked where the plan allows, else full."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .chunks import _ChunkedLoss, _Run, _Tensors
from .common import IGNORE_INDEX, LossInputError
from .plan import _resolve, _Resolved
from .transforms import _config_value


def _targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """The label each position predicts: the next token's (the last position predicts nothing)."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise LossInputError("the batch has no 'labels': a causal-LM loss needs them (-100 where a "
                             "position is not trained); pass the batch your collator builds")
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _denominator(targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> float:
    """What the summed loss is divided by, as the transformers Trainer divides it."""
    if num_items_in_batch is not None:
        return float(num_items_in_batch)
    return float((targets != IGNORE_INDEX).sum())


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() and (int(targets.max()) >= vocab_size or int(targets.min()) < 0):
        bad = int(targets.max()) if int(targets.max()) >= vocab_size else int(targets.min())
        raise LossInputError(f"the labels hold token id {bad}, outside the model's vocabulary of {vocab_size} "
                             f"(0-{vocab_size - 1}, or {IGNORE_INDEX} to skip a position); check that the "
                             "tokenizer belongs to the model")


def _full_loss(logits: torch.Tensor, targets: torch.Tensor,
               num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """transformers' causal-LM loss: fp32 logits, cross-entropy summed / num_items_in_batch, else the mean."""
    logits = logits.float()
    flat = targets.reshape(-1).to(logits.device)
    _check_targets(flat[flat != IGNORE_INDEX], logits.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                                       reduction=reduction)
    return loss / _denominator(flat, num_items_in_batch) if num_items_in_batch is not None else loss


@contextlib.contextmanager
def _captured_head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, the head receives none of its positions and its input is kept for the loss.

    The model's forward then runs as usual up to the head, and everything after it (the
    logits transform, any loss it computes) works on an empty (..., 0, V) tensor.
    """
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0].narrow(-2, 0, 0), *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def _selected(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states (N, H) and targets (N,) of the positions that are trained."""
    if hidden.shape[:-1] != targets.shape:
        raise LossInputError(f"the LM head's input has positions {tuple(hidden.shape[:-1])} but the labels "
                             f"{tuple(targets.shape)}; pass labels with one entry per input token")
    flat = targets.reshape(-1).to(hidden.device)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), flat.index_select(0, index)


def _chunk_inputs(resolved: _Resolved, selected: torch.Tensor, wanted: torch.Tensor,
                  scale: float) -> tuple[_Run, _Tensors]:
    """The chunk loop's fixed parts and differentiated tensors for the selected positions (N, H) and targets (N,)."""
    plan, parts = resolved.plan, resolved.parts
    assert parts is not None  # a chunked plan always has its parts
    tensors = _Tensors(
        parts.weight, parts.bias,
        downs=[adapter.down(selected.to(adapter.dtype)) for adapter in parts.adapters],
        ups=[adapter.up.weight for adapter in parts.adapters],
        up_biases=[adapter.up.bias for adapter in parts.adapters],
        module_params=[p for p in parts.base.parameters() if p.requires_grad] if parts.weight is None else [],
    )
    run = _Run(parts, resolved.transform, wanted, scale, plan.chunk_tokens, plan.weight_rows or plan.head_rows,
               getattr(torch, plan.compute_dtype) if parts.weight is not None else None)
    return run, tensors


def _chunked_value(resolved: _Resolved, hidden: torch.Tensor, targets: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    selected, wanted = _selected(hidden, targets)
    _check_targets(wanted, resolved.plan.vocab_size)
    denominator = _denominator(wanted, num_items_in_batch)
    run, tensors = _chunk_inputs(resolved, selected, wanted, 1.0 / denominator if denominator else math.nan)
    return _ChunkedLoss.apply(run, resolved.plan.backward == "fused", selected, *tensors.flat())


def _router_loss(outputs: Any, lm: nn.Module) -> torch.Tensor | float:
    """A mixture-of-experts model's load-balancing loss, added as the model adds it when given labels."""
    aux = getattr(outputs, "aux_loss", None)
    coefficient = getattr(lm, "router_aux_loss_coef", None) or _config_value(getattr(lm, "config", None),
                                                                             "router_aux_loss_coef")
    return coefficient * aux if aux is not None and coefficient else 0.0


def causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    loss: str = "chunked",
    backward: str = "fused",
    return_outputs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Run `model` on `batch` and return its causal-LM loss, never holding the full logits.

    The forward pass runs as usual up to the LM head; the head and the cross-entropy then
    run over chunks of the positions whose label is not -100 (see the module docstring).
    The value equals transformers' own loss: summed over trained tokens and divided by
    `num_items_in_batch` when it is given (gradient accumulation, as the Trainer passes it),
    else the mean. Where the model's head cannot be split (`plan_loss(model).reason`), the
    full logits are computed and the same loss taken from them.

    Args:
        model (nn.Module): a causal LM, bare or wrapped by peft and/or DDP.
        batch (Mapping[str, Any]): the model's inputs with `labels` (or `shift_labels`),
            e.g. input_ids, attention_mask, labels.
        num_items_in_batch (torch.Tensor | int | None): trained tokens in the whole
            accumulated batch. Default: None
        loss (str): "chunked", or "full" for the model's full logits. Default: "chunked"
        backward (str): "fused" or "recompute" (see `LossPlan.backward`). Default: "fused"
        return_outputs (bool): also return the model's outputs; their `logits` are empty
            (no positions) under the chunked loss. Default: False

    Returns:
        torch.Tensor | tuple[torch.Tensor, Any]: the scalar fp32 loss, and the outputs if asked.

    Raises:
        LossInputError: no labels, labels outside the vocabulary or not one per input
            position, or an unknown `loss`/`backward`.

    Example:
        >>> loss = causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        >>> loss.backward()
    """
    inputs = dict(batch)
    targets = _targets(inputs.pop("labels", None), inputs.pop("shift_labels", None))
    resolved = _resolve(model, loss, backward)
    if resolved.plan.loss == "full":
        outputs = model(**inputs)
        value = _full_loss(outputs.logits, targets, num_items_in_batch)
    else:
        assert resolved.parts is not None
        with _captured_head_input(resolved.parts.module) as captured:
            outputs = model(**inputs)
        if len(captured) != 1:
            raise LossInputError(f"the LM head ran {len(captured)} times in this forward pass (once in the probe); "
                                 "pass loss='full' for this model")
        value = _chunked_value(resolved, captured[0], targets, num_items_in_batch)
    value = value + _router_loss(outputs, resolved.lm)
    return (value, outputs) if return_outputs else value
