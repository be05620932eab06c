"""Preference losses on pairs of completions: DPO and ORPO, from log-probabilities through the chunked head.

A preference batch holds each pair's chosen sequence in the first half of its rows and the
rejected one, in the same order, in the second half (prompt + completion, the prompt's
labels -100), as `kbitprep.app.data.tokenize.PreferenceCollator` builds it::

    input_ids, attention_mask, labels      (2B, T): rows 0..B-1 chosen, B..2B-1 rejected

Each method is one row of `PREFERENCE_METHODS`::

    dpo   (Rafailov et al., 2023, the sigmoid loss)
          logp = sum of log p(token) over each completion, for the policy and the reference
          loss = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))       mean over pairs
          reward = beta * (logp - ref)
    orpo  (Hong et al., 2024, as TRL's ORPOTrainer computes it)
          logp = the mean of log p(token) over each completion; no reference
          log odds = (logp_c - logp_r) - (log(1 - exp(logp_c)) - log(1 - exp(logp_r)))
          loss = NLL of the chosen sequence (its prompt and completion, token mean)
                 - lambda * mean(log sigmoid(log odds))
          reward = lambda * logp

DPO's reference is the model itself with its adapter switched off (peft's
`disable_adapter()`): the same 4-bit base, no second copy of any weight, its
log-probabilities computed without gradients. Every log-probability goes through
`label_log_probs`, so neither the policy nor the reference ever holds the full logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from .common import IGNORE_INDEX, LossInputError
from .log_probs import label_log_probs

__all__ = ["METHOD_CHOICES", "PREFERENCE_METHODS", "REWARD_KEYS", "PreferenceMethod", "PreferenceResult",
           "method_strength", "preference_loss"]

# A log entry's keys for a preference step's figures, as TRL names them.
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclasses.dataclass(frozen=True)
class PreferenceResult:
    """One preference batch's loss and each pair's rewards.

    Args:
        loss (torch.Tensor): the scalar loss (differentiable).
        chosen_rewards (torch.Tensor): (B,) the chosen completions' rewards (no gradient).
        rejected_rewards (torch.Tensor): (B,) the rejected completions'.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """The batch means under `REWARD_KEYS`: rewards of each side, their margin, how often chosen wins."""
        chosen, rejected = self.chosen_rewards.float(), self.rejected_rewards.float()
        values = (chosen.mean(), rejected.mean(), (chosen - rejected).mean(), (chosen > rejected).float().mean())
        return {key: float(value) for key, value in zip(REWARD_KEYS, values, strict=True)}


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """A preference batch split into its halves."""

    inputs: dict[str, Any]  # the model's inputs, without labels
    labels: torch.Tensor  # (2B, T) the completions' labels
    pairs: int  # B

    def completion_mask(self) -> torch.Tensor:
        """(2B, T) where a position scores a completion token (the labels shifted as the log-probs are)."""
        return functional.pad(self.labels[..., 1:] != IGNORE_INDEX, (0, 1), value=False)


