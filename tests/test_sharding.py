"""`plan_sharding`: bytes per process for N processes, and the diagnostics (by code) for the
combinations that break flattening or change numbers. The bytes are checked against a
real sharded run in test_fsdp.py; here against real loads, meta skeletons and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Zoo
from transformers import BitsAndBytesConfig

from kbitprep.sharding import plan_sharding, sharding_units
from kbitprep.sizing import build_meta_model


def test_one_unit_per_decoder_block_plus_the_root(zoo: Zoo) -> None:
    model = zoo.load("llama", "nf4-dq")
    units = sharding_units(model)
    assert [type(unit).__name__ for unit in units] == ["LlamaDecoderLayer"] * 2
    assert plan_sharding(model, 2).units == 3


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4", "bf16"])
def test_a_config_alone_sizes_the_shards_a_real_load_has(zoo: Zoo, mode: str) -> None:
    loaded = zoo.load("llama", mode)
    quantize = {"nf4-dq": "nf4", "fp4": "fp4", "bf16": "none"}[mode]
    skeleton = build_meta_model(zoo.path("llama"), quantize=quantize, dtype=loaded.dtype)
    for processes in (1, 2, 3):
        real, meta = plan_sharding(loaded, processes), plan_sharding(skeleton, processes)
        assert (meta.per_process, meta.replicated_bytes) == (real.per_process, real.replicated_bytes)


def test_each_process_holds_its_rows_of_every_parameter(zoo: Zoo) -> None:
    model = zoo.load("llama", "bf16")  # 128 x 32 embeddings, 32-wide norms, ...: all rows split evenly in two
    plan = plan_sharding(model, 2, upcast="none")
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.parameter_bytes == whole and plan.per_process == (whole // 2, whole // 2)
    # Three processes: torch.chunk gives ceil(rows / 3) rows to the first ones.
    three = plan_sharding(model, 3, upcast="none")
    expected = [0, 0, 0]
    for param in model.parameters():
        rows, size = param.shape[0], math.ceil(param.shape[0] / 3)
        for rank in range(3):
            expected[rank] += max(0, min(size, rows - rank * size)) * param[0].numel() * param.element_size()
    assert three.per_process == tuple(expected) and three.ratio > 1 / 3


def test_upcasts_are_counted_in_the_dtype_they_will_have(zoo: Zoo) -> None:
    model = zoo.load("llama", "nf4-dq")
    norms, everything = plan_sharding(model, 2, upcast="norms"), plan_sharding(model, 2, upcast="all")
    embed_and_head = 2 * 128 * 32 * 2  # bf16 -> fp32 adds 2 bytes a value
    assert everything.parameter_bytes - norms.parameter_bytes == embed_and_head


def test_4bit_weights_shard_with_their_absmax_and_keep_code_tables_whole(zoo: Zoo) -> None:
    model = zoo.load("llama", "nf4-dq")
    plan = plan_sharding(model, 2, upcast="none")
    layers = [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    packed = sum(m.weight.numel() for m in layers)
    absmax = sum(m.weight.quant_state.absmax.numel() + 4 * m.weight.quant_state.state2.absmax.numel()
                 for m in layers)
    plain = sum(p.numel() * p.element_size() for p in model.parameters() if not hasattr(p, "quant_state"))
    assert plan.parameter_bytes == packed + absmax + plain
    codes = sum(4 * (m.weight.quant_state.code.numel() + m.weight.quant_state.state2.code.numel() + 1)
                for m in layers)
    assert plan.replicated_bytes == codes + sum(b.numel() * b.element_size() for b in model.buffers())


def test_flat_parameter_wrappers_get_the_diagnostics_kbitprep_fsdp_does_not_need(zoo: Zoo) -> None:
    model = zoo.load("llama", "nf4-dq")
    assert plan_sharding(model, 2, upcast="norms").codes == ()
    assert plan_sharding(model, 2, upcast="norms", wrapper="fsdp1").codes == (
        "fsdp-mixed-dtype-unit", "fsdp-integer-storage")
    assert plan_sharding(model, 2, upcast="none", wrapper="fsdp1").codes == ("fsdp-integer-storage",)


def test_float_quant_storage_is_named_for_flat_parameter_wrappers(zoo: Zoo) -> None:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=torch.bfloat16)
    model = zoo.load("llama", "bf16", quantization_config=config)
    plan = plan_sharding(model, 2, upcast="none", wrapper="fsdp1")
    assert plan.codes == ("fsdp-float-storage",)
    message = plan.diagnostics[0].message
    assert "bitsandbytes#1945" in message and "kbitprep finetune --fsdp" in message


def test_int8_weights_cannot_be_sharded_and_the_fix_is_named(zoo: Zoo) -> None:
    plan = plan_sharding(zoo.load("llama", "int8"), 2)
    assert plan.codes == ("fsdp-unshardable-quantized",)
    assert "--quantize nf4" in plan.diagnostics[0].message


def test_a_parameter_shared_across_units_is_named(zoo: Zoo) -> None:
    model = zoo.load("llama", "bf16")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    plan = plan_sharding(model, 2)
    assert plan.codes == ("fsdp-tied-across-units",)
    assert "model.layers.0.mlp.up_proj.weight" in plan.diagnostics[0].message


@pytest.mark.parametrize(("processes", "wrapper"), [(0, "fsdp2"), (True, "fsdp2"), (2, "fsdp3")])
def test_bad_arguments_are_named(zoo: Zoo, processes: object, wrapper: str) -> None:
    with pytest.raises(ValueError, match=r"processes|wrapper"):
        plan_sharding(zoo.load("llama", "bf16"), processes, wrapper=wrapper)  # type: ignore[arg-type]
