"""Keeps benchmarks/ from rotting: each part of `benchmarks/run.py` on a tiny Qwen2, no timings asserted."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.checkpoints import save_random_checkpoint  # noqa: E402
from benchmarks.footprint import measure_footprint  # noqa: E402
from benchmarks.loss_memory import (  # noqa: E402
    LOSS_VARIANTS,
    LossMemoryResult,
    LossMemorySettings,
    LossRun,
    bf16_speed,
    slope,
)
from benchmarks.machine import describe_machine  # noqa: E402
from benchmarks.markdown import render  # noqa: E402
from benchmarks.packing import (  # noqa: E402
    PackingSettings,
    measure_packing,
    mixed_rows,
    render_packing,
)
from benchmarks.real_model import measure_real_model  # noqa: E402
from benchmarks.results import BenchmarkResults, check_targets  # noqa: E402
from benchmarks.shapes import PUBLISHED_CONFIGS, TINY_CONFIG  # noqa: E402
from benchmarks.training import (  # noqa: E402
    TrainingResult,
    TrainingSettings,
    synthetic_batches,
    train_variant,
)
from benchmarks.variants import VARIANTS  # noqa: E402


@pytest.fixture(scope="module")
def tiny_row():
    return measure_footprint("tiny-Qwen2", TINY_CONFIG)


def test_footprint_of_a_tiny_config_orders_the_policies(tiny_row):
    after = tiny_row.after
    assert list(after) == list(VARIANTS)
    assert after["all"] == after["reference"] == tiny_row.reference_rule
    assert tiny_row.floor == after["none"] < after["norms"] < after["all"]


def test_published_configs_build_on_meta():
    # Only the smallest: sizes the skeleton, allocates nothing.
    row = measure_footprint("Qwen2-0.5B", PUBLISHED_CONFIGS["Qwen2-0.5B"])
    assert 0.45e9 < row.parameters < 0.55e9
    assert row.after["all"] == row.after["reference"]


def test_real_tiny_model_agrees_with_the_meta_sizing(tiny_row, tmp_path):
    real = measure_real_model("tiny-Qwen2", TINY_CONFIG, list(VARIANTS), repeats=1, workdir=tmp_path,
                              log=lambda _: None)
    assert real.floors() == {tiny_row.floor}
    for name in VARIANTS:
        assert real.measured(name) == tiny_row.after[name] == real.of(name)[0].planned


def test_training_worker_and_report_render(tiny_row, tmp_path):
    settings = TrainingSettings(steps=2, warmup=1, batch_size=1, seq_len=16, threads=None)  # leave pytest's threads
    assert all((a == b).all() for a, b in zip(synthetic_batches(1024, settings), synthetic_batches(1024, settings)))
    checkpoint = save_random_checkpoint(TINY_CONFIG, tmp_path / "model")
    figures = train_variant(checkpoint, "norms", settings)
    assert figures["warnings_prepare"] == [] and figures["warnings_steps"] == []
    result = TrainingResult(**figures)
    training = {"reference": result, "all": result, "norms": result}  # the layout of a real run, figures reused

    results = BenchmarkResults(
        command="python benchmarks/run.py", started_utc="now", duration_s=1.0,
        machine=describe_machine(REPO_ROOT), footprint=[tiny_row], real=None, training_config=dict(TINY_CONFIG),
        training_footprint=tiny_row, training_settings=settings, training=training,
    )
    text = render(results)
    assert "## 1. Prepared footprint" in text and "## 2. Training" in text and "## 4. Warnings" in text
    assert "tiny-Qwen2" in text
    outcomes = {target.name: met for target, _, met in check_targets(results)}
    assert outcomes['"all" footprint equal to the reference, to the byte'] is True


def test_packing_benchmark_runs_and_renders():
    rows = mixed_rows(40, 64, vocab=100)
    assert all(16 <= len(row["input_ids"]) <= 64 for row in rows) and rows == mixed_rows(40, 64, vocab=100)
    result = measure_packing(PackingSettings(rows=12, seq_len=64, batch_size=2, steps=2, rounds=1, threads=1),
                             log=lambda _: None)
    assert result.packed.tokens < result.padded.tokens or result.packed.trained_tokens > result.padded.trained_tokens
    assert result.packing_summary["rows"] == 12 and result.packing_summary["padding_tokens_saved"] > 0
    text = "\n".join(render_packing(result))
    assert "## Packing: trained tokens per second" in text and "| packed |" in text


def test_fit_grid_runs_finetune_and_renders_its_section():
    from benchmarks.fit import QUICK_GRID, check_worst, measure_fit_grid, render_fit

    result = measure_fit_grid(QUICK_GRID[-1:], log=lambda _: None)  # one tiny GPT-2 run through finetune
    (row,) = result.rows
    assert row.measured > 0 and abs(row.error) <= 0.10
    assert check_worst(result)[1] is True
    text = "\n".join(render_fit(result))
    assert "## Fit check" in text and "| gpt2 |" in text


def test_slope_is_the_least_squares_bytes_per_token():
    assert slope({512: 1000, 1024: 2100, 2048: 4100}) == pytest.approx(2.0, rel=0.02)
    assert slope({512: 7}) == 0.0


def test_loss_memory_workers_and_section(tiny_row, tmp_path):
    """Both loss-memory variants in this process on the tiny Qwen2, and their section rendered from them."""
    settings = LossMemorySettings(seq_len=16, seq_lens=(8, 16), batch_size=1, steps=2, warmup=1, threads=None)
    checkpoint = save_random_checkpoint(TINY_CONFIG, tmp_path / "model")
    runs = {}
    for name in LOSS_VARIANTS:
        run = LossRun(checkpoint, name, settings)
        for _ in range(settings.steps):
            run.step()
        run.slope()
        runs[name] = LossMemoryResult(**run.figures())
    assert runs["kbitprep"].loss_plan["loss"] == "chunked" and runs["reference"].loss_plan is None
    assert runs["kbitprep"].losses == pytest.approx(runs["reference"].losses, rel=2e-2)  # norms vs all: bf16 noise
    assert set(runs["reference"].peak_by_tokens) == {"8", "16"}

    results = BenchmarkResults(
        command="python benchmarks/run.py", started_utc="now", duration_s=1.0,
        machine=describe_machine(REPO_ROOT), footprint=[tiny_row], real=None, training_config=dict(TINY_CONFIG),
        training_footprint=tiny_row, training_settings=None, training={},
        loss_memory_settings=settings, loss_memory_configs={"Qwen2-0.5B tiny": dict(TINY_CONFIG)},
        loss_memory={"Qwen2-0.5B tiny": runs}, bf16_speed=bf16_speed(tokens=8, vocabulary=512),  # the yardstick, small
    )
    text = render(results)
    assert "## Training peak memory with the chunked loss" in text and "peak at 16 tokens" in text
    outcomes = {target.name: met for target, _, met in check_targets(results)}
    assert outcomes["chunked loss: median step time <= 1.05x reference (both models)"] is not None


@pytest.mark.slow
def test_sharded_loading_runs_under_torchrun_and_renders(tiny_row, tmp_path):
    from benchmarks.sharded import TINY_SHARDED_CONFIG, ShardedResult, measure_sharded

    measured = measure_sharded(TINY_SHARDED_CONFIG, processes=(2,), workdir=tmp_path, log=lambda _: None)
    two = measured.run(2)
    assert len(two.local_bytes) == 2 and sum(two.local_bytes) == two.parameter_bytes
    assert all(peak >= loaded > 0 for peak, loaded in zip(two.peak_rss, two.loaded_rss, strict=True))
    # One launch only, to stay cheap: the N=1 row is stood in by the whole model on one rank.
    one = dataclasses.replace(two, processes=1, local_bytes=[two.parameter_bytes], peak_rss=two.peak_rss[:1],
                              loaded_rss=two.loaded_rss[:1])
    sharded = ShardedResult(measured.model, measured.parameters, [one, two])
    results = BenchmarkResults(
        command="python benchmarks/run.py", started_utc="now", duration_s=1.0, machine=describe_machine(REPO_ROOT),
        footprint=[tiny_row], real=None, training_config=dict(TINY_CONFIG), training_footprint=tiny_row,
        training_settings=None, training={}, sharded=sharded,
    )
    assert "## FSDP-QLoRA" in render(results)
    outcomes = {target.name: met for target, _, met in check_targets(results)}
    assert outcomes["finetune --fsdp: per-process parameter bytes at N=2 <= 0.55x of one process"] is True


def test_a_time_budget_cuts_the_rounds_and_the_table_says_so(tiny_row, monkeypatch):
    """Treating bf16 as slow (as on an AVX2-only CPU) makes the workers compute in fp32; a budget far below one
    round's time runs only warm-up + 2 rounds of the 6 asked, and section 2 says it ran fewer."""
    from benchmarks.pace import SLOW_BF16_ENV, Progress, bench_compute_dtype
    from benchmarks.training import run_training

    from kbitprep import override_fast_dtypes

    with override_fast_dtypes("cpu", set()):
        assert bench_compute_dtype() == torch.float32
    with override_fast_dtypes("cpu", {torch.bfloat16}):
        assert bench_compute_dtype() == torch.bfloat16
    lines: list[str] = []
    progress = Progress("rounds", 4, lines.append, unit="round", every_s=0)
    progress.advance()
    progress.advance(total=2)
    assert lines[0].startswith("    rounds: round 1/4,") and "left" in lines[0]
    assert lines[1].startswith("    rounds: round 2/2,") and lines[1].endswith("about 0:00 left")

    monkeypatch.setenv(SLOW_BF16_ENV, "1")
    settings = TrainingSettings(steps=6, warmup=1, batch_size=1, seq_len=16, threads=1, budget_s=1e-3)
    log: list[str] = []
    training = run_training(TINY_CONFIG, ["reference", "norms"], settings, log=log.append)
    assert [result.steps for result in training.values()] == [3, 3]
    assert {result.compute_dtype for result in training.values()} == {"float32"}
    assert any("3 of 6 rounds, the time budget" in line for line in log)
    results = BenchmarkResults(
        command="python benchmarks/run.py", started_utc="now", duration_s=1.0,
        machine=describe_machine(REPO_ROOT), footprint=[tiny_row], real=None, training_config=dict(TINY_CONFIG),
        training_footprint=tiny_row, training_settings=settings, training={**training, "all": training["norms"]},
        compute_dtype="float32", bf16_treated_slow=True,
    )
    text = render(results)
    assert "3 of 6 steps (**fewer: the section's time budget" in text
    assert f"float32 compute: what kbitprep picks on this CPU, bf16 treated as slow by `{SLOW_BF16_ENV}=1`" in text


