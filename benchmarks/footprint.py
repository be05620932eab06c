"""Prepared footprint of real model shapes, sized on the meta device.

For each published config, `kbitprep.sizing.build_meta_model` builds the model a 4-bit
`from_pretrained` would give (bitsandbytes layers, packed `Params4bit` storage) with no
memory behind it. Then:

- floor: its parameter + buffer bytes before any preparation;
- kbitprep "all" / "norms" / "none": `plan_preparation(...).bytes_after`;
- reference: peft's `prepare_model_for_kbit_training` actually run on a second meta
  model (casting a meta tensor only changes its dtype), then measured; cross-checked
  against the reference's rule applied by hand (`variants.reference_rule_bytes`).

Bytes are `kbitprep.model_bytes`: parameters and buffers, shared tensors once. The 4-bit
quantization state (absmax, code) lives outside parameters and buffers and is not counted;
it is the same for every variant.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

import kbitprep
from kbitprep.sizing import build_meta_model

from .shapes import LOAD_DTYPE
from .variants import REFERENCE, VARIANTS, reference_rule_bytes

__all__ = ["FootprintRow", "measure_footprint"]


@dataclasses.dataclass(frozen=True)
class FootprintRow:
    """Prepared bytes of one model shape.

    Args:
        model (str): the shape's name, e.g. "Qwen2-0.5B".
        parameters (int): logical parameter count (4-bit weights counted unpacked).
        floor (int): bytes of the quantized model before any preparation.
        after (Mapping[str, int]): bytes after preparation, by variant name (`variants.VARIANTS`).
        reference_rule (int): the reference's bytes computed from its rule, a cross-check of
            `after["reference"]`.
        sizing_s (float): wall seconds to build the meta skeleton from the config and plan it
            once (what `kbitprep inspect` does per policy). Default: 0.0
    """

    model: str
    parameters: int
    floor: int
    after: Mapping[str, int]
    reference_rule: int
    sizing_s: float = 0.0

    def ratio(self, variant: str) -> float:
        """Bytes after `variant` relative to the reference's."""
        return self.after[variant] / self.after[REFERENCE.name]


def measure_footprint(name: str, config: Mapping[str, Any], *, quantize: str = "nf4",
                      dtype: torch.dtype = LOAD_DTYPE) -> FootprintRow:
    """Size one config under the reference and each kbitprep policy, on the meta device.

    Args:
        name (str): the shape's name for the table.
        config (Mapping): a transformers config as a dict (with "model_type").
        quantize (str): a `kbitprep.sizing.QUANTIZE_CHOICES` value. Default: "nf4"
        dtype (torch.dtype): the load dtype of the unquantized weights. Default: bfloat16

    Returns:
        FootprintRow: the bytes; nothing is allocated beyond the skeletons.
    """
    started = time.perf_counter()
    model = build_meta_model(dict(config), quantize=quantize, dtype=dtype)
    counts = kbitprep.plan_preparation(model).parameter_counts
    sizing_s = time.perf_counter() - started
    after: dict[str, int] = {}
    for variant in VARIANTS.values():
        if variant.upcast is not None:
            # On meta, the plan lists "weights never loaded" among its errors; its bytes are exact all the same.
            after[variant.name] = kbitprep.plan_preparation(model, upcast=variant.upcast).bytes_after

    reference_model = build_meta_model(dict(config), quantize=quantize, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's own deprecation warnings are counted in `training`
        REFERENCE.prepare(reference_model)
    after = {REFERENCE.name: kbitprep.model_bytes(reference_model), **after}

    return FootprintRow(model=name, parameters=sum(counts.values()), floor=kbitprep.model_bytes(model),
                        after=after, reference_rule=reference_rule_bytes(model), sizing_s=sizing_s)
