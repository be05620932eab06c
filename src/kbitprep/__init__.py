"""kbitprep: prepare quantized (4-/8-bit) transformer models for LoRA-style fine-tuning."""

from .apply import apply_plan, prepare_model_for_kbit_training
from .backends import BACKENDS, Backend, Detection, detect_quantization
from .errors import GradientFlowError, KbitPrepWarning, NotQuantizedWarning, PreparationError
from .plan import UPCAST_POLICIES, Cast, PreparationPlan, model_bytes, plan_preparation
from .precision import DevicePrecision, compute_dtype_for, computes_fast, device_precision, override_fast_dtypes
from .verify import GradientFlowReport, verify_gradient_flow

# The chunked loss lives in the application (kbitprep.loss) and is imported on first use,
# so that `import kbitprep` stays light; these names are part of the public surface all the same.
_LAZY = dict.fromkeys(("ChunkedLossMixin", "LossInputError", "LossPlan", "causal_lm_loss", "plan_loss"),
                      "kbitprep.loss")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kbitprep' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "UPCAST_POLICIES",
    "Backend",
    "Cast",
    "ChunkedLossMixin",
    "Detection",
    "DevicePrecision",
    "GradientFlowError",
    "GradientFlowReport",
    "KbitPrepWarning",
    "LossInputError",
    "LossPlan",
    "NotQuantizedWarning",
    "PreparationError",
    "PreparationPlan",
    "apply_plan",
    "causal_lm_loss",
    "compute_dtype_for",
    "computes_fast",
    "detect_quantization",
    "device_precision",
    "model_bytes",
    "override_fast_dtypes",
    "plan_loss",
    "plan_preparation",
    "prepare_model_for_kbit_training",
    "verify_gradient_flow",
]
