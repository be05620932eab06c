"""The model a finished run trained: its base loaded and prepared as the run did, plus its adapter.

`kbitprep generate` talks to it; `kbitprep merge --verify` compares the merged folder with it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

__all__ = ["load_run_model"]


def load_run_model(settings: dict[str, Any], adapter: Path) -> Any:
    """The base as the run loaded it (its --quantize, --compute-dtype, --upcast) with the adapter, in evaluation mode.

    Args:
        settings (dict): the run's settings, as its report.json records them.
        adapter (Path): the run's adapter folder.
    """
    from peft import PeftModel

    from ...apply import prepare_model_for_kbit_training
    from ..model.loading import load_quantized_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bitsandbytes/transformers notes about CPU-only set-ups
        base = load_quantized_model(settings["model"], settings["quantize"],
                                    compute=settings.get("compute_dtype", "auto"))
        base = prepare_model_for_kbit_training(base, upcast=settings.get("upcast", "norms"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft reads a deprecated transformers property
            model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    model.config.use_cache = True  # preparation switched it off for training
    return model
