"""What every part of the chunked loss shares: the choices, the skipped label, the input error."""

from __future__ import annotations

from ..errors import KbitPrepError

IGNORE_INDEX = -100  # the label value the loss skips (prompt tokens, padding)
LOSS_CHOICES = ("chunked", "full")
BACKWARD_CHOICES = ("fused", "recompute")


class LossInputError(KbitPrepError, ValueError):
    """The batch cannot be scored: labels out of the vocabulary, or not lined up with the inputs."""