def _pairs(batch: Mapping[str, Any]) -> _Pairs:
    inputs = dict(batch)
    labels = inputs.pop("labels", None)
    if labels is None or labels.dim() != 2 or labels.shape[0] % 2:
        shape = None if labels is None else tuple(labels.shape)
        raise LossInputError(f"a preference batch needs labels of shape (2 x pairs, positions), chosen rows first, "
                             f"not {shape}; build it with PreferenceCollator")
    return _Pairs(inputs, labels, labels.shape[0] // 2)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block `model` computes as its base: peft's `disable_adapter()` (no weights copied).

    Raises:
        LossInputError: the model has no adapter to switch off (DPO's reference would be the policy).
    """
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        disable = getattr(getattr(model, "module", None), "disable_adapter", None)  # under DDP
    if not callable(disable):
        raise LossInputError("DPO's reference is the base with the adapter switched off, but this model has no "
                             "peft adapter; attach LoRA first (kbitprep finetune does)")
    with disable():
        yield


def _sequence_log_probs(model: nn.Module, pairs: _Pairs, labels: torch.Tensor, loss: str,
                        backward: str) -> torch.Tensor:
    """(2B, T) log-probability of each scored position."""
    return label_log_probs(model, {**pairs.inputs, "labels": labels}, loss=loss, backward=backward)


def _dpo(model: nn.Module, pairs: _Pairs, strength: float, loss: str, backward: str) -> PreferenceResult:
    mask = pairs.completion_mask()
    policy = (_sequence_log_probs(model, pairs, pairs.labels, loss, backward) * mask).sum(-1)
    with torch.no_grad(), adapter_disabled(model):
        reference = (_sequence_log_probs(model, pairs, pairs.labels, loss, backward) * mask).sum(-1)
    ratios = policy - reference  # (2B,) log(policy / reference) of each completion
    chosen, rejected = ratios[:pairs.pairs], ratios[pairs.pairs:]
    value = -functional.logsigmoid(strength * (chosen - rejected)).mean()
    return PreferenceResult(value, strength * chosen.detach(), strength * rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(model: nn.Module, pairs: _Pairs, strength: float, loss: str, backward: str) -> PreferenceResult:
    mask = pairs.completion_mask()
    # The chosen rows score every real token (their NLL covers prompt and completion), the rejected ones
    # their completion.
    input_ids, attention = pairs.inputs["input_ids"], pairs.inputs.get("attention_mask")
    whole = input_ids.masked_fill(attention == 0, IGNORE_INDEX) if attention is not None else input_ids.clone()
    labels = torch.cat([whole[:pairs.pairs], pairs.labels[pairs.pairs:]])
    per_token = _sequence_log_probs(model, pairs, labels, loss, backward)
    chosen_scored = functional.pad(labels[:pairs.pairs, 1:] != IGNORE_INDEX, (0, 1), value=False)
    nll = -per_token[:pairs.pairs].sum() / chosen_scored.sum().clamp(min=1)
    means = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (2B,) mean log p per completion token
    chosen, rejected = means[:pairs.pairs], means[pairs.pairs:]
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    value = nll - strength * functional.logsigmoid(log_odds).mean()
    return PreferenceResult(value, strength * chosen.detach(), strength * rejected.detach())


@dataclasses.dataclass(frozen=True)
class PreferenceMethod:
    """One preference method.

    Args:
        name (str): the `--method` value.
        strength (str): the setting that weighs its preference term ("beta", "orpo_lambda").
        reference (bool): whether it compares against the reference (the base, adapter off).
        compute (Callable): (model, pairs, strength, loss, backward) -> `PreferenceResult`.
    """

    name: str
    strength: str
    reference: bool
    compute: Callable[[nn.Module, _Pairs, float, str, str], PreferenceResult]


PREFERENCE_METHODS = {method.name: method for method in (
    PreferenceMethod("dpo", "beta", True, _dpo),
    PreferenceMethod("orpo", "orpo_lambda", False, _orpo),
)}
METHOD_CHOICES = ("sft", *PREFERENCE_METHODS)  # sft: the causal-LM loss on demonstrations


def method_strength(method: str, settings: Any) -> float:
    """The weight of `method`'s preference term: the setting its row names (`settings.beta`, `.orpo_lambda`).

    0.0 for "sft", which has none.
    """
    row = PREFERENCE_METHODS.get(method)
    return float(getattr(settings, row.strength)) if row is not None else 0.0


def preference_loss(model: nn.Module, batch: Mapping[str, Any], method: str, strength: float, *,
                    loss: str = "chunked", backward: str = "fused") -> PreferenceResult:
    """The `method` loss of `model` on a preference batch, and its rewards, never holding the full logits.

    Args:
        model (nn.Module): a causal LM with a peft adapter (DPO's reference is the adapter switched off).
        batch (Mapping[str, Any]): input_ids, attention_mask, labels of shape (2B, T), the chosen
            rows first (see the module docstring).
        method (str): "dpo" or "orpo".
        strength (float): DPO's beta, or ORPO's lambda.
        loss (str): "chunked", or "full" for log-probabilities from the full logits. Default: "chunked"
        backward (str): "fused" or "recompute". Default: "fused"

    Returns:
        PreferenceResult: the loss and each pair's rewards.

    Raises:
        LossInputError: an unknown method, a batch of another shape, or (DPO) a model without an adapter.

    Example:
        >>> result = preference_loss(model, PreferenceCollator(pad)(pairs), "dpo", 0.1)
        >>> result.loss.backward(); result.metrics()["rewards/margins"]
    """
    chosen = PREFERENCE_METHODS.get(method)
    if chosen is None:
        raise LossInputError(f"method must be one of {', '.join(PREFERENCE_METHODS)}, not {method!r}")
    return chosen.compute(model, _pairs(batch), strength, loss, backward)
