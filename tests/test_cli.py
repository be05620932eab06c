"""The `kbitprep` command run as a user runs it: in a subprocess, on tiny local models.

Every run trains the shipped tiny Llama (2 layers, hidden 64) for a few dozen steps with
one thread per process (OMP_NUM_THREADS=1), which on a tiny model is faster than two
threads competing for two busy cores. Checked here:

- `demo` trains (loss falls by >= 30%) and writes adapter, report and plot, and refuses
  to overwrite a finished run;
- `finetune` with `prompt`/`completion` rows and with `text` rows; the saved adapter,
  loaded back onto the 4-bit base with peft, gives the loss the run reported;
- `inspect` sizes a Llama-3-70B-shaped config.json from the config alone;
- every error case exits non-zero with one line that names the problem, and leaves no
  output behind;
- a run killed with SIGKILL resumes from its last complete checkpoint (ignoring one cut
  short while saving) and ends with the same adapter as an uninterrupted run;
- a two-process `torchrun` run (gloo) writes one adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import as_a_subprocess_computes

KBITPREP = Path(sys.executable).with_name("kbitprep")
COMMAND = [str(KBITPREP)] if KBITPREP.exists() else [sys.executable, "-m", "kbitprep"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KBITPREP_DEBUG": "", "PYTHONWARNINGS": ""}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Settings under which the tiny model learns in tens of steps; dropout on, to show it is seeded.
FAST = ["--lr", "1e-2", "--batch-size", "4", "--lora-r", "8", "--lora-alpha", "16", "--seq-len", "48"]


def kbitprep(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_error(result: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> None:
    """Exit code `code`, no traceback, and one `kbitprep: error:` line holding every fragment."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_model(workdir: Path) -> Path:
    from kbitprep.app.demo import build_tiny_model

    return build_tiny_model(workdir / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def prompt_data(workdir: Path) -> Path:
    rows = []
    for i in range(48):
        start = (7 * i) % 26
        rows.append({"prompt": f"after {ALPHABET[start]}:",
                     "completion": " " + "".join(ALPHABET[(start + k) % 26] for k in range(1, 9))})
    return write_jsonl(workdir / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def text_data(workdir: Path) -> Path:
    rows = [{"text": "".join(ALPHABET[(i + k) % 26] for k in range(10 + i % 15))} for i in range(48)]
    return write_jsonl(workdir / "text.jsonl", rows)


@pytest.fixture(scope="module")
def finished_run(workdir: Path, tiny_model: Path, prompt_data: Path) -> Path:
    """A finished `finetune` run on prompt/completion rows (NF4, the default upcast "norms", dropout 0.1)."""
    run = workdir / "run-prompts"
    result = kbitprep("finetune", tiny_model, prompt_data, "--output", run, "--max-steps", "30",
                      "--lora-dropout", "0.1", "--sample", "after c:", *FAST)
    assert result.returncode == 0, result.stderr
    return run


# --- demo --------------------------------------------------------------------------------


def test_demo_learns_and_writes_its_outputs(workdir: Path) -> None:
    run = workdir / "demo"
    result = kbitprep("demo", "--output", run, "--max-steps", "50")
    assert result.returncode == 0, result.stderr
    assert "kbitprep preparation plan" in result.stdout and "bitsandbytes-4bit" in result.stdout
    assert "sample before training" in result.stdout and "sample after  training" in result.stdout
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr

    report = report_of(run)
    losses = [entry["loss"] for entry in report["loss_history"]]
    assert len(losses) == 50 and report["steps"] == 50
    assert sum(losses[-5:]) / 5 <= 0.7 * losses[0]  # the training loss falls by at least 30%
    assert report["loss_drop"] >= 0.3 and report["batch_loss_after"] <= 0.7 * report["batch_loss_before"]
    assert report["plan"]["quantization"] == "bitsandbytes-4bit"
    # The command's defaults: upcast "norms", the chunked loss; the peak it measured is recorded.
    assert report["settings"]["upcast"] == "norms" and report["settings"]["loss"] == "chunked"
    assert report["loss"]["loss"] == "chunked" and report["loss"]["reason"] is None
    assert report["loss"]["measured_peak"]["bytes"] > 0
    assert report["model"]["compute_dtype"] in ("bfloat16", "float32")
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "kbitprep"}
    assert {"load_s", "train_s", "total_s"} <= set(report["timings"])
    assert [s["prompt"] for s in report["samples"]] == ["klm", "3456"]
    assert sorted(p.name for p in run.iterdir()) == [".kbitprep-manifest.json", "adapter", "base-model", "loss.png",
                                                     "report.json", "run.yaml"]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (run / "adapter").iterdir()}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (run / "report.json").stat().st_mtime_ns
    again = kbitprep("demo", "--output", run, "--max-steps", "50")
    assert_error(again, str(run), "finished run", "--overwrite")
    assert (run / "report.json").stat().st_mtime_ns == before


