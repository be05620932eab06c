"""A chunked causal-LM loss: the LM head and cross-entropy without a (tokens x vocabulary) tensor.

What a training step's loss holds, per token, with a 151,936-token vocabulary::

    transformers' loss                          kbitprep's chunked loss
    hidden (B, T, H)                            hidden (B, T, H)
      -> logits (B, T, V)       bf16              -> drop positions whose label is -100
      -> logits.float()         fp32              -> N trained positions (N, H)
      -> log_softmax            fp32              -> chunks of P positions:
      -> grad of the logits     fp32                   logits (P, V) fp32, their gradient
    ~14 bytes x V per token: 2 MiB                     computed at once, then dropped
                                                  -> the gradient of the hidden states (N, H)

The head and the cross-entropy run over chunks of P positions (`LossPlan.chunk_tokens`):
each chunk's logits are computed, upcast to fp32 on their own, turned into the chunk's
loss and the gradient of its hidden states, and freed before the next chunk. In the
default "fused" backward the gradient is computed while the chunk's logits exist, so the
head's matmul runs twice per step, as in the reference; "recompute" keeps nothing but the
inputs and recomputes each chunk's logits in the backward pass (one matmul more).

The head's matmul runs in the fastest precision the device handles well
(`kbitprep.precision`): a bf16 head stays bf16 where bf16 is fast, and is upcast to fp32
`LossPlan.weight_rows` vocabulary rows at a time where it is slow, never as a whole. A head
that is not a plain weight (bitsandbytes 4-bit, a peft wrapper, anything else) is called
as a module on each chunk. A peft LoRA on the head is split into its base weight and its
adapters. What a model does to its logits after the head (Gemma-2's softcapping, Cohere's
logit scale, ...) is one row of `LOGIT_TRANSFORMS`; a cheap probe forward finds the row a
model uses and proves it reproduces the model's own logits. A model it cannot reproduce
gets the full loss, and `LossPlan.reason` says why.

The loss is normalised as the transformers Trainer normalises it: the sum over trained
tokens divided by `num_items_in_batch` when given (gradient accumulation), else the mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .errors import KbitPrepError
from .precision import compute_dtype_for, device_precision

__all__ = [
    "BACKWARD_CHOICES",
    "CHUNK_LOGITS",
    "IGNORE_INDEX",
    "LOGIT_TRANSFORMS",
    "LOSS_CHOICES",
    "ChunkedLossMixin",
    "LogitTransform",
    "LossInputError",
    "LossPlan",
    "causal_lm_loss",
    "plan_loss",
]

IGNORE_INDEX = -100  # the label value the loss skips (prompt tokens, padding)
LOSS_CHOICES = ("chunked", "full")
BACKWARD_CHOICES = ("fused", "recompute")

# The chunk budget. A chunk holds P x V logits; P is the largest count that keeps them
# within CHUNK_LOGITS values (16 MiB in fp32). Where every chunk has to read the whole head
# again (upcasting it piece by piece, or calling a 4-bit head that dequantizes itself), P is
# at least AMORTIZE_TOKENS so that re-reading costs little next to the matmul (<= 1/P of it).
CHUNK_LOGITS = 2**22
AMORTIZE_TOKENS = 128
# Head rows upcast at a time when the device computes the head's dtype slowly: 16 MiB in fp32.
WEIGHT_PIECE = 2**22


class LossInputError(KbitPrepError, ValueError):
    """The batch cannot be scored: labels out of the vocabulary, or not lined up with the inputs."""


# --- what models do to their logits after the head ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """One way a model changes the LM head's output before the loss.

    Args:
        name (str): shown in plans and reports.
        attributes (tuple[str, ...]): config attributes it reads; the row applies only when all
            are set (looked up on the config, then its text config).
        apply (Callable): (logits, *attribute values) -> transformed logits.
        models (str): who uses it, for the docs.
    """

    name: str
    attributes: tuple[str, ...]
    apply: Callable[..., torch.Tensor]
    models: str


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


# Tried in order; the first whose attributes are set and which reproduces the model's own
# logits in the probe wins. The same attribute can mean different things (Granite divides by
# `logits_scaling`, HyperCLOVA X multiplies), so both rows exist and the probe decides.
# "none" comes last: a scaling that a model applies before its head (MiniCPM3) is part of
# the head's input and needs no row.
LOGIT_TRANSFORMS: tuple[LogitTransform, ...] = (
    LogitTransform("scale, then softcap", ("output_multiplier", "final_logit_softcapping"),
                   lambda z, scale, cap: _softcap(z * scale, cap), "MuseSpark, MuseGlimmer"),
    LogitTransform("softcap", ("final_logit_softcapping",), _softcap,
                   "Gemma-2, Gemma-3, Gemma-3n, Gemma-4, PaliGemma, VaultGemma, Nanochat, Mistral-Large-4"),
    LogitTransform("multiply by logit_scale", ("logit_scale",), lambda z, s: z * s, "Cohere, Cohere2"),
    LogitTransform("divide by logits_scaling", ("logits_scaling",), lambda z, s: z / s,
                   "Granite, GraniteMoE, Granite-Docling"),
    LogitTransform("multiply by logits_scaling", ("logits_scaling",), lambda z, s: z * s, "HyperCLOVA X"),
    LogitTransform("multiply by lm_head_multiplier", ("lm_head_multiplier",), lambda z, s: z * s, "Falcon-H1"),
    LogitTransform("multiply by output_multiplier", ("output_multiplier",), lambda z, s: z * s, "muP-style models"),
    LogitTransform("drop padded vocabulary", ("unpadded_vocab_size",), lambda z, n: z[..., : int(n)], "Inkling"),
    LogitTransform("none", (), lambda z: z, "most models"),
)


def _config_value(config: Any, name: str) -> Any:
    for source in (config, _text_config(config)):
        value = getattr(source, name, None)
        if value is not None and not isinstance(value, bool):
            return value
    return None


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


# --- the plan: how a model's loss will be computed --------------------------------------------


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DataParallel and peft wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "get_output_embeddings"):
        model = cast(nn.Module, model.module)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One active LoRA adapter on the head: lora_B(lora_A(dropout(x))) * scaling."""

    down: nn.Module  # dropout, then lora_A: computed on the selected positions outside the chunks
    up: nn.Linear  # lora_B, split by vocabulary rows inside the chunks
    scaling: float
    dtype: torch.dtype  # lora_A's, which peft casts the adapter's input to


