"""The loss plan: whether a model's loss is chunked, how big the chunks are, the head's matmul dtype.

The sizing constants (`CHUNK_LOGITS`, `AMORTIZE_TOKENS`, `WEIGHT_PIECE`) live here, with the
code that reads them; `kbitprep.app.memory.simulated_loss` reads them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..precision import compute_dtype_for, device_precision
from .common import BACKWARD_CHOICES, LOSS_CHOICES, LossInputError
from .head import _head_parts, _HeadParts, _unwrap
from .transforms import LogitTransform, _config_value, _gather_head, _transform_for

# The chunk budget. A chunk holds P x V logits; P is the largest count that keeps them
# within CHUNK_LOGITS values (16 MiB in fp32). Where every chunk has to read the whole head
# again (upcasting it piece by piece, or calling a 4-bit head that dequantizes itself), P is
# at least AMORTIZE_TOKENS so that re-reading costs little next to the matmul (<= 1/P of it).
CHUNK_LOGITS = 2**22
AMORTIZE_TOKENS = 128
# Head rows upcast at a time when the device computes the head's dtype slowly: 16 MiB in fp32.
WEIGHT_PIECE = 2**22


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How `causal_lm_loss` computes a model's loss; shown in plans and written to report.json.

    Args:
        loss (str): "chunked" or "full".
        reason (str | None): why the full loss is used although "chunked" was asked for.
        backward (str): "fused" (each chunk's gradient computed with its logits) or
            "recompute" (logits recomputed in the backward pass).
        head (str): what the LM head is and how the chunks compute it.
        logits_transform (str): the `LOGIT_TRANSFORMS` row applied after the head.
        vocab_size (int): columns of the logits the loss sees.
        head_rows (int): output rows of the head (the vocabulary before any transform).
        hidden_size (int): the head's input width.
        hidden_itemsize (int): bytes per value of the hidden states (2 for bf16).
        compute_dtype (str): the dtype of the head's matmul, or "module's own" for a head
            called as a module.
        precision (str): why `compute_dtype`: the device's fast precisions and how they were
            decided, or the caller's autocast.
        chunk_tokens (int): positions per chunk (P).
        weight_rows (int | None): head rows cast to `compute_dtype` at a time; None when the
            head is used in its own dtype.
    """

    loss: str
    reason: str | None = None
    backward: str = "fused"
    head: str = ""
    logits_transform: str = "none"
    vocab_size: int = 0
    head_rows: int = 0
    hidden_size: int = 0
    hidden_itemsize: int = 2
    compute_dtype: str = ""
    precision: str = ""
    chunk_tokens: int = 0
    weight_rows: int | None = None

    def chunk_bytes(self) -> int:
        """Bytes one chunk holds at its peak, beyond the model's own tensors (0 for the full loss).

        The chunk's fp32 logits (P x V) and one more block of the same size (the softmax
        inside logsumexp, or the gradient cast for the matmul); a logits transform keeps
        three blocks more for its autograd (its output, what it saved, its gradient); a
        half-precision matmul writes a half-precision block first; an upcast head holds one
        fp32 piece of `weight_rows` rows and its P x rows output.
        """
        if self.loss != "chunked":
            return 0
        block = self.chunk_tokens * self.head_rows * 4
        blocks = 2 if self.logits_transform == "none" else 5
        half = self.chunk_tokens * self.head_rows * 2 if self.compute_dtype in ("bfloat16", "float16") else 0
        piece = (self.weight_rows * (self.hidden_size + self.chunk_tokens) * 4) if self.weight_rows else 0
        return blocks * block + half + piece + self.chunk_tokens * self.hidden_size * 4

    def working_bytes(self, trained_tokens: int) -> int:
        """Bytes the loss holds for a batch with `trained_tokens` positions whose label is not -100.

        `chunk_bytes()` plus, for the chunked loss, the selected hidden states (N x H) and
        the gradient of them computed in the forward pass (N x H, "fused" only). The full
        loss is not modelled here (0).
        """
        if self.loss != "chunked":
            return 0
        rows = trained_tokens * self.hidden_size * self.hidden_itemsize
        return self.chunk_bytes() + rows * (2 if self.backward == "fused" else 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "chunk_bytes": self.chunk_bytes()}


def _check_choices(loss: str, backward: str) -> None:
    if loss not in LOSS_CHOICES:
        raise LossInputError(f"loss must be one of {', '.join(LOSS_CHOICES)}, not {loss!r}")
    if backward not in BACKWARD_CHOICES:
        raise LossInputError(f"backward must be one of {', '.join(BACKWARD_CHOICES)}, not {backward!r}")



