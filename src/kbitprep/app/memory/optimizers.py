"""What each optimizer finetune offers (`--optim`) holds per trainable value, and what its step allocates.

The memory model (`kbitprep.app.memory.estimate`) adds `OptimizerSpec.state` to the run's
static bytes and `OptimizerSpec.transient` to the moment of the optimizer step. The
numbers are the libraries' own layouts: torch's AdamW keeps two fp32 moments and a step
counter per tensor; bitsandbytes' 8-bit AdamW keeps two uint8 moments, quantized in
blocks of 256 values with one fp32 scale per block and moment, and two 256-entry fp32 code
tables per tensor, and keeps fp32 moments for tensors under 4,096 values (its
`min_8bit_size`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

__all__ = ["OPTIMIZERS", "OptimizerSpec"]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer holds per trainable value, and what its step allocates for a moment.

    Args:
        name (str): the Trainer's `optim` name (finetune's `--optim`).
        state_bytes (int): bytes of state per trainable value (AdamW: two fp32 moments, 8).
        per_tensor_bytes (int): bytes per trainable tensor (AdamW's step counter; 8-bit: two 256-entry code tables).
        step_transient (str): the step's temporaries: "none" (a fused kernel), "largest" (one tensor's worth
            at a time, as torch's for-loop AdamW on a CPU and bitsandbytes' kernels) or "foreach" (one copy of
            every gradient on a GPU, a tensor at a time on a CPU).
        block (int): values per block of 8-bit state, each block with one fp32 scale per moment; 0: not blockwise.
        min_8bit (int): tensors with fewer values keep fp32 state (bitsandbytes' `min_8bit_size`). Default: 0
    """

    name: str
    state_bytes: int
    per_tensor_bytes: int
    step_transient: str
    block: int = 0
    min_8bit: int = 0

    def state(self, trainable: list[torch.Tensor]) -> int:
        total = 0
        for p in trainable:
            if self.block and p.numel() < self.min_8bit:
                total += p.numel() * 8  # bitsandbytes keeps small tensors' moments in fp32
            else:
                scales = 2 * 4 * math.ceil(p.numel() / self.block) if self.block else 0
                total += p.numel() * self.state_bytes + self.per_tensor_bytes + scales
        return total

    def transient(self, trainable: list[torch.Tensor], device: str) -> int:
        sizes = [p.numel() * 4 for p in trainable] or [0]
        kind = self.step_transient
        if kind == "foreach":  # torch's default: foreach on a GPU, the for-loop on a CPU
            kind = "all" if device == "cuda" else "largest"
        return {"none": 0, "largest": 2 * max(sizes), "all": sum(sizes)}[kind]


# finetune's `--optim` choices (kbitprep.app.config.optimizer), as the Trainer builds them. The 8-bit ones are
# bitsandbytes' blockwise AdamW: a uint8 per value per moment, an fp32 scale per 256-value block per moment, and
# fp32 moments for tensors under 4,096 values. Paged state (paged_adamw_8bit) is CUDA unified memory: it is
# counted here as device memory, where it stays unless the device runs out and the driver evicts it to the host
# (and it is invisible to torch.cuda.max_memory_allocated); on a CPU bitsandbytes keeps it as the unpaged one.
OPTIMIZERS: Mapping[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("adamw_torch", state_bytes=8, per_tensor_bytes=4, step_transient="foreach"),
    OptimizerSpec("adamw_bnb_8bit", state_bytes=2, per_tensor_bytes=2 * 256 * 4, step_transient="largest",
                  block=256, min_8bit=4096),
    OptimizerSpec("paged_adamw_8bit", state_bytes=2, per_tensor_bytes=2 * 256 * 4, step_transient="largest",
                  block=256, min_8bit=4096),
)}
