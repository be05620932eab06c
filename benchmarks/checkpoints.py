"""Saving a model shape with random weights, and loading it back in 4-bit as a user would."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitprep.sizing import bnb_config_for, load_config

__all__ = ["load_4bit", "save_random_checkpoint"]


def save_random_checkpoint(config: Mapping[str, Any], directory: Path, *, seed: int = 0) -> Path:
    """Build `config` with seeded random bf16 weights and save it to `directory`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_config(dict(config)), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def load_4bit(checkpoint: Path) -> nn.Module:
    """Load a checkpoint in 4-bit NF4 (double quantization) on CPU: `kbitprep.sizing`'s "nf4".

    Its layers compute in the precision the product picks here (`pace.bench_compute_dtype`):
    bf16 on a CPU that computes it fast, fp32 on one without oneDNN bf16 kernels.
    """
    from transformers import AutoModelForCausalLM

    from .pace import bench_compute_dtype

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' CPU backend warns about torch.jit on first use: not ours
        return AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=bnb_config_for("nf4", bench_compute_dtype()), dtype=torch.bfloat16,
            device_map="cpu")
