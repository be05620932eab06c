"""Evaluation during training: the loss and perplexity on rows the run does not train on.

The rows come from `--eval-data FILE` or are held out of DATA by `--eval-fraction F`
(a seeded choice, so a resumed run holds out the same rows). Every `--eval-steps`
optimizer steps, and after the last, the model computes its loss on all of them:

    eval loss  = sum of the token losses / trained tokens   (every token weighs the same,
                                                            whatever the batch it falls in)
    perplexity = exp(eval loss)

A preference run (--method dpo|orpo) evaluates its pairs: the eval loss is the method's
loss (mean over pairs) and the rewards are logged beside it (eval_rewards/...); the
perplexity is the chosen completions'.

Each batch goes through `kbitprep.loss.causal_lm_loss`, the memory-lean loss training
uses: only positions with a label reach the LM head, in chunks, so no (tokens x
vocabulary) logits tensor of a batch, let alone of the eval set, ever exists. `Evaluation`
is a step hook, so both step loops evaluate the same way; the figures go into the loop's
log (so a checkpoint keeps them and a resumed run carries them on), to the observer (the
progress line), TensorBoard, report.json and loss.png.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ..data.rows import IGNORE_INDEX, DataError, Row
from ..data.tokenize import CausalLMCollator, PreferenceCollator, TokenizedData
from .hooks import EVAL_LOSS, EVAL_PERPLEXITY, StepHook, StepState

if TYPE_CHECKING:
    from torch import nn

__all__ = ["EVAL_LOSS", "EVAL_PERPLEXITY", "Evaluation", "eval_every", "eval_history", "evaluate",
           "evaluate_preference", "hold_out"]

_EVALUATIONS = 10  # without --eval-steps: this many evaluations over the run


def hold_out(rows: Sequence[Row], fraction: float, seed: int, source: str) -> tuple[list[Row], list[Row]]:
    """(training rows, evaluation rows): `fraction` of the rows, at least one, chosen with `seed`.

    Both keep file order.

    Raises:
        DataError: fewer than two rows, so nothing would be left to train or to evaluate.
    """
    if len(rows) < 2:
        raise DataError(f"{source}: --eval-fraction needs at least 2 rows to split, the file has {len(rows)}; "
                        "pass --eval-data FILE instead")
    count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    chosen = set(random.Random(seed).sample(range(len(rows)), count))
    return ([row for i, row in enumerate(rows) if i not in chosen], [row for i, row in enumerate(rows) if i in chosen])


def eval_every(eval_steps: int | None, max_steps: int) -> int:
    """Steps between evaluations: `eval_steps`, or a tenth of the run (at least 1)."""
    return eval_steps if eval_steps is not None else max(1, max_steps // _EVALUATIONS)


def evaluate(model: nn.Module, data: TokenizedData, batch_size: int, pad_token_id: int, *,
             loss: str = "chunked") -> tuple[float, float]:
    """The token-averaged loss of `model` on `data`, and its perplexity, in evaluation mode without gradients.

    Args:
        model (nn.Module): the causal LM (peft-wrapped or not).
        data (TokenizedData): the evaluation rows, tokenized as the training rows are.
        batch_size (int): rows per forward pass.
        pad_token_id (int): the padding id.
        loss (str): "chunked" (never the full logits) or "full". Default: "chunked"

    Returns:
        tuple[float, float]: (loss, perplexity).
    """
    import torch

    from ...loss import causal_lm_loss

    collate = CausalLMCollator(pad_token_id)
    device = next(p.device for p in model.parameters())
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate(data.examples[start:start + batch_size]).items()}
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if count:
                with torch.no_grad():  # num_items_in_batch=1: the sum over the batch's tokens
                    summed = causal_lm_loss(model, batch, num_items_in_batch=1, loss=loss)
                total += float(cast(torch.Tensor, summed))
                tokens += count
    finally:
        model.train(was_training)
    mean = total / tokens if tokens else float("nan")
    return mean, math.exp(min(mean, 700.0))  # exp(>709) overflows a float: an untrained model's perplexity


def evaluate_preference(model: nn.Module, data: TokenizedData, batch_size: int, pad_token_id: int, method: str,
                        strength: float, *, loss: str = "chunked") -> dict[str, float]:
    """A preference method's loss and rewards on `data`'s pairs, each the mean over pairs, without gradients.

    Args:
        model (nn.Module): the peft-wrapped causal LM.
        data (TokenizedData): preference pairs, tokenized as the training pairs are.
        batch_size (int): pairs per forward pass.
        pad_token_id (int): the padding id.
        method (str): "dpo" or "orpo".
        strength (float): DPO's beta, or ORPO's lambda.
        loss (str): "chunked" or "full". Default: "chunked"

    Returns:
        dict[str, float]: `EVAL_LOSS` and "eval_" + each of `REWARD_KEYS`.
    """
    import torch

    from ...loss import REWARD_KEYS, preference_loss

    collate = PreferenceCollator(pad_token_id)
    device = next(p.device for p in model.parameters())
    sums = dict.fromkeys((EVAL_LOSS, *(f"eval_{key}" for key in REWARD_KEYS)), 0.0)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            examples = data.examples[start:start + batch_size]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(examples).items()}
            with torch.no_grad():
                result = preference_loss(model, batch, method, strength, loss=loss)
            figures = {EVAL_LOSS: float(result.loss), **{f"eval_{k}": v for k, v in result.metrics().items()}}
            for key, value in figures.items():  # weighted by pairs: every pair counts the same
                sums[key] += value * len(examples)
    finally:
        model.train(was_training)
    return {key: value / len(data) for key, value in sums.items()}


def eval_history(log_history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """One entry per evaluation (step, loss, perplexity; a preference run's rewards) from the loop's log."""
    from ...loss import REWARD_KEYS

    history = {int(entry["step"]): {"step": int(entry["step"]), "loss": float(entry[EVAL_LOSS]),
                                    "perplexity": float(entry[EVAL_PERPLEXITY]),
                                    **{key: float(entry[f"eval_{key}"]) for key in REWARD_KEYS
                                       if f"eval_{key}" in entry}}
               for entry in log_history if EVAL_LOSS in entry and "step" in entry}
    return [history[step] for step in sorted(history)]


class Evaluation(StepHook):
    """Evaluates every `eval_every(...)` steps and after the last step; appends the figures to the step's entries.

    Every process evaluates the whole set (the same figures everywhere, and a sharded
    model runs its forward on all processes together). The entry it appends goes into the
    loop's log, so a checkpoint saved at this step keeps it for a resumed run.

    Args:
        data (TokenizedData): the evaluation rows.
        batch_size (int): rows per forward pass.
        pad_token_id (int): the padding id.
        eval_steps (int | None): steps between evaluations; None: a tenth of the run.
        loss (str): "chunked" or "full". Default: "chunked"
        method (str): "sft", or a preference method whose loss and rewards are evaluated;
            the perplexity is then the chosen completions'. Default: "sft"
        strength (float): the preference method's beta or lambda. Default: 0.1
    """

    def __init__(self, data: TokenizedData, batch_size: int, pad_token_id: int, eval_steps: int | None, *,
                 loss: str = "chunked", method: str = "sft", strength: float = 0.1) -> None:
        self.data, self.batch_size, self.pad_token_id = data, batch_size, pad_token_id
        self.eval_steps, self.loss, self.method, self.strength = eval_steps, loss, method, strength

    def on_step(self, state: StepState, entries: list[dict[str, float]]) -> None:
        every = eval_every(self.eval_steps, state.total_steps)
        if state.step % every and state.step != state.total_steps:
            return
        # A preference example's input_ids and labels are its chosen side: their loss is the chosen completions'.
        value, perplexity = evaluate(state.model, self.data, self.batch_size, self.pad_token_id, loss=self.loss)
        entry = {"step": state.step, EVAL_LOSS: value, EVAL_PERPLEXITY: perplexity}
        if self.method != "sft":
            entry |= evaluate_preference(state.model, self.data, self.batch_size, self.pad_token_id, self.method,
                                         self.strength, loss=self.loss)
        entries.append(entry)