def test_the_trl_section_runs_both_workers_in_quick_mode(tmp_path):
    """`run.py --quick --only trl`: kbitprep's and TRL's SFTTrainer's rows, each from its own process, with figures."""
    import json
    import os
    import subprocess

    report, figures = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only", "trl", "--output", str(report),
                    "--json", str(figures)], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    runs = json.loads(figures.read_text())["trl"]
    assert set(runs) == {"kbitprep", "trl"}
    for run in runs.values():
        assert run["peak_from_prepare_bytes"] > run["rss_after_load_bytes"] > 0
        assert len(run["step_wall_s"]) == 3 and all(seconds > 0 for seconds in run["step_wall_s"])
    assert runs["trl"]["options"].startswith("trl 1.")
    text = report.read_text()
    section = text[text.index("## kbitprep against TRL's SFTTrainer"):]
    assert "| kbitprep \"norms\" + chunked loss |" in section and "| TRL SFTTrainer (its chunked LM head) |" in section
    assert "| **kbitprep / TRL** |" in section


def test_the_dpo_section_measures_both_losses_and_rewrites_only_its_own_part(tmp_path):
    """`run.py --quick --only dpo`: the full-logit and chunked DPO steps, each from its own process, written between
    the section's markers; the rest of BENCHMARKS.md stays as it was."""
    import os
    import subprocess

    from benchmarks.preference_memory import BEGIN, END

    report = tmp_path / "BENCHMARKS.md"
    report.write_text(f"# kept\n\n{BEGIN}\nold figures\n{END}\n\n## also kept\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only", "dpo", "--output", str(report)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)
    text = report.read_text()
    assert text.startswith("# kept\n") and text.endswith("## also kept\n") and "old figures" not in text
    section = text[text.index(BEGIN):text.index(END)]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and "MiB" not in line}
    full, chunked = rows["full logits (`--loss full`)"], rows["chunked log-probabilities (default)"]
    live = {name: float(row[0].replace(",", "")) for name, row in (("full", full), ("chunked", chunked))}
    assert 0 < live["chunked"] < 0.8 * live["full"]  # 32,000 tokens of vocabulary: the logits weigh
    for row in (full, chunked):  # the memory model's prediction for the step, within 10% of the live peak
        assert abs(float(row[3].rstrip("%"))) <= 10, row
    assert "TRL 1.16's DPOTrainer computes its LM head in tiles" in section


def test_a_bench_run_keeps_the_sections_other_scripts_wrote(tmp_path: Path) -> None:
    from benchmarks.run import with_kept_sections

    path = tmp_path / "BENCHMARKS.md"
    sweep = "<!-- memory-sweep: begin -->\n## sweep\n| a |\n<!-- memory-sweep: end -->"
    path.write_text(f"# old run\n\n{sweep}\n\n<!-- trl-sft: begin -->\nold trl\n<!-- trl-sft: end -->\n")
    text = with_kept_sections("# new run\n\n<!-- trl-sft: begin -->\nnew trl\n<!-- trl-sft: end -->\n", path)
    assert text.startswith("# new run") and "old run" not in text
    assert sweep in text  # written by make sweep, kept as it was
    assert "new trl" in text and "old trl" not in text  # written by this run: the new one only
