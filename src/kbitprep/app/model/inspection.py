"""`kbitprep inspect`: the preparation plan of a local model under every upcast policy.

With weights in the folder the model is loaded as `--quantize` says; without them (or
with `meta=True`) it is built from config.json alone on the meta device by
`kbitprep.sizing.build_meta_model`, with bitsandbytes layers packed as a real load packs
them, so a 70B model is sized in seconds and a few hundred MB of memory.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ...plan import META_DEVICE, UPCAST_POLICIES, PreparationPlan, plan_preparation
from ...sharding import WRAPPERS, ShardingPlan, plan_sharding
from .loading import ModelFolderError, check_model_folder, has_weights, load_quantized_model

__all__ = ["InspectReport", "inspect_model", "without_meta_error"]


@dataclasses.dataclass(frozen=True)
class InspectReport:
    """Plans for one model, one per upcast policy.

    Args:
        model (str): the model folder.
        quantize (str): how it was (or would be) loaded.
        source (str): "meta" (config.json only, nothing loaded) or "weights".
        architecture (str): the config's model type and architecture.
        plans (dict[str, PreparationPlan]): upcast policy -> plan.
        seconds (float): how long building and planning took.
        devices (int): processes the run would be sharded over. Default: 1
        sharding (dict[str, dict[str, ShardingPlan]]): upcast policy -> wrapper ("fsdp2",
            "fsdp1") -> bytes per process and diagnostics; empty when `devices` is 1. Default: {}
        saved (str | None): how the folder is saved quantized ("nf4 with double quantization"); None:
            not quantized. Default: None
    """

    model: str
    quantize: str
    source: str
    architecture: str
    plans: dict[str, PreparationPlan]
    seconds: float
    devices: int = 1
    sharding: dict[str, dict[str, ShardingPlan]] = dataclasses.field(default_factory=dict)
    saved: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"model": self.model, "quantize": self.quantize, "saved_quantized": self.saved, "source": self.source,
                "architecture": self.architecture, "seconds": round(self.seconds, 3),
                "plans": {policy: plan.to_dict() for policy, plan in self.plans.items()}}
        if self.sharding:
            data["devices"] = self.devices
            data["sharding"] = {policy: {wrapper: plan.to_dict() for wrapper, plan in by_wrapper.items()}
                                for policy, by_wrapper in self.sharding.items()}
        return data


def without_meta_error(plan: PreparationPlan) -> PreparationPlan:
    """The plan without the error that its weights are on the meta device (sizing from config.json)."""
    # Planning a meta-device skeleton reports that its weights were never loaded, which is
    # the point of sizing from config.json; every other error stays.
    return dataclasses.replace(plan, diagnostics=tuple(d for d in plan.diagnostics if d.code != META_DEVICE.code))


def inspect_model(path: str | os.PathLike[str], *, quantize: str = "auto", meta: bool = False,
                  devices: int = 1) -> InspectReport:
    """Plan the preparation of a local model under each upcast policy, changing nothing on disk.

    Args:
        path (str | PathLike): the model folder (config.json; weights optional).
        quantize (str): "auto" (a folder saved quantized as saved, else nf4), "nf4", "fp4", "int8" or
            "none"; one that contradicts how the folder is saved quantized is refused. Default: "auto"
        meta (bool): size from config.json even when weights are present. Default: False
        devices (int): processes to size a sharded (FSDP) run for; 1 sizes no sharding. Default: 1

    Returns:
        InspectReport: the plans.

    Raises:
        ModelFolderError: the folder or its config.json cannot be used.
        QuantizeConflictError: `quantize` contradicts how the folder is saved quantized.
    """
    from ...backends.bitsandbytes import resolve_quantize
    from ...sizing import build_meta_model

    started = time.perf_counter()
    config = check_model_folder(path, need_weights=False)
    quantize, saved = resolve_quantize(config, quantize, where=os.fspath(path))
    if meta or not has_weights(path):
        try:
            model = build_meta_model(os.fspath(path), quantize=quantize)
        except (FileNotFoundError, ValueError) as error:
            raise ModelFolderError(f"{os.path.join(path, 'config.json')}: {error}") from None
        source = "meta"
    else:
        model = load_quantized_model(path, quantize)
        source = "weights"
    plans = {policy: plan_preparation(model, upcast=policy) for policy in UPCAST_POLICIES}
    if source == "meta":
        plans = {policy: without_meta_error(plan) for policy, plan in plans.items()}
    sharding = {policy: {wrapper: plan_sharding(model, devices, plan=plan, wrapper=wrapper) for wrapper in WRAPPERS}
                for policy, plan in plans.items()} if devices > 1 else {}
    architectures = config.get("architectures") or [type(model).__name__]
    return InspectReport(
        model=os.fspath(path), quantize=quantize, source=source,
        architecture=f"{config.get('model_type', '?')} ({architectures[0]})",
        plans=plans, seconds=time.perf_counter() - started, devices=devices, sharding=sharding,
        saved=saved.describe() if saved is not None else None,
    )
