"""The order a run visits its examples in, the same on both step loops.

Each epoch is a permutation seeded by (seed, epoch). The Trainer's path samples it with
`SeededOrder` (accelerate then deals whole batches to the processes in turn); the sharded
loop takes each rank's micro-batches from it with `rank_batches`, which deals them the
same way. So one process with batch B x N and N processes with batch B train on the same
examples at every step::

    global batch of step s   order[s*B*G*N : (s+1)*B*G*N]       (G: gradient accumulation)
    rank r, micro-batch m    its (m*N + r)-th batch of B examples
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["SeededOrder", "global_order", "rank_batches"]


def global_order(examples: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in during `epoch`: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(examples, generator=generator).tolist()


def rank_batches(order: Sequence[int], step_in_epoch: int, *, batch_size: int, grad_accum: int, rank: int,
                 world: int) -> list[list[int]]:
    """The example indices of each micro-batch that `rank` trains on in one optimizer step.

    Example:
        >>> rank_batches(range(16), 0, batch_size=2, grad_accum=2, rank=1, world=2)
        [[2, 3], [6, 7]]
    """
    start = step_in_epoch * batch_size * grad_accum * world
    return [list(order[start + (m * world + rank) * batch_size: start + (m * world + rank + 1) * batch_size])
            for m in range(grad_accum)]


class SeededOrder(Sampler[int]):
    """`global_order` as a sampler for the Trainer: the epoch comes from `set_epoch`, which the Trainer calls.

    Args:
        examples (int): the training examples.
        seed (int): the run's seed.
    """

    def __init__(self, examples: int, seed: int) -> None:
        self.examples, self.seed, self.epoch = examples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(global_order(self.examples, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.examples
