"""Which precisions a device computes fast: the reported-capability rules, the timing probe, the override."""

from __future__ import annotations

import pytest
import torch

from kbitprep import plan_preparation, precision
from kbitprep.precision import compute_dtype_for, computes_fast, device_precision, override_fast_dtypes


def test_cpu_answer_follows_onednn_support():
    found = precision._cpu_precision()  # the rule itself, not the tests' pinned answer (conftest)
    expected_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (torch.bfloat16 in found.fast) == expected_bf16
    assert torch.float32 in found.fast
    assert torch.backends.cpu.get_cpu_capability() in found.source


def test_answer_is_cached(monkeypatch):
    calls = []
    monkeypatch.setitem(precision._DETECTORS, "cpu", lambda: calls.append(1) or precision._cpu_precision())
    precision._detected.cache_clear()
    try:
        precision._detected("cpu"), precision._detected("cpu")
        assert calls == [1]
    finally:
        precision._detected.cache_clear()


@pytest.mark.parametrize("fast, expected", [({torch.bfloat16}, torch.bfloat16), (set(), torch.float32)],
                         ids=["fast-bf16", "slow-bf16"])
def test_half_precision_is_kept_only_where_it_is_fast(fast, expected):
    with override_fast_dtypes("cpu", fast):
        assert compute_dtype_for(torch.bfloat16, "cpu") == expected
        assert computes_fast(torch.bfloat16, "cpu") == (expected == torch.bfloat16)
        assert compute_dtype_for(torch.float32, "cpu") == torch.float32  # never changed
        assert compute_dtype_for(torch.int8, "cpu") == torch.int8  # not a float: left alone
        assert "override" in device_precision("cpu").source


def test_override_is_undone_after_the_block():
    before = device_precision("cpu")  # conftest's pinned answer, restored after the nested overrides
    with override_fast_dtypes("cpu", set()), override_fast_dtypes("cpu", {torch.float16}):
        assert device_precision("cpu").fast == {torch.float32, torch.float16}
    assert device_precision("cpu") == before


def test_cuda_rule_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    turing = precision._cuda_precision()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))
    ampere = precision._cuda_precision()
    assert turing.fast == {torch.float32, torch.float16} and "7.5" in turing.source
    assert ampere.fast == {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("bf16_time, fast", [(0.9, True), (20.0, False)], ids=["bf16-fast", "bf16-slow"])
def test_unknown_devices_are_timed(monkeypatch, bf16_time, fast):
    times = {torch.float32: 1.0, torch.bfloat16: bf16_time, torch.float16: 1.6}
    monkeypatch.setattr(precision, "_time_matmul", lambda device_type, dtype: times[dtype])
    found = precision._probed_precision("xpu")
    assert (torch.bfloat16 in found.fast) == fast
    assert torch.float16 not in found.fast  # 1.6x the fp32 time is over the 1.5x limit
    assert "timing probe" in found.source


def test_a_device_without_half_kernels_gets_fp32_only(monkeypatch):
    def fail(device_type, dtype):
        raise RuntimeError(f"no kernel for {dtype}")

    monkeypatch.setattr(precision, "_time_matmul", fail)
    assert precision._probed_precision("xpu").fast == {torch.float32}


def test_timing_probe_runs_on_this_cpu():
    assert precision._time_matmul("cpu", torch.float32) > 0


def _bf16_llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


@pytest.mark.parametrize("upcast", ["none", "norms", "all"])
@pytest.mark.parametrize("fast", [{torch.bfloat16}, set()], ids=["bf16-fast", "bf16-slow"])
def test_plan_warns_with_a_code_when_layers_compute_in_a_slow_precision(fast, upcast):
    with override_fast_dtypes("cpu", fast):
        plan = plan_preparation(_bf16_llama(), upcast=upcast)
    slow = set() if fast or upcast == "all" else {"slow-head-precision", "slow-precision"}
    assert slow == {"slow-head-precision", "slow-precision"} & set(plan.codes)
    for diagnostic in plan.diagnostics:
        if diagnostic.code == "slow-head-precision":  # names the head, the cost of the fix and the other fix
            assert "lm_head" in diagnostic.message and "upcast='all'" in diagnostic.message
            assert f"+{128 * 32 * 2:,} bytes" in diagnostic.message and "causal_lm_loss" in diagnostic.message


def test_four_bit_compute_dtype_in_a_slow_precision_names_bnb_4bit_compute_dtype(zoo):
    model = zoo.load("llama", "nf4-dq")  # bf16 compute dtype
    with override_fast_dtypes("cpu", set()):
        plan = plan_preparation(model, upcast="all")
    (diagnostic,) = [d for d in plan.diagnostics if d.code == "slow-precision"]
    assert "bnb_4bit_compute_dtype=torch.float32" in diagnostic.message and "q_proj" in diagnostic.message
    with override_fast_dtypes("cpu", {torch.bfloat16}):
        assert "slow-precision" not in plan_preparation(model, upcast="all").codes


@pytest.mark.parametrize("fast, expected", [({torch.bfloat16}, torch.bfloat16), (set(), torch.float32)],
                         ids=["fast-bf16", "slow-bf16"])
def test_the_command_picks_the_4bit_compute_dtype_by_the_same_rule(fast, expected):
    from kbitprep.app.model.loading import resolve_compute_dtype

    config = {"dtype": "bfloat16"}
    with override_fast_dtypes("cpu", fast):
        assert resolve_compute_dtype(config, "auto", "cpu") == expected
        assert resolve_compute_dtype(config, "float16", "cpu") == torch.float16  # the user's choice stands
    assert resolve_compute_dtype({}, "auto", "cpu") == torch.float32  # no dtype in the config: float32


def test_each_backend_row_says_how_its_own_layers_compute_in_float32():
    from kbitprep.backends import BACKENDS, RECOMMENDED_BACKEND

    rows = {row.name: row for row in BACKENDS}
    assert "bnb_4bit_compute_dtype=torch.float32" in rows["bitsandbytes-4bit"].compute_float32
    assert "QuantoConfig" in rows["quanto"].compute_float32
    assert "TorchAoConfig" in rows["torchao"].compute_float32
    others = [row for name, row in rows.items() if not name.startswith("bitsandbytes")]
    assert not any("BitsAndBytesConfig" in row.compute_float32 for row in others)
    assert RECOMMENDED_BACKEND.name == "bitsandbytes-4bit" and "BitsAndBytesConfig" in RECOMMENDED_BACKEND.load_for_qlora
