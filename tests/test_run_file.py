"""`kbitprep finetune --config run.yaml`: a run file read through the settings declaration.

- every declared setting can be given in a file, under its name (or its flag's spelling),
  and a written run.yaml reads back as the settings it was written from;
- unknown keys, wrong types, out-of-range values, repeated keys and bad YAML are errors
  that name the file and the line (and the close match of a misspelt key);
- precedence: declared defaults < the file < options given on the command line; an
  option also drops the file's keys that it excludes; relative paths in the file are
  relative to the file's folder;
- end to end (slow): a run writes run.yaml into its folder (in the manifest), and
  `--config runs/x/run.yaml --output runs/y` repeats the run to the same adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbitprep.app.config.runfile import NOT_WRITTEN, RunFileError, read_run_file, run_file_text, settings_from
from kbitprep.app.config.settings import SETTINGS, FinetuneError, FinetuneSettings, given_settings
from kbitprep.cli import build_parser


def finetune_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["finetune", *argv])


def run_file(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# A valid value, other than the default, for every setting (paths relative: the file's folder resolves them).
FILE_VALUES = {
    "model": "m", "data": "d.jsonl", "output": "o", "quantize": "int8", "upcast": "none", "compute_dtype": "float32",
    "lora_r": 8, "lora_alpha": 4.0, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "lr": 0.001,
    "batch_size": 2, "grad_accum": 3, "max_steps": 20, "epochs": 2.0, "lr_scheduler": "cosine",
    "warmup_ratio": 0.1, "warmup_steps": None, "seq_len": 64, "seed": 7, "loss": "full", "save_steps": 5,
    "fsdp": True, "resume": True, "overwrite": False, "samples": ["a", "b c"], "max_new_tokens": 3,
    "chat_template": "t.jinja", "data_format": "alpaca", "pack": True, "eval_data": None, "eval_fraction": 0.2,
    "eval_steps": 3, "report_to": "tensorboard", "optim": "adamw_bnb_8bit",
    "method": "dpo", "beta": 0.2, "orpo_lambda": 0.3,
}
FILE_VALUES |= {"lora_variant": "dora", "rslora": True, "init_lora_weights": "olora", "loraplus_lr_ratio": 16.0}


def test_every_setting_can_be_given_in_a_file_and_a_written_file_reads_back(tmp_path: Path) -> None:
    import yaml

    assert set(FILE_VALUES) == {s.name for s in SETTINGS}
    values = read_run_file(run_file(tmp_path, yaml.safe_dump(FILE_VALUES)))
    paths = {s.name for s in SETTINGS if s.option.path}
    for name, value in FILE_VALUES.items():
        if name in paths and value is not None:
            assert values[name] == str(tmp_path.absolute() / value), name  # relative to the file's folder
        else:
            assert values[name] == (tuple(value) if isinstance(value, list) else value), name
    settings = FinetuneSettings(**values)
    again = read_run_file(run_file(tmp_path, run_file_text(settings), "again.yaml"))
    assert set(again) == {s.name for s in SETTINGS} - set(NOT_WRITTEN)
    assert FinetuneSettings(**again, resume=settings.resume) == settings.resolved()


def test_keys_take_the_flag_spelling_and_yaml_1_1_numbers(tmp_path: Path) -> None:
    path = run_file(tmp_path, "lora-r: 8\nsample: one prompt\ntarget-modules: q_proj, v_proj\nlr: 2e-4\n"
                              "warmup_steps: 0\n")
    assert read_run_file(path) == {"lora_r": 8, "samples": ("one prompt",), "target_modules": ("q_proj", "v_proj"),
                                   "lr": 2e-4, "warmup_steps": 0}


@pytest.mark.parametrize(("text", "says"), [
    ("model: m\nlora_rank: 4\n", r'run\.yaml:2: unknown key "lora_rank"; did you mean "lora_r"\? \(the keys are'),
    ("model: m\nbogus: 1\n", r'run\.yaml:2: unknown key "bogus" \(the keys are the names of kbitprep finetune'),
    ("model: m\n\nlora_r: sixteen\n", r"run\.yaml:3: lora_r must be a whole number >= 1, not 'sixteen' \(text\)$"),
    ("lora_r: 1.5\n", r"run\.yaml:1: lora_r must be a whole number >= 1, not 1\.5 \(a number\)"),
    ("pack: 'yes please'\n", r"run\.yaml:1: pack must be true or false, not 'yes please' \(text\)"),
    ("max_steps: true\n", r"run\.yaml:1: max_steps must be a whole number >= 1 or null, not True \(true/false\)"),
    ("quantize: nf5\n", r"run\.yaml:1: quantize must be one of auto, nf4, fp4, int8, none, not 'nf5'$"),
    ("lr_scheduler: [cosine]\n", r"run\.yaml:1: lr_scheduler must be one of linear, cosine, constant, not"),
    ("lora_r: 0\n", r"run\.yaml:1: lora_r must be at least 1, not 0$"),
    ("warmup_ratio: 1.5\n", r"run\.yaml:1: warmup_ratio must be in \[0, 1\), not 1\.5$"),
    ("model: a\nmodel: b\n", r'run\.yaml:2: "model" is given twice \(also on line 1\); keep one'),
    ("lr: [1\n", r"run\.yaml:2: not valid YAML \("),
    ("- lr: 1\n", r"run\.yaml:1: a run file is a mapping of setting names to values"),
])
def test_bad_run_files_name_the_file_and_line(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(RunFileError, match=says):
        read_run_file(run_file(tmp_path, text))


def test_a_missing_run_file_and_an_empty_one(tmp_path: Path) -> None:
    with pytest.raises(RunFileError, match=r"absent\.yaml: no such --config file"):
        read_run_file(tmp_path / "absent.yaml")
    assert read_run_file(run_file(tmp_path, "# nothing yet\n")) == {}
    assert issubclass(RunFileError, FinetuneError)


def test_defaults_then_the_file_then_the_command_line(tmp_path: Path) -> None:
    path = run_file(tmp_path, "model: m\ndata: d.jsonl\noutput: o\nlr: 0.001\nlora_r: 8\nmax_steps: 30\n"
                              "warmup_ratio: 0.1\n")
    settings = settings_from(given_settings(finetune_args("--config", str(path), "--lr", "0.05", "--epochs", "2",
                                                          "--warmup-steps", "4")), path)
    assert settings == FinetuneSettings(str(tmp_path / "m"), str(tmp_path / "d.jsonl"), str(tmp_path / "o"),
                                        lr=0.05, lora_r=8, epochs=2.0, warmup_steps=4)  # max_steps, warmup_ratio gone
    # The command line's relative paths are the shell's; the file's are the file's folder's.
    moved = settings_from(given_settings(finetune_args("elsewhere", "--config", str(path))), path)
    assert moved.model == "elsewhere" and moved.data == str(tmp_path / "d.jsonl")


def test_settings_neither_the_file_nor_the_command_line_gives(tmp_path: Path) -> None:
    path = run_file(tmp_path, "model: m\n")
    with pytest.raises(RunFileError, match=rf"^DATA, --output missing: {path} gives no data:, output:; add it there"):
        settings_from(given_settings(finetune_args()), path)
    with pytest.raises(RunFileError, match=r"^MODEL, DATA, --output missing: give them on the command line, or as "
                                           r"model:, data:, output: in a --config FILE$"):
        settings_from(given_settings(finetune_args()), None)


def test_warmup_ratio_and_steps_in_one_file_are_refused(tmp_path: Path) -> None:
    path = run_file(tmp_path, "model: m\ndata: d\noutput: o\nwarmup_ratio: 0.1\nwarmup_steps: 3\n")
    with pytest.raises(FinetuneError, match="--warmup-ratio and --warmup-steps cannot be given together; pass one"):
        settings_from({}, path).check()


# --- end to end ----------------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KBITPREP_DEBUG": "", "HF_HUB_OFFLINE": "1"}


def kbitprep(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kbitprep", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_a_run_keeps_its_settings_as_run_yaml_and_repeating_it_gives_the_same_adapter(tmp_path: Path) -> None:
    from kbitprep.app.demo import build_tiny_model

    (tmp_path / "project").mkdir()
    build_tiny_model(tmp_path / "project" / "model")
    rows = [{"instruction": f"after {c}", "input": "", "output": "abcdefgh"} for c in "abcdefgh"]
    (tmp_path / "project" / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = run_file(tmp_path / "project", "model: model\ndata: alpaca.jsonl\noutput: runs/x\nmax_steps: 4\n"
                                          "batch_size: 4\nlr: 1e-2\nseq_len: 48\nlora_r: 4\nlr_scheduler: cosine\n"
                                          "warmup_steps: 1\n")
    first = kbitprep("finetune", "--config", path, cwd=tmp_path)  # another folder: the file's paths still hold
    assert first.returncode == 0, first.stderr
    runs = tmp_path / "project" / "runs"
    kept = runs / "x" / "run.yaml"
    values = read_run_file(kept)
    assert values["model"] == str(tmp_path / "project" / "model") and values["lr_scheduler"] == "cosine"
    assert "resume" not in values and "overwrite" not in values
    manifest = json.loads((runs / "x" / ".kbitprep-manifest.json").read_text())
    assert "run.yaml" in manifest["written"]  # kbitprep's own file: --overwrite replaces it, never a user's

    again = kbitprep("finetune", "--config", kept, "--output", runs / "y", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    adapter = "adapter/adapter_model.safetensors"
    assert (runs / "x" / adapter).read_bytes() == (runs / "y" / adapter).read_bytes()
    report_x, report_y = (json.loads((runs / name / "report.json").read_text()) for name in ("x", "y"))
    assert report_x["loss_history"] == report_y["loss_history"]
    assert dataclasses.replace(FinetuneSettings(**read_run_file(runs / "y" / "run.yaml")),
                               output=str(runs / "x")) == FinetuneSettings(**values)