@dataclasses.dataclass(frozen=True)
class _HeadParts:
    """The head as the chunks compute it.

    Args:
        module (nn.Module): the head as the model calls it (hooked to capture its input).
        base (nn.Module): the layer under any LoRA.
        weight (torch.Tensor | None): the base's plain (V, H) weight; None: `base` is called per chunk.
        bias (torch.Tensor | None): the base's bias, with a plain weight.
        adapters (tuple[_Adapter, ...]): active LoRA adapters.
        description (str): for the plan.
    """

    module: nn.Module
    base: nn.Module
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    adapters: tuple[_Adapter, ...]
    description: str


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("lora_A", "lora_B", "base_layer", "scaling", "active_adapters"))


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """The (V, H) weight of a plain linear layer that nothing intercepts, else None."""
    weight = getattr(module, "weight", None)
    plain = (isinstance(module, nn.Linear) and weight is not None and type(weight) in (torch.Tensor, nn.Parameter)
             and weight.is_floating_point() and weight.device.type != "meta"
             and not module._forward_hooks and not module._forward_pre_hooks and not hasattr(module, "_hf_hook"))
    return weight if plain else None


def _sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def _lora_adapters(layer: nn.Module) -> tuple[tuple[_Adapter, ...], str | None]:
    head: Any = layer  # a peft LoRA layer: its ModuleDicts and flags are read by adapter name
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return (), None  # the base alone computes the head (a merged weight holds the adapters)
    active = [name for name in head.active_adapters if name in head.lora_A]
    variants = [name for name in active if name in getattr(head, "lora_variant", {})
                or getattr(head, "use_dora", {}).get(name)]
    if variants:
        return (), f"the LM head's LoRA adapter {variants[0]!r} is a variant (such as DoRA) the chunks do not split"
    adapters = tuple(_Adapter(nn.Sequential(head.lora_dropout[name], head.lora_A[name]), head.lora_B[name],
                              float(head.scaling[name]), head.lora_A[name].weight.dtype) for name in active)
    return adapters, None


def _head_parts(head: nn.Module) -> tuple[_HeadParts | None, str | None]:
    if _sharded(head):
        return None, "the LM head is sharded (FSDP); the chunked loss needs its whole weight on each process"
    adapters: tuple[_Adapter, ...] = ()
    base = head
    if _is_lora_layer(head):
        adapters, reason = _lora_adapters(head)
        if reason:
            return None, reason
        base = cast(nn.Module, head.base_layer)
    weight = _plain_weight(base)
    kind = (f"linear weight ({str(weight.dtype).removeprefix('torch.')})" if weight is not None
            else f"{type(base).__name__} called per chunk")
    if adapters:
        kind = f"LoRA ({len(adapters)} adapter{'s' * (len(adapters) > 1)}) on a {kind}"
    bias = getattr(base, "bias", None) if weight is not None else None
    return _HeadParts(head, base, weight, bias, adapters, kind), None


# --- the probe: which transform turns the head's output into the model's logits ---------------

# lm module -> (transform row and its attribute values, or None and the reason)
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[LogitTransform, tuple[Any, ...]] | None, str | None]] = (
    weakref.WeakKeyDictionary())
