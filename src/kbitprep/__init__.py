"""kbitprep: prepare quantized (4-/8-bit) transformer models for LoRA-style fine-tuning."""

from .apply import apply_plan, prepare_model_for_kbit_training
from .backends import BACKENDS, Backend, Detection, detect_quantization
from .errors import GradientFlowError, KbitPrepWarning, NotQuantizedWarning, PreparationError
from .plan import UPCAST_POLICIES, Cast, PreparationPlan, model_bytes, plan_preparation
from .verify import GradientFlowReport, verify_gradient_flow

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "UPCAST_POLICIES",
    "Backend",
    "Cast",
    "Detection",
    "GradientFlowError",
    "GradientFlowReport",
    "KbitPrepWarning",
    "NotQuantizedWarning",
    "PreparationError",
    "PreparationPlan",
    "apply_plan",
    "detect_quantization",
    "model_bytes",
    "plan_preparation",
    "prepare_model_for_kbit_training",
    "verify_gradient_flow",
]
