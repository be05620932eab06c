"""The losses of a training step, as the memory model runs them on meta tensors.

"full" is the transformers model's own loss: it runs on meta tensors as it is (the full
logits, their fp32 copy, the log-softmax and, in the backward pass, their gradients).

"chunked" is `kbitprep.loss` (`causal_lm_loss`), which cannot run on meta tensors as
it is: it probes the model with real numbers to learn what it does to its logits, and
selects the trained positions by their labels' values. Its memory is reproduced from what
it declares instead: the model runs up to the LM head (which receives no positions, as the
loss arranges it), the trained positions' hidden states are selected (every position but
each row's last, as for full-length rows of trained text), and the loss allocates what
`LossPlan.working_bytes` says: the gradient of the selected states, computed in the
forward pass ("fused") or in the backward pass ("recompute"), and one chunk's working set
(`LossPlan.chunk_bytes`) while it runs. The plan is the loss's own sizing rule applied to
the meta model's head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["LOSSES", "chunked_loss_plan", "simulated_loss"]


def _full(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    return model(**batch).loss


def _unwrap(model: nn.Module) -> Any:  # a transformers model: typed loosely, its methods come from mixins
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _logit_transform(config: Any) -> str:
    """The name of the first `LOGIT_TRANSFORMS` row whose config attributes are all set ("none" at worst)."""
    from ...loss import LOGIT_TRANSFORMS

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for row in LOGIT_TRANSFORMS:
        values = [getattr(text, name, None) if getattr(config, name, None) is None else getattr(config, name)
                  for name in row.attributes]
        if all(value is not None and not isinstance(value, bool) for value in values):
            return row.name
    return "none"


def chunked_loss_plan(model: nn.Module, device: str, backward: str = "fused") -> Any:
    """The `LossPlan` the chunked loss makes for this model on `device`, from its structure alone.

    The head's rows and width, whether its weight is a plain matrix the chunks multiply (else
    the head is called per chunk), the dtype the device multiplies it in (`kbitprep.precision.planned_compute_dtype`)
    and the chunk size that follows (`CHUNK_LOGITS` values of logits, at least
    `AMORTIZE_TOKENS` positions when the head is re-read per chunk).
    """
    from ...backends import is_plain_tensor
    from ...loss import AMORTIZE_TOKENS, CHUNK_LOGITS, WEIGHT_PIECE, LossPlan
    from ...precision import planned_compute_dtype

    lm = _unwrap(model)
    head = lm.get_output_embeddings()
    base = getattr(head, "base_layer", head)  # a LoRA on the head wraps it
    weight: Any = getattr(base, "weight", None)
    plain = isinstance(base, nn.Linear) and isinstance(weight, torch.Tensor) and is_plain_tensor(weight)
    rows = weight.shape[0] if plain else base.out_features
    width = weight.shape[1] if plain else base.in_features
    dtype = planned_compute_dtype(weight.dtype, device) if plain else None
    converted = plain and dtype != weight.dtype
    chunk = max(1, CHUNK_LOGITS // rows)
    hidden = lm.get_input_embeddings().weight.dtype
    return LossPlan(
        loss="chunked", backward=backward, logits_transform=_logit_transform(lm.config), head_rows=int(rows),
        vocab_size=int(rows), hidden_size=int(width), hidden_itemsize=hidden.itemsize,
        compute_dtype=str(dtype).removeprefix("torch.") if dtype is not None else "module's own",
        chunk_tokens=max(chunk, AMORTIZE_TOKENS) if converted or not plain else chunk,
        weight_rows=max(1, WEIGHT_PIECE // int(width)) if converted else None,
    )


class _Chunks(torch.autograd.Function):
    """What the chunked loss allocates, and when: its gradient buffer and one chunk at a time."""

    @staticmethod
    def forward(ctx: Any, plan: Any, head: nn.Module, config: Any, selected: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.head, ctx.config, ctx.targets = plan, head, config, targets  # targets live until the backward
        if plan.backward == "fused":
            ctx.grad = torch.empty_like(selected)  # the selected states' gradient, filled chunk by chunk
        else:
            ctx.save_for_backward(selected)
        _one_chunk(plan, head, config, selected, targets, grad=plan.backward == "fused")
        return torch.zeros((), dtype=torch.float64, device=selected.device).float()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.plan.backward == "fused":
            grad, ctx.grad = ctx.grad, None
            return None, None, None, grad, None
        (selected,) = ctx.saved_tensors
        grad = torch.empty_like(selected)
        _one_chunk(ctx.plan, ctx.head, ctx.config, selected, ctx.targets, grad=True)
        return None, None, None, grad, None


def _transform(plan: Any, config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    from ...loss import LOGIT_TRANSFORMS

    if plan.logits_transform == "none":
        return None
    row = next(row for row in LOGIT_TRANSFORMS if row.name == plan.logits_transform)
    values = [getattr(config, name, None) or getattr(config.get_text_config(), name) for name in row.attributes]
    return lambda logits: row.apply(logits, *values)


def _one_chunk(plan: Any, head: nn.Module, config: Any, selected: torch.Tensor, targets: torch.Tensor, *,
               grad: bool) -> None:
    """The first chunk, computed as `kbitprep.loss` computes each chunk: the peak of any one of them."""
    rows = slice(0, plan.chunk_tokens)
    h, wanted = selected[rows], targets[rows]
    base: Any = getattr(head, "base_layer", head)
    if plan.compute_dtype in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, plan.compute_dtype)
        x, weight = h.to(dtype), base.weight.detach()
        logits = _linear_logits(plan, x, weight, dtype)
    else:  # a head the loss calls as a module, on the chunk
        x, weight, dtype = h, None, None
        logits = base(h).detach().to(torch.float32, copy=True)
    transform = _transform(plan, config)
    scores = logits.requires_grad_(grad) if transform is not None else logits
    if transform is not None:
        with torch.set_grad_enabled(grad):
            scores = transform(logits)
    values = scores.detach()
    lse = torch.logsumexp(values, dim=-1)
    loss = (lse - values.gather(1, wanted[:, None]).squeeze(1)).sum(dtype=torch.float64)
    if not grad:
        return
    probabilities = (values.sub_(lse[:, None]) if transform is None else values - lse[:, None]).exp_()
    grad_logits = probabilities if transform is None else torch.autograd.grad(scores, logits, probabilities)[0]
    if weight is not None:
        _linear_backward(plan, x, weight, dtype, grad_logits)
    del loss


def _linear_backward(plan: Any, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                     grad_logits: torch.Tensor) -> None:
    """The chunk's gradient of its states, as `kbitprep.loss` computes it: whole, or one upcast piece at a time.

    Upcast in pieces, the gradient is an fp32 (P x H) sum of each piece's (P x rows) gradient
    columns times that piece of the head: one piece is enough, as every piece is the same size.
    """
    if plan.weight_rows is None or plan.weight_rows >= weight.shape[0]:
        grad_h = grad_logits.to(dtype) @ weight.to(dtype)
        del grad_h
        return
    piece = slice(0, plan.weight_rows)
    grad_h = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32, device=x.device)
    grad_h += grad_logits[:, piece].to(dtype) @ weight[piece].to(dtype)
    del grad_h


def _linear_logits(plan: Any, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if plan.weight_rows is None or plan.weight_rows >= weight.shape[0]:
        return nn.functional.linear(x, weight.to(dtype)).float()
    logits = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    piece = slice(0, plan.weight_rows)  # the head is upcast one piece at a time: one piece is the most held
    logits[:, piece] = nn.functional.linear(x, weight[piece].to(dtype))
    return logits


def _head_input(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model run up to its LM head, which receives no positions (as the chunked loss arranges it); its input."""
    head = _unwrap(model).get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0].narrow(-2, 0, 0), *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        model(input_ids=batch["input_ids"])
    finally:
        handle.remove()
    return captured[0]