_PROBE_MAGNITUDE = 100.0  # the probe's largest logit: large enough that a softcap of 30 or a scale shows


def _candidates(config: Any) -> Iterator[tuple[LogitTransform, tuple[Any, ...]]]:
    for row in LOGIT_TRANSFORMS:
        values = tuple(_config_value(config, name) for name in row.attributes)
        if all(value is not None for value in values):
            yield row, values


@contextlib.contextmanager
def _probe_hooks(head: nn.Module, seen: list[torch.Tensor]) -> Iterator[None]:
    """Feed the head large random inputs, so any transform of its output shows; record its outputs."""
    inside: list[bool] = []

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if inside:
            return None
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(args[0].shape, generator=generator).to(args[0])
        inside.append(True)
        try:
            largest = float(module(probe).detach().float().abs().max())
        finally:
            inside.pop()
        return (probe * (_PROBE_MAGNITUDE / largest if largest > 0 else 1.0), *args[1:])

    def after(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if not inside:
            seen.append(output.detach())

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _probe_forward(lm: nn.Module, head: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One no-grad forward of four tokens; returns the model's logits and each head output."""
    embeddings = cast(Any, lm).get_input_embeddings()
    device = next(embeddings.parameters()).device if embeddings is not None else torch.device("cpu")
    ids = torch.arange(1, 5, device=device)[None] % max(1, int(getattr(embeddings, "num_embeddings", 5)))
    seen: list[torch.Tensor] = []
    rng_devices = [device] if device.type == "cuda" else []
    # The forked RNG keeps the probe's dropout from shifting the training run's random stream.
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), _probe_hooks(head, seen):
        try:
            output = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        except TypeError:  # a forward without use_cache
            output = lm(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits.detach(), seen


def _matches(candidate: torch.Tensor, logits: torch.Tensor) -> bool:
    if candidate.shape != logits.shape:
        return False
    tolerance = 4 * torch.finfo(logits.dtype).eps
    return bool(torch.allclose(candidate, logits.float(), rtol=tolerance, atol=tolerance * _PROBE_MAGNITUDE))


def _find_transform(lm: nn.Module, head: nn.Module) -> tuple[tuple[LogitTransform, tuple[Any, ...]] | None, str | None]:
    try:
        logits, seen = _probe_forward(lm, head)
    except Exception as error:  # noqa: BLE001  # any failure means "cannot split", with its words
        return None, f"a probe forward of the model failed ({type(error).__name__}: {error})"
    if len(seen) != 1:
        return None, (f"the model calls its LM head {len(seen)} times in one forward pass; "
                      "the chunked loss needs exactly one call")
    raw = seen[0].float()
    for row, values in _candidates(getattr(lm, "config", None)):
        if _matches(row.apply(raw, *values), logits):
            return (row, values), None
    return None, ("the model changes its logits after the LM head in a way no row of kbitprep's "
                  "LOGIT_TRANSFORMS reproduces")


def _transform_for(lm: nn.Module, head: nn.Module) -> tuple[tuple[LogitTransform, tuple[Any, ...]] | None, str | None]:
    if lm not in _PROBED:
        _PROBED[lm] = _find_transform(lm, head)
    return _PROBED[lm]


# --- the chunks --------------------------------------------------------------------------------


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
            _adapters_backward(run, tensors, grads, rows, grad_logits)
            if autograd_pair is not None:
                _module_backward(tensors, grads, rows, grad_logits, *autograd_pair)
            else:
                _linear_backward(run, tensors, grads, h, rows, grad_logits)
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


# --- the loss of a model on a batch ------------------------------------------------------------


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


def _chunked_value(resolved: _Resolved, hidden: torch.Tensor, targets: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    plan, parts = resolved.plan, resolved.parts
    assert parts is not None  # a chunked plan always has its parts
    selected, wanted = _selected(hidden, targets)
    _check_targets(wanted, plan.vocab_size)
    denominator = _denominator(wanted, num_items_in_batch)
    scale = 1.0 / denominator if denominator else math.nan
    tensors = _Tensors(
        parts.weight, parts.bias,
        downs=[adapter.down(selected.to(adapter.dtype)) for adapter in parts.adapters],
        ups=[adapter.up.weight for adapter in parts.adapters],
        up_biases=[adapter.up.bias for adapter in parts.adapters],
        module_params=[p for p in parts.base.parameters() if p.requires_grad] if parts.weight is None else [],
    )
    run = _Run(parts, resolved.transform, wanted, scale, plan.chunk_tokens, plan.weight_rows or plan.head_rows,
               getattr(torch, plan.compute_dtype) if parts.weight is not None else None)
    return _ChunkedLoss.apply(run, plan.backward == "fused", selected, *tensors.flat())


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
