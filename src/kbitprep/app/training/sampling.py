"""Measuring a model during a run: the first batch's loss and greedy completions of sample prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..data.tokenize import CausalLMCollator, TokenizedData

if TYPE_CHECKING:
    from torch import nn

__all__ = ["batch_loss", "first_batch", "generate", "pad_token_id"]


def first_batch(data: TokenizedData, batch_size: int, pad_token_id: int) -> dict[str, Any]:
    """The first `batch_size` examples in file order, collated: the batch the report's losses are measured on."""
    return CausalLMCollator(pad_token_id)(data.examples[:batch_size])


def batch_loss(model: nn.Module, batch: dict[str, Any], loss: str = "full") -> float:
    """The model's loss on one batch in evaluation mode, without gradients.

    Args:
        model (nn.Module): the model.
        batch (dict): input_ids, attention_mask, labels.
        loss (str): "chunked" or "full" (see `kbitprep.loss.causal_lm_loss`); the values agree. Default: "full"
    """
    import torch

    from ...loss import causal_lm_loss

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            on_device = {key: value.to(device) for key, value in batch.items()}
            value = causal_lm_loss(model, on_device, loss=loss)
            assert isinstance(value, torch.Tensor)  # without return_outputs, the loss alone
            return float(value)
    finally:
        model.train(was_training)


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The greedy completion of `prompt` (after the tokenizer's BOS, if it has one), in evaluation mode.

    `model` is a transformers (or peft) causal LM: anything with `generate`.
    """
    import torch

    device = next(p.device for p in model.parameters())
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_token_id(tokenizer), use_cache=True)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence or unknown token, else 0."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
