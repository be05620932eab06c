"""kbitprep against the reference, peft's `prepare_model_for_kbit_training`.

Every architecture of the zoo x every quantization mode x every checkpointing mode:
prepare one load with kbitprep and another with the reference, then demand the same
parameter dtypes and requires_grad, the same checkpointing, the same requires-grad on
the input embeddings' output, and after the same LoRA and one seeded forward/backward
the same loss and the same adapter gradients.

Intended differences, each asserted in `test_matches_reference` with a comment naming it:
- warnings: kbitprep warns NotQuantizedWarning on a model that is not quantized, and
  nothing else, in preparation or in the training step; the reference triggers
  transformers' FutureWarning (gradient_checkpointing_enable) and torch's use_reentrant
  UserWarning, which are ignored on its side.
- reentrancy: the reference passes no `use_reentrant` (torch then warns and picks True);
  kbitprep passes `use_reentrant=True` explicitly. Compared as the effective value.
- input-grad hooks: the reference's first call already leaves two hooks on the embeddings
  (its own enable_input_require_grads plus the one transformers 5's checkpointing adds);
  kbitprep leaves exactly one.
- `config.use_cache`: kbitprep switches it off when it enables checkpointing (transformers
  would otherwise log "Caching is incompatible with gradient checkpointing" on every
  forward); the reference leaves it as it was.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from conftest import ARCHS, QUANT_MODES, QUANTIZED_MODES, attach_lora, run_reference
from kbitprep import (
    NotQuantizedWarning,
    model_bytes,
    plan_preparation,
    prepare_model_for_kbit_training,
    verify_gradient_flow,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CHECKPOINTING = {
    "default": {},
    "non-reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "off": {"use_gradient_checkpointing": False},
}


def parameter_states(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    return {name: (param.dtype, param.requires_grad) for name, param in model.named_parameters()}


def effective_reentrancy(module: torch.nn.Module) -> object:
    """The use_reentrant that torch.utils.checkpoint will use for this module (torch's implicit default is True)."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    if not isinstance(func, functools.partial):
        return None
    return func.keywords.get("use_reentrant", True)


def checkpointing_state(model: torch.nn.Module) -> dict[str, tuple[bool, object]]:
    return {name: (bool(module.gradient_checkpointing),
                   effective_reentrancy(module) if module.gradient_checkpointing else None)
            for name, module in model.named_modules() if hasattr(module, "gradient_checkpointing")}


def embedding_output_requires_grad(model: torch.nn.Module, ids: torch.Tensor) -> bool:
    with torch.enable_grad():
        return model.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference(zoo, arch: str, mode: str, checkpointing: str) -> None:
    kwargs = CHECKPOINTING[checkpointing]
    quantized = mode in QUANTIZED_MODES
    checkpointed = quantized and checkpointing != "off"
    ids = zoo.batch(arch)["input_ids"]

    ours = zoo.load(arch, mode)
    plan = plan_preparation(ours, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_model_for_kbit_training(ours, **kwargs) is ours
    theirs = zoo.load(arch, mode)
    assert run_reference(theirs, **kwargs) is theirs

    # Intended difference: kbitprep names a non-quantized model, and warns nothing else.
    assert [w.category for w in caught] == ([] if quantized else [NotQuantizedWarning]), \
        [str(w.message) for w in caught]

    assert parameter_states(ours) == parameter_states(theirs)
    assert not any(param.requires_grad for param in ours.parameters())
    assert checkpointing_state(ours) == checkpointing_state(theirs)
    assert ours.is_activation_checkpointing is theirs.is_activation_checkpointing is checkpointed
    assert embedding_output_requires_grad(ours, ids) is embedding_output_requires_grad(theirs, ids) is checkpointed
    # Intended differences: one input-grad hook (the reference's default stacks two); use_cache off.
    our_hooks = len(ours.get_input_embeddings()._forward_hooks)
    assert our_hooks == int(checkpointed)
    assert len(theirs.get_input_embeddings()._forward_hooks) >= our_hooks
    if checkpointed:
        assert ours.config.use_cache is False
    else:
        assert ours.config.use_cache == theirs.config.use_cache
    assert plan.bytes_after == model_bytes(ours) == model_bytes(theirs)

    ours, theirs = attach_lora(ours), attach_lora(theirs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        our_loss, our_grads = zoo.train_step(arch, ours)
    # The only warnings a training step of ours may see are those of bitsandbytes' CPU
    # backend deprecations (torch.jit) that fire on a first use; none may come from kbitprep
    # or transformers.
    assert not [w for w in caught if "jit" not in str(w.message)], [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's checkpoint call lacks use_reentrant
        their_loss, their_grads = zoo.train_step(arch, theirs)

    assert torch.isfinite(our_loss)
    torch.testing.assert_close(our_loss, their_loss)
    assert our_grads.keys() == their_grads.keys()
    assert our_grads and all("lora_" in name for name in our_grads)
    for name, grad in our_grads.items():
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, their_grads[name], msg=lambda m, name=name: f"{name}: {m}")
    assert any(grad.abs().sum() > 0 for grad in our_grads.values())

    report = verify_gradient_flow(ours, zoo.batch(arch, seed=1) if ARCHS[arch].kind == "encoder" else None)
    assert report.ok and set(report.with_grad) == set(our_grads)
