"""The optimizer a run's `--optim` names, built as the transformers Trainer builds it.

    adamw_torch       torch.optim.AdamW: two fp32 moments per trainable value
    adamw_bnb_8bit    bitsandbytes' AdamW8bit: the moments in 8 bits, blockwise quantized
    paged_adamw_8bit  bitsandbytes' PagedAdamW8bit: the same, its state in paged (unified) memory
                      on a GPU, so that it can be evicted to host memory under pressure

The Trainer path passes the name to `TrainingArguments(optim=...)`; the sharded loop calls
`make_optimizer`, which builds the same optimizer with the Trainer's arguments (betas
0.9/0.999, eps 1e-8, no weight decay, the run's learning rate). Whether bitsandbytes can
step its 8-bit optimizers where the run trains is checked before a run starts
(`steps_here`), so that a machine where it cannot refuses the option instead of failing
at the first step.

LoRA+ (`--loraplus-lr-ratio R`) is peft's `create_loraplus_optimizer`: the same optimizer,
with B (and DoRA's magnitudes) in a parameter group at R times the learning rate. Both
paths build it through `loraplus_optimizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from ...errors import ArgumentTypeError, KbitPrepError

__all__ = ["BNB_OPTIMIZERS", "OPTIM_CHOICES", "OPTIM_RULE", "OptimizerUnavailableError", "loraplus_optimizer",
           "make_optimizer", "steps_here", "why_not_here"]

# The Trainer's `optim` names kbitprep offers; the first is the default.
OPTIM_CHOICES = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit")
# name -> the bitsandbytes class the Trainer's choice amounts to (bnb.optim.AdamW with optim_bits=8, is_paged)
BNB_OPTIMIZERS = {"adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
# How the setting's check words a refused choice (after "--optim must be").
OPTIM_RULE = ("an optimizer whose library steps where this machine trains (bitsandbytes failed a test step of its "
              "8-bit optimizer here); pass --optim adamw_torch")
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.0  # TrainingArguments' adam_beta1/2, adam_epsilon; kbitprep's decay


class OptimizerUnavailableError(KbitPrepError, RuntimeError):
    """The optimizer `--optim` names cannot step on this machine; the message says why and names the fix."""


def make_optimizer(parameters: Iterable[Any], settings: Any, *, model: Any = None) -> Any:
    """The optimizer `settings.optim` names over `parameters`, as the Trainer builds it.

    Args:
        parameters (Iterable[torch.nn.Parameter]): the trainable parameters.
        settings (Any): the run's settings (`FinetuneSettings`): `optim` and `lr`; a settings object
            without `optim` gets the default, adamw_torch. With `loraplus_lr_ratio` set, `model` is needed.
        model (Any): the PeftModel `parameters` belong to, for LoRA+'s groups by name. Default: None

    Returns:
        torch.optim.Optimizer: AdamW (torch) or bitsandbytes' AdamW8bit / PagedAdamW8bit.

    Raises:
        OptimizerUnavailableError: bitsandbytes cannot step its 8-bit optimizers on this machine.
        ArgumentTypeError: LoRA+ is asked for without `model`.
    """
    import torch

    name = getattr(settings, "optim", OPTIM_CHOICES[0])
    params = list(parameters)
    if name not in BNB_OPTIMIZERS:
        optimizer_cls: Any = torch.optim.AdamW
    else:
        problem = why_not_here(name, _run_device())
        if problem is not None:
            raise OptimizerUnavailableError(f"--optim {name}: {problem}; pass --optim adamw_torch")
        import bitsandbytes as bnb

        optimizer_cls = getattr(bnb.optim, BNB_OPTIMIZERS[name])
    kwargs = {"betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    ratio = getattr(settings, "loraplus_lr_ratio", None)
    if ratio is not None:
        if model is None:
            raise ArgumentTypeError("make_optimizer: LoRA+ groups the parameters by name; pass model=")
        return loraplus_optimizer(model, optimizer_cls, {**kwargs, "lr": settings.lr}, ratio)
    return optimizer_cls(params, lr=settings.lr, **kwargs)


def loraplus_optimizer(model: Any, optimizer_cls: type, kwargs: dict[str, Any], ratio: float) -> Any:
    """peft's LoRA+ optimizer: `optimizer_cls(**kwargs)` with B and the magnitudes at `ratio` times `kwargs["lr"]`.

    Args:
        model (Any): the PeftModel; its trainable parameters are grouped by name.
        optimizer_cls (type): the optimizer class (torch's AdamW or a bitsandbytes one).
        kwargs (dict[str, Any]): the optimizer's arguments, the learning rate `lr` among them.
        ratio (float): B's learning rate over A's.

    Returns:
        torch.optim.Optimizer: one optimizer, A in a group at `lr`, B at `lr * ratio`.
    """
    from peft.optimizers import create_loraplus_optimizer

    rest = {key: value for key, value in kwargs.items() if key not in ("lr", "weight_decay")}
    # weight_decay is peft's loraplus_weight_decay: it sets each group's own
    return create_loraplus_optimizer(model, optimizer_cls, lr=kwargs["lr"], loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=kwargs.get("weight_decay", 0.0), **rest)


def _run_device() -> str:
    from ...device import has_accelerator

    return "cuda" if has_accelerator() else "cpu"


def steps_here(name: str) -> bool:
    """Whether `--optim name` can step where a run on this machine trains (the setting's check)."""
    return why_not_here(name, _run_device()) is None


@functools.cache
def why_not_here(name: str, device: str) -> str | None:
    """Why bitsandbytes' optimizer `name` cannot step on `device`, found by stepping it once; None if it can.

    The probe is a 4,096-value tensor, the smallest bitsandbytes keeps 8-bit state for.
    """
    if name not in BNB_OPTIMIZERS:
        return None
    import torch

    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.zeros(4096, device=device))
        optimizer = getattr(bnb.optim, BNB_OPTIMIZERS[name])([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
        state = optimizer.state[param].get("state1")
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            return f"bitsandbytes keeps no 8-bit state for {name} on {device}"
    except Exception as error:  # noqa: BLE001 - any failure of the library here means the same: not usable
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"bitsandbytes cannot step {name} on {device} ({type(error).__name__}: {first[:160]})"
    return None
