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

The package, by concern::

    common       LOSS_CHOICES, BACKWARD_CHOICES, IGNORE_INDEX, LossInputError
    transforms   LOGIT_TRANSFORMS and the probe that finds a model's row (and gathers an FSDP2 head)
    head         the head's parts: its plain weight or the module to call, LoRA adapters on it
    chunks       the chunk loop and its autograd Function
    plan         LossPlan, plan_loss, and the sizing constants CHUNK_LOGITS, AMORTIZE_TOKENS, WEIGHT_PIECE
    causal_lm    causal_lm_loss
    log_probs    label_log_probs: log p(label) per position, for the preference losses
    preference   preference_loss: DPO and ORPO (PREFERENCE_METHODS), DPO's reference the adapter switched off
    trainer      ChunkedLossMixin
"""

from .causal_lm import causal_lm_loss
from .common import BACKWARD_CHOICES, IGNORE_INDEX, LOSS_CHOICES, LossInputError
from .log_probs import label_log_probs
from .plan import AMORTIZE_TOKENS, CHUNK_LOGITS, WEIGHT_PIECE, LossPlan, plan_loss
from .preference import METHOD_CHOICES, PREFERENCE_METHODS, REWARD_KEYS, PreferenceResult, preference_loss
from .trainer import ChunkedLossMixin
from .transforms import LOGIT_TRANSFORMS, LogitTransform

# The sizing constants are re-exported to be read; code that changes them (a test) patches
# kbitprep.loss.plan, where plan_loss reads them.
__all__ = [
    "AMORTIZE_TOKENS",
    "BACKWARD_CHOICES",
    "CHUNK_LOGITS",
    "IGNORE_INDEX",
    "LOGIT_TRANSFORMS",
    "LOSS_CHOICES",
    "METHOD_CHOICES",
    "PREFERENCE_METHODS",
    "REWARD_KEYS",
    "WEIGHT_PIECE",
    "ChunkedLossMixin",
    "LogitTransform",
    "LossInputError",
    "LossPlan",
    "PreferenceResult",
    "causal_lm_loss",
    "label_log_probs",
    "plan_loss",
    "preference_loss",
]
