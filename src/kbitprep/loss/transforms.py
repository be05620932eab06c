"""What models do to their logits after the LM head, and the probe that finds which row a model uses.

A row of `LOGIT_TRANSFORMS` applies when the config attributes it reads are set; a cheap
probe forward (four tokens, no gradients) proves the row reproduces the model's own logits.
Under FSDP2 the probe runs through the outermost FSDP module and the head is gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

from .head import _sharded, _unwrap


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


def _probe_forward(lm: nn.Module, head: nn.Module, call: nn.Module | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One no-grad forward of four tokens; returns the model's logits and each head output.

    `call` is the module to run when it is not `lm` itself: a model sharded with FSDP2 runs
    through its outermost FSDP module, whose hooks gather the parameters (every process probes).
    """
    embeddings = cast(Any, lm).get_input_embeddings()
    device = next(embeddings.parameters()).device if embeddings is not None else torch.device("cpu")
    ids = torch.arange(1, 5, device=device)[None] % max(1, int(getattr(embeddings, "num_embeddings", 5)))
    seen: list[torch.Tensor] = []
    rng_devices = [device] if device.type == "cuda" else []
    # The forked RNG keeps the probe's dropout from shifting the training run's random stream.
    runs = call if call is not None else lm
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), _probe_hooks(head, seen):
        try:
            output = runs(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        except TypeError:  # a forward without use_cache
            output = runs(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits.detach(), seen


def _matches(candidate: torch.Tensor, logits: torch.Tensor) -> bool:
    if candidate.shape != logits.shape:
        return False
    tolerance = 4 * torch.finfo(logits.dtype).eps
    return bool(torch.allclose(candidate, logits.float(), rtol=tolerance, atol=tolerance * _PROBE_MAGNITUDE))


def _find_transform(lm: nn.Module, head: nn.Module, call: nn.Module | None = None
                    ) -> tuple[tuple[LogitTransform, tuple[Any, ...]] | None, str | None]:
    try:
        logits, seen = _probe_forward(lm, head, call)
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


def _transform_for(lm: nn.Module, head: nn.Module, call: nn.Module | None = None
                   ) -> tuple[tuple[LogitTransform, tuple[Any, ...]] | None, str | None]:
    if lm not in _PROBED:
        _PROBED[lm] = _find_transform(lm, head, call)
    return _PROBED[lm]


def _fsdp_modules(model: nn.Module, head: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(the outermost FSDP2 module of `model`, the innermost one holding `head`); (None, None) without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None, None
    holders = [module for module in model.modules() if isinstance(module, FSDPModule)
               and any(inner is head for inner in module.modules())]
    return (holders[0], holders[-1]) if holders else (None, None)


def _gather_head(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """Under FSDP2, gather the sharded head's parameters on every process (collective); returns the module
    the model's forward must run through (its outermost FSDP module), or None for a model not sharded.

    FSDP2 keeps the root's parameters gathered from its forward to the end of the backward,
    so the chunks compute with the whole head, exactly as the unsharded loss does.
    """
    if not _sharded(head):
        return None
    root, holder = _fsdp_modules(model, head)
    if root is None or holder is None:
        return None
    _transform_for(_unwrap(model), head, root)  # the probe's forward also initialises FSDP
    cast(Any, holder).unshard()
    return root
