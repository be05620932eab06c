"""The chunk loop and its autograd Function: each chunk's logits, loss and gradients, then freed.

In the "fused" backward each chunk's gradient is computed while its logits exist (in the
forward pass); "recompute" keeps only the inputs and recomputes the chunks in the backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .head import _HeadParts


@dataclasses.dataclass
class _Tensors:
    """The tensors the loss differentiates, by role; gradients use the same layout.

    They reach the autograd Function as arguments in `flat()` order and are rebuilt
    from them by `from_flat`.
    """

    weight: torch.Tensor | None  # the base's plain (V, H) weight
    bias: torch.Tensor | None
    downs: list[torch.Tensor | None]  # per adapter: lora_A(dropout(x)) on the selected positions, (N, r)
    ups: list[torch.Tensor | None]  # per adapter: lora_B's weight, (V, r)
    up_biases: list[torch.Tensor | None]
    module_params: list[torch.Tensor | None]  # trainable parameters of a head called as a module

    def flat(self) -> list[torch.Tensor | None]:
        return [self.weight, self.bias, *self.downs, *self.ups, *self.up_biases, *self.module_params]

    @classmethod
    def from_flat(cls, flat: Sequence[torch.Tensor | None], adapters: int) -> _Tensors:
        k = adapters
        return cls(flat[0], flat[1], list(flat[2:2 + k]), list(flat[2 + k:2 + 2 * k]),
                   list(flat[2 + 2 * k:2 + 3 * k]), list(flat[2 + 3 * k:]))


@dataclasses.dataclass
class _Grads:
    """Gradients accumulated over the chunks: the hidden states' in their dtype, the others in fp32."""

    hidden: torch.Tensor | None
    of: _Tensors

    @classmethod
    def zeros(cls, hidden: torch.Tensor, tensors: _Tensors, needs: Sequence[bool]) -> _Grads:
        buffers = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if t is not None and need else None
                   for t, need in zip(tensors.flat(), needs[1:], strict=True)]
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        return cls(grad_hidden, _Tensors.from_flat(buffers, len(tensors.downs)))

    def results(self, tensors: _Tensors) -> tuple[torch.Tensor | None, ...]:
        """One gradient per Function input (hidden states first), each in its input's dtype."""
        return (self.hidden, *(g.to(t.dtype) if g is not None and t is not None else None
                               for g, t in zip(self.of.flat(), tensors.flat(), strict=True)))


@dataclasses.dataclass
class _Run:
    """One loss call's fixed parts: the head, the transform, the targets, the chunking, the scale."""

    parts: _HeadParts
    transform: Callable[[torch.Tensor], torch.Tensor] | None  # None: the logits are used as they are
    targets: torch.Tensor  # (N,) token ids of the selected positions
    scale: float  # 1 / what the summed loss is divided by
    chunk_tokens: int
    weight_rows: int  # head rows per matmul piece (all of them when nothing is upcast)
    compute_dtype: torch.dtype | None  # the head's matmul dtype; None: the head is called as a module


