"""`kbitprep merge --verify`: the written model against the run's 4-bit base + adapter on the run's rows.

- On a normal run the figures pass: max |logit difference| within the tolerance of the
  coarser of the run's compute dtype and the merged dtype, greedy agreement high; the
  report, the folder's kbitprep-merge.json and the command's output carry them, and the
  figures equal a comparison computed here from the run's model and the written folder.
- A tampered merged weight fails, naming the figure and the tolerance; through the command
  it is one `error:` line and nothing is written.
- The run's data gone: a clear error naming the file and the fix. A GGUF that llama.cpp
  cannot load fails naming llama.cpp, where llama-cpp-python is installed; where it is not,
  the GGUF is not compared and the folder's figures stand alone.
- Every --gguf-dtype is judged: f32/f16/bf16 at float16 or coarser, each quantized type by
  twice its measured error (BENCHMARKS.md), coarser types looser; past it the GGUF fails.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from kbitprep.app.export.merge import MERGE_RECORD, merge_run, read_finished_run, run_tokenizer
from kbitprep.app.export.verify import (
    GGUF_QUANT_MEASURED,
    GGUF_QUANT_TOLERANCES,
    VERIFY_TOLERANCES,
    VerifyError,
    VerifyFigures,
    check_figures,
    gguf_tolerance,
    verify_merged,
)

TAMPERED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import run_demo

    run = tmp_path_factory.mktemp("verify") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_demo(run, max_steps=12)
    return run


def _reference(run: Path, folder: Path) -> tuple[float, float]:
    """(max |logit difference|, greedy agreement) computed here: the run's model vs the folder, first 4 rows."""
    from transformers import AutoModelForCausalLM

    from kbitprep.app.data.files import read_data
    from kbitprep.app.data.tokenize import tokenize_rows
    from kbitprep.app.export.run_model import load_run_model

    finished = read_finished_run(run)
    settings = finished.settings
    rows = tokenize_rows(read_data(settings["data"])[:4], run_tokenizer(finished), settings["seq_len"]).examples
    ours = load_run_model(settings, finished.adapter)
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    differences, agreements = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            a, b = ours(input_ids=ids).logits[0].float(), theirs(input_ids=ids).logits[0].float()
            differences.append((a - b).abs().max())
            agreements.append((a.argmax(-1) == b.argmax(-1)).float())
    return torch.stack(differences).max().item(), torch.cat(agreements).mean().item()


@pytest.mark.slow
def test_verify_passes_on_a_normal_run_and_the_report_carries_the_figures(finished_run: Path, tmp_path: Path,
                                                                          capsys) -> None:
    from kbitprep.cli import main

    output = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--output", str(output), "--verify"]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((output / MERGE_RECORD).read_text())["verify"]
    assert len(recorded) == 1  # no --gguf: the folder alone
    figures = recorded[0]
    assert figures["model"] == "merged" and figures["dtype"] == "bfloat16" and figures["passed"]
    assert figures["rows"] == 4 and figures["positions"] > 40
    assert figures["tolerance"] == VERIFY_TOLERANCES["bfloat16"] and figures["relative"] <= figures["tolerance"]
    assert figures["agreement"] >= figures["min_agreement"]
    assert figures["relative"] == pytest.approx(figures["max_abs"] / figures["scale"])
    max_abs, agreement = _reference(finished_run, output)
    assert figures["max_abs"] == pytest.approx(max_abs, rel=1e-6)
    assert figures["agreement"] == pytest.approx(agreement)
    assert f"max |logit difference| {figures['max_abs']:.4g}" in out and f"tolerance {figures['tolerance']:g}" in out


