"""`label_log_probs`: the log-probability of each position's label, through the chunked head.

A preference loss needs log p(label) per position, summed over each completion, not one
cross-entropy over the batch. The chunks are the same as the causal-LM loss's (`chunks`):
each chunk's logits (P, V) are computed in fp32, turned into the P log-probabilities and
freed; no (tokens x vocabulary) tensor exists in the forward or the backward pass.

The gradient of position i's log-probability depends on how the loss weighs it (g_i, known
only in the backward pass), but linearly::

    d loss / d h_i = g_i * (one_hot(label_i) - softmax(logits_i)) @ W

so the "fused" backward keeps d logp_i / d h_i (N x H, as the causal-LM loss keeps its
gradient) and scales its rows by g_i in the backward. A head whose own weights train (a
LoRA on the head, a trainable head) needs g before the chunk's logits are gone: its chunks
are recomputed in the backward pass, with the weights g.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .causal_lm import _captured_head_input, _check_targets, _chunk_inputs, _selected, _targets
from .chunks import _chunk_backward, _Grads, _head_logits, _Run, _Tensors
from .common import IGNORE_INDEX, LossInputError
from .plan import _resolve

__all__ = ["label_log_probs"]


def _chunk_log_probs(run: _Run, logits: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's log p(target) (P,) and, given the positions' weights, d(sum weights * logp)/d(head output)."""
    if run.transform is not None:
        logits.requires_grad_(weights is not None)
        with torch.set_grad_enabled(weights is not None):
            scores = run.transform(logits)
    else:
        scores = logits
    values = scores.detach()
    lse = torch.logsumexp(values, dim=-1)
    log_probs = values.gather(1, targets[:, None]).squeeze(1) - lse
    if weights is None:
        return log_probs, None
    # d logp / d scores = one_hot(target) - softmax; without a transform it overwrites the logits.
    grad = (values.sub_(lse[:, None]) if run.transform is None else values - lse[:, None]).exp_().neg_()
    grad[torch.arange(len(targets), device=targets.device), targets] += 1
    grad.mul_(weights[:, None])
    if run.transform is None:
        return log_probs, grad
    (grad_logits,) = torch.autograd.grad(scores, logits, grad)
    return log_probs, grad_logits


def _run_log_probs(run: _Run, hidden: torch.Tensor, tensors: _Tensors, needs: Sequence[bool] | None,
                   weights: torch.Tensor | None) -> tuple[torch.Tensor, _Grads | None]:
    """The log-probabilities of all selected positions (N,) and, with `needs`, the gradients weighted by `weights`."""
    grads = _Grads.zeros(hidden, tensors, needs) if needs is not None else None
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], run.chunk_tokens):
        rows = slice(start, start + run.chunk_tokens)
        h = hidden[rows]
        logits, autograd_pair = _head_logits(run, tensors, h, rows, grads is not None)
        chunk_weights = weights[rows] if grads is not None and weights is not None else None
        out[rows], grad_logits = _chunk_log_probs(run, logits, run.targets[rows], chunk_weights)
        if grads is not None and grad_logits is not None:
            _chunk_backward(run, tensors, grads, h, rows, grad_logits, autograd_pair)
        del logits, grad_logits, autograd_pair  # free the chunk before the next one
    return out, grads


class _ChunkedLogProbs(torch.autograd.Function):
    """Per-position log-probabilities over chunks (see the module docstring for the two backward passes)."""

    @staticmethod
    def forward(ctx: Any, run: _Run, fused: bool, hidden: torch.Tensor, *flat: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the chunks cast explicitly, as planned
            tensors = _Tensors.from_flat(flat, len(run.parts.adapters))
            needs = ctx.needs_input_grad[2:]
            ctx.run, ctx.inputs, ctx.grad_hidden = run, len(flat), None
            if fused and needs[0] and not any(needs[1:]):  # only the hidden states train: keep d logp_i / d h_i
                ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
                log_probs, grads = _run_log_probs(run, hidden, tensors, needs, ones)
                assert grads is not None
                ctx.grad_hidden = grads.hidden
                return log_probs
            if any(needs):
                ctx.save_for_backward(hidden, *flat)
            return _run_log_probs(run, hidden, tensors, None, None)[0]

    @staticmethod
    def backward(ctx: Any, grad_log_probs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grad_hidden is not None:
            grad_hidden, ctx.grad_hidden = ctx.grad_hidden, None
            scaled = grad_hidden.mul_(grad_log_probs[:, None].to(grad_hidden.dtype))
            return (None, None, scaled, *([None] * ctx.inputs))
        hidden, *flat = ctx.saved_tensors
        tensors = _Tensors.from_flat(flat, len(ctx.run.parts.adapters))
        with torch.autocast(hidden.device.type, enabled=False):
            _, grads = _run_log_probs(ctx.run, hidden, tensors, ctx.needs_input_grad[2:], grad_log_probs.float())
        assert grads is not None
        return (None, None, *grads.results(tensors))


def _full_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from the full logits in fp32, 0 where the target is -100."""
    logits = logits.float()
    keep = targets != IGNORE_INDEX
    _check_targets(targets[keep], logits.shape[-1])
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked * keep


def label_log_probs(model: nn.Module, batch: Mapping[str, Any], *, loss: str = "chunked",
                    backward: str = "fused") -> torch.Tensor:
    """Run `model` on `batch`; return log p(label) at each position, 0 where there is none, never holding the logits.

    The labels are shifted as the causal-LM loss shifts them: position t scores label t + 1,
    so `result.sum(-1)` is each row's log-probability of its labelled tokens.

    Args:
        model (nn.Module): a causal LM, bare or wrapped by peft.
        batch (Mapping[str, Any]): the model's inputs with `labels` (-100 where a token is
            not scored), e.g. input_ids, attention_mask, labels.
        loss (str): "chunked", or "full" to compute them from the model's full logits. Default: "chunked"
        backward (str): "fused" or "recompute" (see the module docstring). Default: "fused"

    Returns:
        torch.Tensor: (batch, positions) fp32 log-probabilities, differentiable.

    Raises:
        LossInputError: no labels, or labels outside the vocabulary or not one per input position.

    Example:
        >>> sequence_log_probs = label_log_probs(model, {"input_ids": ids, "labels": labels}).sum(-1)
    """
    inputs = dict(batch)
    targets = _targets(inputs.pop("labels", None), inputs.pop("shift_labels", None))
    resolved = _resolve(model, loss, backward)
    if resolved.plan.loss == "full":
        return _full_log_probs(model(**inputs).logits, targets.to(inputs["input_ids"].device))
    assert resolved.parts is not None
    with _captured_head_input(resolved.parts.module) as captured:
        model(**inputs)
    if len(captured) != 1:
        raise LossInputError(f"the LM head ran {len(captured)} times in this forward pass (once in the probe); "
                             "pass loss='full' for this model")
    hidden = captured[0]
    selected, wanted = _selected(hidden, targets)
    _check_targets(wanted, resolved.plan.vocab_size)
    run, tensors = _chunk_inputs(resolved, selected, wanted, 1.0)
    values = _ChunkedLogProbs.apply(run, resolved.plan.backward == "fused", selected, *tensors.flat())
    flat = targets.reshape(-1).to(hidden.device)
    index = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=hidden.device).index_put((index,), values)
    return out.view(targets.shape)