# --- finetune ------------------------------------------------------------------------------


def test_finetune_prompt_completion_adapter_reloads_with_the_reported_loss(
        finished_run: Path, tiny_model: Path, prompt_data: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.data.jsonl import read_jsonl
    from kbitprep.app.data.tokenize import tokenize_rows
    from kbitprep.app.training.run import batch_loss, first_batch
    from kbitprep.app.model.loading import load_quantized_model, load_tokenizer

    report = report_of(finished_run)
    assert report["status"] == "finished" and report["steps"] == 30
    assert report["data"]["rows"] == 48 and report["settings"]["lora_dropout"] == 0.1
    assert report["batch_loss_after"] < 0.7 * report["batch_loss_before"]
    assert not (finished_run / "INCOMPLETE").exists() and not (finished_run / "checkpoints").exists()

    tokenizer = load_tokenizer(tiny_model)
    data = tokenize_rows(read_jsonl(prompt_data), tokenizer, seq_len=48)
    # Only the completion is trained: every prompt position is masked out.
    first = data.examples[0]
    prompt_length = 1 + len(tokenizer("after a:", add_special_tokens=False)["input_ids"])
    assert first["labels"][:prompt_length] == [-100] * prompt_length
    assert first["labels"][prompt_length:] == first["input_ids"][prompt_length:]

    batch = first_batch(data, 4, tokenizer.pad_token_id)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    # The run was a command in another process: it chose its precisions by this machine.
    with warnings.catch_warnings(), as_a_subprocess_computes():
        # peft's get/from_pretrained reads a deprecated transformers property
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # Prepared as training prepared it (the same upcast), the base computes as training did.
        base = prepare_model_for_kbit_training(load_quantized_model(tiny_model, "nf4"),
                                               upcast=report["settings"]["upcast"])
        model = PeftModel.from_pretrained(base, finished_run / "adapter")
        plain = PeftModel.from_pretrained(plain, finished_run / "adapter")
        # kbitprep's loader and preparation compute as training did, and so does the run's loss
        # (the chunked loss computes the head in the device's fast precision): the same loss.
        after = batch_loss(model, batch, report["settings"]["loss"])
    assert after == pytest.approx(report["batch_loss_after"], rel=1e-6, abs=1e-6)
    # A plain transformers load keeps the bf16 base in bf16 and may run bitsandbytes' CPU
    # inference kernel: equal to ~1e-3.
    assert batch_loss(plain, batch) == pytest.approx(report["batch_loss_after"], rel=5e-3)


def test_finetune_text_rows_with_fp4_norms_and_named_targets(workdir: Path, tiny_model: Path, text_data: Path) -> None:
    run = workdir / "run-text"
    result = kbitprep("finetune", tiny_model, text_data, "--output", run, "--max-steps", "20", "--quantize", "fp4",
                      "--upcast", "norms", "--target-modules", "q_proj,v_proj,down_proj", "--grad-accum", "2",
                      "--lora-dropout", "0", *FAST)
    assert result.returncode == 0, result.stderr
    report = report_of(run)
    assert report["settings"]["quantize"] == "fp4" and report["plan"]["upcast"] == "norms"
    assert report["loss"]["loss"] == "chunked"  # the default, here with gradient accumulation
    assert report["settings"]["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert report["batch_loss_after"] < 0.8 * report["batch_loss_before"]
    names = adapter_tensors(run)
    assert names and all(any(t in name for t in ("q_proj", "v_proj", "down_proj")) for name in names)


# --- inspect -------------------------------------------------------------------------------

LLAMA_3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def test_inspect_sizes_a_70b_config_from_config_json_alone(workdir: Path) -> None:
    """How long this takes is measured in benchmarks/ (section 1 of BENCHMARKS.md), not asserted here."""
    folder = workdir / "llama-3-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_70B))
    result = kbitprep("inspect", folder, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "meta" and set(data["plans"]) == {"all", "norms", "none"}
    plans = data["plans"]
    counts = plans["none"]["parameter_counts"]
    assert 68e9 < counts["quantized"] < 69e9 and 2.0e9 < counts["float"] < 2.2e9  # 70.6B in all
    # bf16 embeddings and head to fp32 under "all": + 2 * 128256 * 8192 * 2 bytes, plus the norms
    assert plans["all"]["bytes_after"] - plans["all"]["bytes_before"] > 4.2e9
    assert plans["norms"]["bytes_after"] - plans["norms"]["bytes_before"] < 3e6
    assert plans["none"]["bytes_after"] == plans["none"]["bytes_before"]
    assert all(not plan["errors"] for plan in plans.values())


def test_inspect_sizes_each_process_of_a_sharded_70b_run(workdir: Path) -> None:
    """`inspect --devices 2` on the Llama-3-70B config (its time is in benchmarks/, not asserted)."""
    from kbitprep.app.model.inspection import inspect_model

    folder = workdir / "llama-3-70b-sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_70B))
    data = inspect_model(folder, devices=2).to_dict()
    counts = data["plans"]["none"]["parameter_counts"]
    # Two processes each hold half of the base: 80 blocks and a 128256-row embedding split evenly.
    sharded = data["sharding"]["none"]["fsdp2"]
    assert data["devices"] == 2 and sharded["per_process"][0] == sharded["per_process"][1]
    assert 2 * sharded["per_process"][0] == sharded["parameter_bytes"]
    # The packed 4-bit bytes plus their absmax (1/64 of a value each, double quantized) and the bf16 rest.
    packed, absmax = counts["quantized"] // 2, counts["quantized"] // 64
    assert sharded["parameter_bytes"] == pytest.approx(packed + absmax + 2 * counts["float"], rel=1e-3)
    assert sharded["diagnostics"] == [] and "fsdp-integer-storage" in {
        d["code"] for d in data["sharding"]["none"]["fsdp1"]["diagnostics"]}


def test_inspect_renders_a_table_for_a_saved_model(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.cli import main

    assert main(["inspect", str(tiny_model), "--meta"]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes-4bit" in out and "upcast" in out
    assert all(policy in out for policy in ("all", "norms", "none"))


# --- errors --------------------------------------------------------------------------------


def _bad_model_folder(workdir: Path, kind: str) -> Path:
    folder = workdir / f"model-{kind}"
    folder.mkdir(exist_ok=True)
    if kind == "bad-json":
        (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    return folder


@pytest.mark.parametrize("case", [
    "missing-model", "model-without-config", "config-not-json", "line-not-json", "row-without-fields",
    "empty-data", "unknown-target-module",
])
def test_errors_exit_with_one_line_and_leave_nothing(case: str, workdir: Path, tiny_model: Path,
                                                     text_data: Path) -> None:
    model, data, expected = tiny_model, text_data, []
    if case == "missing-model":
        model = workdir / "no-such-model"
        expected = [str(model), "no such model folder"]
    elif case == "model-without-config":
        model = _bad_model_folder(workdir, "empty")
        expected = [str(model / "config.json"), "no such file"]
    elif case == "config-not-json":
        model = _bad_model_folder(workdir, "bad-json")
        expected = [f"{model / 'config.json'}:3", "not valid JSON"]
    elif case == "line-not-json":
        rows = [{"text": "abc"}, {"text": "def"}, '{"text": "gh', {"text": "x"}]
        data = write_jsonl(workdir / "bad-line.jsonl", rows)
        expected = [f"{data}:3", "not valid JSON"]
    elif case == "row-without-fields":
        data = write_jsonl(workdir / "no-fields.jsonl", [{"text": "abc"}, {"prompt": "only a prompt"}])
        expected = [f"{data}:2", "\"completion\""]
    elif case == "empty-data":
        data = workdir / "empty.jsonl"
        data.write_text("\n\n")
        expected = [str(data), "holds no rows"]
    elif case == "unknown-target-module":
        expected = ["--target-modules", "no_such_proj", "q_proj"]
    output = workdir / f"out-{case}"
    extra = ["--target-modules", "no_such_proj"] if case == "unknown-target-module" else []
    result = kbitprep("finetune", model, data, "--output", output, "--max-steps", "2", *extra, *FAST)
    assert_error(result, *expected)
    assert not output.exists(), sorted(p.name for p in output.rglob("*"))


def test_unknown_option_value_is_refused_before_anything_runs(workdir: Path, tiny_model: Path, text_data: Path) -> None:
    output = workdir / "out-bad-option"
    result = kbitprep("finetune", tiny_model, text_data, "--output", output, "--quantize", "nf5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--quantize" in result.stderr and "nf5" in result.stderr and "nf4" in result.stderr
    assert not output.exists()


def test_finetune_refuses_to_overwrite_a_finished_run(finished_run: Path, tiny_model: Path, text_data: Path) -> None:
    files = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    result = kbitprep("finetune", tiny_model, text_data, "--output", finished_run, "--max-steps", "2")
    assert_error(result, str(finished_run), "finished run", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == files


# --- crash and resume ------------------------------------------------------------------------

RESUMABLE_STEPS = 40
RESUMABLE = ["--max-steps", str(RESUMABLE_STEPS), "--save-steps", "10", "--lora-dropout", "0.1", *FAST]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(workdir: Path, tiny_model: Path, prompt_data: Path) -> None:
    from kbitprep.app.training.run import FinetuneError, FinetuneSettings, finetune

    killed = workdir / "killed"
    process = subprocess.Popen([*COMMAND, "finetune", str(tiny_model), str(prompt_data), "--output", str(killed),
                                *RESUMABLE], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # No deadline: the loop ends when a checkpoint is complete or when the run ends (a failure), however slow the machine.
    while not list(killed.glob("checkpoints/checkpoint-*/kbitprep-complete.json")):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    # Killed mid-run: clearly unfinished, nothing that looks like a result.
    assert (killed / "INCOMPLETE").exists()
    assert not any((killed / name).exists() for name in ("report.json", "adapter", "loss.png"))
    saved = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoints/checkpoint-*")
                if (p / "kbitprep-complete.json").exists())
    assert saved < RESUMABLE_STEPS

    # A checkpoint cut short while saving (no completeness marker) must be ignored and removed.
    cut_short = killed / "checkpoints" / "checkpoint-999"
    shutil.copytree(killed / "checkpoints" / f"checkpoint-{saved}", cut_short)
    (cut_short / "kbitprep-complete.json").unlink()
    (cut_short / "adapter_model.safetensors").write_bytes(b"truncated")

    not_resumed = kbitprep("finetune", tiny_model, prompt_data, "--output", killed, *RESUMABLE)
    assert_error(not_resumed, "unfinished run", "--resume")
    with pytest.raises(FinetuneError, match="--resume with settings that differ.*lr 0.01 \\(run\\) vs 0.02"):
        finetune(FinetuneSettings(str(tiny_model), str(prompt_data), str(killed), lr=2e-2, resume=True))

    resumed = kbitprep("finetune", tiny_model, prompt_data, "--output", killed, "--resume", *RESUMABLE)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from checkpoint-{saved}" in resumed.stdout and "checkpoint-999" in resumed.stdout
    report = report_of(killed)
    assert report["resumed_from_step"] == saved and report["steps"] == RESUMABLE_STEPS
    assert [entry["step"] for entry in report["loss_history"]] == list(range(1, RESUMABLE_STEPS + 1))

    straight = workdir / "straight"
    result = kbitprep("finetune", tiny_model, prompt_data, "--output", straight, *RESUMABLE)
    assert result.returncode == 0, result.stderr
    expected, actual = adapter_tensors(straight), adapter_tensors(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert (expected[name] - actual[name]).abs().max().item() <= 1e-6, name
    assert [e["loss"] for e in report["loss_history"]] == pytest.approx(
        [e["loss"] for e in report_of(straight)["loss_history"]], rel=1e-5)


# --- torchrun ------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_write_one_adapter(workdir: Path, tiny_model: Path, prompt_data: Path) -> None:
    run = workdir / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *(COMMAND if COMMAND[0] != sys.executable else ["-m", "kbitprep"]),
               "finetune", str(tiny_model), str(prompt_data), "--output", str(run), "--max-steps", "8",
               "--save-steps", "4", *FAST]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = report_of(run)
    assert report["world_size"] == 2 and report["steps"] == 8
    assert sorted(p.name for p in run.iterdir()) == [".kbitprep-manifest.json", "adapter", "loss.png", "report.json",
                                                     "run.yaml"]
    assert len(list(run.rglob("adapter_model.safetensors"))) == 1
    assert result.stdout.count("fine-tuning finished") == 1  # only the main process reports


@pytest.mark.slow
def test_torchrun_on_a_live_folder_fails_at_once_on_every_process(workdir: Path, tiny_model: Path,
                                                                  prompt_data: Path) -> None:
    """The main process takes the lock and answers for all: both processes stop, one error line names the live run."""
    from kbitprep.app.runs.folder import RunFolder

    live = RunFolder(workdir / "ddp-live")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *(COMMAND if COMMAND[0] != sys.executable else ["-m", "kbitprep"]),
               "finetune", str(tiny_model), str(prompt_data), "--output", str(live.path), "--max-steps", "2", *FAST]
    with live.locked():
        before = sorted(p.name for p in live.path.iterdir())
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180, check=False)
        assert sorted(p.name for p in live.path.iterdir()) == before
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("kbitprep: error")]
    assert len(lines) == 1 and f"another kbitprep run is live in this folder (pid {os.getpid()} on" in lines[0], \
        result.stderr[-3000:]


def test_debug_shows_the_traceback_instead_of_one_line(workdir: Path, text_data: Path) -> None:
    from kbitprep.cli import main
    from kbitprep.app.model.loading import ModelFolderError

    missing = workdir / "no-such-model"
    with pytest.raises(ModelFolderError, match="no such model folder"):
        main(["finetune", str(missing), str(text_data), "--output", str(workdir / "out-debug"), "--debug"])
    assert main(["finetune", str(missing), str(text_data), "--output", str(workdir / "out-debug")]) == 1
    assert not (workdir / "out-debug").exists()