def _trained(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained positions' states (N, H) and targets (N,): every position but each row's last, as for
    full-length rows of trained text."""
    rows, length, width = hidden.shape
    trained = rows * (length - 1)
    index = torch.empty(trained, dtype=torch.long, device=hidden.device)  # the positions' index, their targets
    targets = torch.empty(trained, dtype=torch.long, device=hidden.device)
    return hidden.reshape(-1, width).index_select(0, index), targets


def _chunked(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    lm = _unwrap(model)
    selected, targets = _trained(_head_input(model, batch))
    return _Chunks.apply(chunked_loss_plan(model, device), lm.get_output_embeddings(), lm.config, selected, targets)


class _LogProbChunks(torch.autograd.Function):
    """What `kbitprep.loss.label_log_probs` allocates: d logp / d states (fused), one chunk, the (N,) values."""

    @staticmethod
    def forward(ctx: Any, plan: Any, head: nn.Module, config: Any, selected: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        ctx.grad = torch.empty_like(selected)  # d logp_i / d h_i, filled chunk by chunk
        weights = torch.ones(selected.shape[0], dtype=torch.float32, device=selected.device)
        values = torch.empty(selected.shape[0], dtype=torch.float32, device=selected.device)
        _one_chunk(plan, head, config, selected, targets, grad=True)
        del weights
        return values

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, ctx.grad = ctx.grad, None
        return None, None, None, grad.mul_(grad_values[:, None].to(grad.dtype)), None


def _chunked_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """(rows, positions) log p(label) as `label_log_probs` computes them; without gradients under no_grad."""
    lm = _unwrap(model)
    hidden = _head_input(model, batch)
    selected, targets = _trained(hidden)
    plan, head = chunked_loss_plan(model, device), lm.get_output_embeddings()
    if torch.is_grad_enabled():
        values = _LogProbChunks.apply(plan, head, lm.config, selected, targets)
    else:
        values = torch.empty(selected.shape[0], dtype=torch.float32, device=selected.device)
        _one_chunk(plan, head, lm.config, selected, targets, grad=False)
    rows, length = hidden.shape[:2]
    flat = torch.zeros(rows * length, dtype=torch.float32, device=hidden.device)
    index = torch.empty(values.shape[0], dtype=torch.long, device=hidden.device)
    return flat.index_put((index,), values).view(rows, length)


def _full_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """(rows, positions) log p(label) from the full logits in fp32, as `label_log_probs(loss="full")` takes them."""
    logits = model(input_ids=batch["input_ids"]).logits.float()  # the model's own logits are let go
    targets = nn.functional.pad(batch["labels"][..., 1:], (0, 1), value=-100)
    keep = targets != -100
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked * keep


_LOG_PROBS = {"full": _full_log_probs, "chunked": _chunked_log_probs}


def _preference(method: str, log_probs: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A preference step as `kbitprep.loss.preference_loss` runs it on the (2B, T) batch: the policy's
    log-probabilities with gradients, then (DPO) the reference's, adapter off and under no_grad, whose
    forward pass peaks above the policy's kept activations and keeps nothing itself."""
    from ...loss.preference import PREFERENCE_METHODS, adapter_disabled

    reference = PREFERENCE_METHODS[method].reference

    def run(model: nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
        policy = log_probs(model, batch, device).sum(-1)
        if reference:
            with torch.no_grad(), adapter_disabled(model):
                reference_log_probs = log_probs(model, batch, device).sum(-1)
            policy = policy - reference_log_probs
        return policy.sum()
    return run


# loss name -> (model, batch, device) -> the loss tensor, as the training loop computes it
LOSSES: dict[str, Callable[[nn.Module, dict[str, torch.Tensor], str], torch.Tensor]] = {"full": _full,
                                                                                          "chunked": _chunked}


def simulated_loss(name: str, device: str,
                   method: str = "sft") -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """The loss `name` of the training `method` ("sft" or a `PREFERENCE_METHODS` name) as `simulate_step` calls
    it: (model, batch) -> loss. A preference batch holds both sides of each pair, (2 x pairs) rows."""
    run = LOSSES[name] if method == "sft" else _preference(method, _LOG_PROBS[name])
    return lambda model, batch: run(model, batch, device)