def _unsplittable(lm: nn.Module, head: nn.Module | None) -> str | None:
    if not isinstance(head, nn.Module):
        return "the model has no LM head module (get_output_embeddings() returns None)"
    if getattr(getattr(lm, "config", None), "is_encoder_decoder", False):
        return "an encoder-decoder model: the chunked loss is for decoder-only causal LMs"
    return None


def _head_shape(parts: _HeadParts, lm: nn.Module) -> tuple[int, int]:
    """(rows, hidden size) of the head: its weight's shape, else its declared features, else the config's."""
    if parts.weight is not None:
        return int(parts.weight.shape[0]), int(parts.weight.shape[1])
    config = getattr(lm, "config", None)
    rows = getattr(parts.base, "out_features", None) or _config_value(config, "vocab_size")
    width = getattr(parts.base, "in_features", None) or _config_value(config, "hidden_size")
    return int(rows), int(width)


def _chunked_plan(lm: nn.Module, parts: _HeadParts, found: tuple[LogitTransform, tuple[Any, ...]],
                  backward: str) -> LossPlan:
    row, values = found
    rows, width = _head_shape(parts, lm)
    vocab = row.apply(torch.empty((1, rows), device="meta"), *values).shape[-1]
    weight = parts.weight
    device = weight.device if weight is not None else next(parts.base.parameters(), torch.empty(0)).device
    dtype, precision = _matmul_dtype(weight, device)
    converted = weight is not None and dtype != weight.dtype  # cast piece by piece in every chunk
    chunk = max(1, CHUNK_LOGITS // rows)
    embeddings = getattr(lm, "get_input_embeddings", lambda: None)()
    hidden_dtype = getattr(embeddings, "weight", torch.empty(0, dtype=torch.bfloat16)).dtype
    return LossPlan(
        loss="chunked", backward=backward, head=parts.description, logits_transform=row.name, vocab_size=int(vocab),
        head_rows=rows, hidden_size=width, hidden_itemsize=hidden_dtype.itemsize,
        compute_dtype=str(dtype).removeprefix("torch.") if dtype is not None else "module's own",
        precision=precision,
        chunk_tokens=max(chunk, AMORTIZE_TOKENS) if converted or weight is None else chunk,
        weight_rows=max(1, WEIGHT_PIECE // width) if converted else None,
    )


def _matmul_dtype(weight: torch.Tensor | None, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The head's matmul dtype and why: the caller's autocast if on, else the device's fast precision rule."""
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        name = str(dtype).removeprefix("torch.")
        return (dtype if weight is not None else None), f"autocast to {name} (the caller's)"
    return (compute_dtype_for(weight.dtype, device) if weight is not None else None), device_precision(device).source


@dataclasses.dataclass(frozen=True)
class _Resolved:
    plan: LossPlan
    lm: nn.Module
    parts: _HeadParts | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _resolve(model: nn.Module, loss: str, backward: str) -> _Resolved:
    _check_choices(loss, backward)
    lm = _unwrap(model)
    if loss == "full":
        return _Resolved(LossPlan("full", backward=backward), lm)
    getter = getattr(lm, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    reason = _unsplittable(lm, head)
    if reason is not None or head is None:
        return _full_instead(lm, backward, reason)
    _gather_head(model, head)  # a head sharded with FSDP2: gathered, so it splits like any other
    found, reason = _transform_for(lm, head)
    if found is None:
        return _full_instead(lm, backward, reason)
    parts, reason = _head_parts(head)
    if parts is None:
        return _full_instead(lm, backward, reason)
    row, values = found
    transform = None if row.name == "none" else (lambda z: row.apply(z, *values))
    return _Resolved(_chunked_plan(lm, parts, found, backward), lm, parts, transform)


def _full_instead(lm: nn.Module, backward: str, reason: str | None) -> _Resolved:
    return _Resolved(LossPlan("full", reason=reason, backward=backward), lm)


def plan_loss(model: nn.Module, loss: str = "chunked", backward: str = "fused") -> LossPlan:
    """How `causal_lm_loss` will compute `model`'s loss, without computing it.

    The first call on a model runs one probe forward pass of four tokens (no gradients) to
    find what the model does to its logits after the head; the answer is cached.

    Args:
        model (nn.Module): a causal LM, bare or wrapped by peft and/or DDP.
        loss (str): "chunked" or "full". Default: "chunked"
        backward (str): "fused" or "recompute". Default: "fused"

    Returns:
        LossPlan: the loss used and, when the chunked loss cannot be, the reason.

    Raises:
        LossInputError: `loss` or `backward` is not one of the choices.

    Example:
        >>> plan = plan_loss(model)
        >>> plan.loss, plan.logits_transform, plan.chunk_tokens
        ('chunked', 'softcap', 27)
    """
    return _resolve(model, loss, backward).plan