def _head_logits(run: _Run, tensors: _Tensors, h: torch.Tensor, rows: slice,
                 grad: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The chunk's head output in fp32 (P, V_head); for a module head also (its input leaf, its output)."""
    autograd_pair = None
    if run.compute_dtype is None:
        leaf = h.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = run.parts.base(leaf)
        logits = out.detach().to(torch.float32, copy=True)  # a copy: the softmax is taken in place
        autograd_pair = (leaf, out) if grad else None
    else:
        logits = _linear_logits(run, tensors, h)
    pieces = zip(run.parts.adapters, tensors.downs, tensors.ups, tensors.up_biases, strict=True)
    for adapter, down, up, up_bias in pieces:
        assert down is not None and up is not None
        logits.addmm_(down[rows].detach().float(), up.detach().float().t(), alpha=adapter.scaling)
        if up_bias is not None:
            logits.add_(up_bias.detach().float(), alpha=adapter.scaling)
    return logits, autograd_pair


def _linear_logits(run: _Run, tensors: _Tensors, h: torch.Tensor) -> torch.Tensor:
    assert tensors.weight is not None and run.compute_dtype is not None
    weight, dtype = tensors.weight.detach(), run.compute_dtype
    bias = tensors.bias.detach().to(dtype) if tensors.bias is not None else None
    x = h.detach().to(dtype)
    rows = weight.shape[0]
    if run.weight_rows >= rows:
        return nn.functional.linear(x, weight.to(dtype), bias).float()
    logits = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
    for start in range(0, rows, run.weight_rows):  # upcast one piece of the head at a time
        piece = slice(start, start + run.weight_rows)
        logits[:, piece] = nn.functional.linear(x, weight[piece].to(dtype), bias[piece] if bias is not None else None)
    return logits


def _cross_entropy(run: _Run, logits: torch.Tensor, targets: torch.Tensor,
                   grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's summed loss and, if asked, the gradient of the scaled loss w.r.t. the head output."""
    if run.transform is not None:
        logits.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            scores = run.transform(logits)
    else:
        scores = logits
    values = scores.detach()
    lse = torch.logsumexp(values, dim=-1)
    loss = (lse - values.gather(1, targets[:, None]).squeeze(1)).sum(dtype=torch.float64)
    if not grad:
        return loss, None
    # d(loss)/d(scores) = softmax - one_hot(target); without a transform it overwrites the logits.
    probabilities = (values.sub_(lse[:, None]) if run.transform is None else values - lse[:, None]).exp_()
    probabilities[torch.arange(len(targets), device=targets.device), targets] -= 1
    probabilities.mul_(run.scale)
    if run.transform is None:
        return loss, probabilities
    (grad_logits,) = torch.autograd.grad(scores, logits, probabilities)
    return loss, grad_logits


def _adapters_backward(run: _Run, tensors: _Tensors, grads: _Grads, rows: slice, grad_logits: torch.Tensor) -> None:
    """LoRA on the head: logits += scaling * down @ up.T (+ scaling * up_bias)."""
    slots = zip(run.parts.adapters, tensors.downs, tensors.ups, grads.of.downs, grads.of.ups, grads.of.up_biases,
                strict=True)
    for adapter, down, up, grad_down, grad_up, grad_up_bias in slots:
        assert down is not None and up is not None
        if grad_down is not None:
            grad_down[rows] = (grad_logits @ up.detach().float()).mul_(adapter.scaling)
        if grad_up is not None:
            grad_up.addmm_(grad_logits.t(), down[rows].detach().float(), alpha=adapter.scaling)
        if grad_up_bias is not None:
            grad_up_bias.add_(grad_logits.sum(0), alpha=adapter.scaling)


def _linear_backward(run: _Run, tensors: _Tensors, grads: _Grads, h: torch.Tensor, rows: slice,
                     grad_logits: torch.Tensor) -> None:
    assert tensors.weight is not None and run.compute_dtype is not None
    weight, dtype, grad_weight = tensors.weight.detach(), run.compute_dtype, grads.of.weight
    if grads.of.bias is not None:
        grads.of.bias.add_(grad_logits.sum(0))
    x = h.detach().to(dtype)
    if run.weight_rows >= weight.shape[0]:
        if grads.hidden is not None:
            grads.hidden[rows] = grad_logits.to(dtype) @ weight.to(dtype)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), x.float())
        return
    grad_h = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32, device=x.device)
    for start in range(0, weight.shape[0], run.weight_rows):  # the same pieces as the forward
        piece = slice(start, start + run.weight_rows)
        grad_h += grad_logits[:, piece].to(dtype) @ weight[piece].to(dtype)
        if grad_weight is not None:
            grad_weight[piece].addmm_(grad_logits[:, piece].t(), x.float())
    if grads.hidden is not None:
        grads.hidden[rows] = grad_h


