"""Which precisions a device computes fast: the reported-capability rules, the timing probe, the override."""

from __future__ import annotations

import pytest
import torch

from kbitprep import precision
from kbitprep.precision import compute_dtype_for, computes_fast, device_precision, override_fast_dtypes


def test_cpu_answer_follows_onednn_support():
    found = device_precision("cpu")
    expected_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (torch.bfloat16 in found.fast) == expected_bf16
    assert torch.float32 in found.fast
    assert torch.backends.cpu.get_cpu_capability() in found.source


def test_answer_is_cached(monkeypatch):
    calls = []
    monkeypatch.setitem(precision._DETECTORS, "cpu", lambda: calls.append(1) or precision._cpu_precision())
    precision._detected.cache_clear()
    try:
        device_precision("cpu"), device_precision(torch.device("cpu"))
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
    before = device_precision("cpu")
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