def _tamper(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[TAMPERED] = tensors[TAMPERED] * 2
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_a_tampered_merged_weight_fails_naming_the_figure_and_the_tolerance(finished_run: Path,
                                                                           tmp_path: Path) -> None:
    report = merge_run(finished_run, tmp_path / "merged", dtype="fp32")
    assert report.verify is None  # not asked for
    run = read_finished_run(finished_run)
    tokenizer = run_tokenizer(run)
    (before,) = verify_merged(run.settings, run.adapter, tokenizer, tmp_path / "merged")
    check_figures([before])  # the untouched folder passes
    _tamper(tmp_path / "merged")
    (after,) = verify_merged(run.settings, run.adapter, tokenizer, tmp_path / "merged")
    assert after.relative > after.tolerance > before.relative
    with pytest.raises(VerifyError, match=r"merged: max \|logit difference\| .* beyond the tolerance 0\.03"):
        check_figures([after])


@pytest.mark.slow
def test_the_command_fails_on_a_bad_merge_with_one_error_line_and_writes_nothing(
        finished_run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from kbitprep.app.export import merge
    from kbitprep.cli import main

    real = merge.merge_adapter

    def doubled(model, adapter, dtype):  # a merge gone wrong: one layer's weight twice what it should be
        count = real(model, adapter, dtype)
        layer = model.get_submodule(TAMPERED.removesuffix(".weight"))
        layer.weight.data.mul_(2)
        return count

    monkeypatch.setattr(merge, "merge_adapter", doubled)
    output = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--output", str(output), "--verify"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("kbitprep: error: merge --verify: merged: max |logit difference|") and "\n" not in err
    assert "beyond the tolerance 0.03" in err and "nothing was written" in err
    assert not output.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_verify_without_the_runs_data_names_the_file(finished_run: Path, tmp_path: Path) -> None:
    run = read_finished_run(finished_run)
    settings = {**run.settings, "data": str(tmp_path / "moved.jsonl")}
    with pytest.raises(VerifyError, match=r"moved\.jsonl: --verify compares on rows of the run.s data"):
        verify_merged(settings, run.adapter, run_tokenizer(run), tmp_path)


@pytest.mark.slow
def test_a_gguf_llama_cpp_cannot_load_fails_where_llama_cpp_is_installed(finished_run: Path, tmp_path: Path) -> None:
    import importlib.util

    run = read_finished_run(finished_run)
    merge_run(finished_run, tmp_path / "merged", dtype="fp32")
    damaged = tmp_path / "merged" / "model.gguf"
    damaged.write_bytes(b"GGUF" + b"\x00" * 60)  # a header and nothing more
    if importlib.util.find_spec("llama_cpp") is None:
        figures = verify_merged(run.settings, run.adapter, run_tokenizer(run), tmp_path / "merged", gguf=damaged)
        assert [f.model for f in figures] == ["merged"]
        return
    with pytest.raises(VerifyError, match=r"gguf: llama\.cpp cannot load model\.gguf \(ValueError: .*would not run"):
        verify_merged(run.settings, run.adapter, run_tokenizer(run), tmp_path / "merged", gguf=damaged)


def test_every_gguf_dtype_is_judged_by_a_tolerance_from_its_measured_error() -> None:
    from kbitprep.app.export.gguf_quant import GGUF_DTYPES

    assert set(GGUF_DTYPES) <= set(GGUF_QUANT_TOLERANCES) | {"f32", "f16", "bf16"}
    assert gguf_tolerance("f32", "float32") == VERIFY_TOLERANCES["float16"]  # llama.cpp's f16 KV cache
    assert gguf_tolerance("f16", "bfloat16") == VERIFY_TOLERANCES["bfloat16"]
    for name, figure in GGUF_QUANT_MEASURED.items():
        assert figure < gguf_tolerance(name, "float32") <= 2 * figure + 0.005
    assert gguf_tolerance("q8_0", "float32") == 0.05 < gguf_tolerance("q6_k", "float32") < gguf_tolerance(
        "q4_k_m", "float32") < gguf_tolerance("q2_k", "float32")
    assert gguf_tolerance("q8_0", "bfloat16") == 0.05  # the quantization, not the run's bf16, bounds it
    assert gguf_tolerance("iq1_s", "float32") is None  # no measured figure: reported, not judged
    off = VerifyFigures("gguf", "q8_0", 4, 90, 0.6, 10.0, 0.06, 0.98, gguf_tolerance("q8_0", "float32"), None)
    with pytest.raises(VerifyError, match=r"gguf: max \|logit difference\| 0\.6 is 0\.06 .* the tolerance 0\.05:"):
        check_figures([off])
    check_figures([dataclasses.replace(off, max_abs=0.4, relative=0.04)])