def _module_backward(tensors: _Tensors, grads: _Grads, rows: slice, grad_logits: torch.Tensor,
                     leaf: torch.Tensor, out: torch.Tensor) -> None:
    """A head called as a module: autograd through the chunk's own call."""
    pairs = zip(tensors.module_params, grads.of.module_params, strict=True)
    wanted = [(param, grad) for param, grad in pairs if grad is not None]
    inputs = ([leaf] if grads.hidden is not None else []) + [param for param, _ in wanted if param is not None]
    if not inputs:
        return
    results = list(torch.autograd.grad(out, inputs, grad_logits.to(out.dtype), allow_unused=True))
    if grads.hidden is not None:
        grads.hidden[rows] = results.pop(0)
    for (_, grad), value in zip(wanted, results, strict=True):
        if grad is not None and value is not None:
            grad.add_(value.float())


def _chunk_backward(run: _Run, tensors: _Tensors, grads: _Grads, h: torch.Tensor, rows: slice,
                    grad_logits: torch.Tensor, autograd_pair: Any) -> None:
    """One chunk's share of the gradients, from its logits' gradient: the adapters', then the head's and h's."""
    _adapters_backward(run, tensors, grads, rows, grad_logits)
    if autograd_pair is not None:
        _module_backward(tensors, grads, rows, grad_logits, *autograd_pair)
    else:
        _linear_backward(run, tensors, grads, h, rows, grad_logits)


def _run_chunks(run: _Run, hidden: torch.Tensor, tensors: _Tensors,
                needs: Sequence[bool] | None) -> tuple[torch.Tensor, _Grads | None]:
    """The scaled loss over all chunks and, when `needs` is given, the scaled gradients."""
    grads = _Grads.zeros(hidden, tensors, needs) if needs is not None else None
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], run.chunk_tokens):
        rows = slice(start, start + run.chunk_tokens)
        h = hidden[rows]
        logits, autograd_pair = _head_logits(run, tensors, h, rows, grads is not None)
        loss, grad_logits = _cross_entropy(run, logits, run.targets[rows], grads is not None)
        total += loss
        if grads is not None and grad_logits is not None:
            _chunk_backward(run, tensors, grads, h, rows, grad_logits, autograd_pair)
        del logits, grad_logits, autograd_pair  # free the chunk before the next one
    return (total * run.scale).float(), grads


class _ChunkedLoss(torch.autograd.Function):
    """The loss over chunks; its backward returns the gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, run: _Run, fused: bool, hidden: torch.Tensor, *flat: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the chunks cast explicitly, as planned
            return _ChunkedLoss._forward(ctx, run, fused, hidden, flat)

    @staticmethod
    def _forward(ctx: Any, run: _Run, fused: bool, hidden: torch.Tensor,
                 flat: Sequence[torch.Tensor | None]) -> torch.Tensor:
        tensors = _Tensors.from_flat(flat, len(run.parts.adapters))
        ctx.run, ctx.fused = run, fused
        needs = ctx.needs_input_grad[2:]
        if fused and any(needs):
            loss, grads = _run_chunks(run, hidden, tensors, needs)
            assert grads is not None
            ctx.grads = grads.results(tensors)
            return loss
        if any(needs):
            ctx.save_for_backward(hidden, *flat)
        return _run_chunks(run, hidden, tensors, None)[0]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.fused:
            results, ctx.grads = ctx.grads, None
        else:  # recompute each chunk's logits, now with their gradients
            hidden, *flat = ctx.saved_tensors
            tensors = _Tensors.from_flat(flat, len(ctx.run.parts.adapters))
            with torch.autocast(hidden.device.type, enabled=False):
                _, grads = _run_chunks(ctx.run, hidden, tensors, ctx.needs_input_grad[2:])
            assert grads is not None
            results = grads.results(tensors)
        if not bool(grad_loss == 1):  # the Trainer passes 1; scaling then would only copy
            results = tuple(g * grad_loss.to(g.dtype) if g is not None else None for g in results)
        return (None, None, *results)
