"""The finetune settings are declared once; the parser, validation, resume check, report and docs follow.

Each test holds one derived thing to the declaration in kbitprep.app.config.settings, so an option
added in one place but not another (a parser default repeated by hand, a docs table not
regenerated, a range the CLI and the library disagree on) fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from kbitprep.app.config.settings import (
    SETTINGS,
    TABLE_BEGIN,
    TABLE_END,
    FinetuneError,
    FinetuneSettings,
    Setting,
    add_arguments,
    markdown_table,
)
from kbitprep.cli import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
REQUIRED = ["models/tiny", "train.jsonl", "--output", "runs/tiny"]

# One out-of-range value for every setting that has a range or choices: a new bounded
# setting without a row here fails `test_every_bounded_setting_has_a_bad_value`.
BAD_VALUES = {
    "quantize": ("nf5", "nf5"), "upcast": ("some", "some"), "lora_r": (0, "0"), "lora_alpha": (0.0, "0"),
    "lora_dropout": (1.0, "1"), "target_modules": (("q_proj", ""), "q_proj,"), "lr": (float("inf"), "inf"),
    "batch_size": (0, "0"), "grad_accum": (0, "0"), "max_steps": (0, "0"), "epochs": (-1.0, "-1"),
    "seq_len": (1, "1"), "save_steps": (0, "0"), "max_new_tokens": (0, None), "eval_fraction": (1.0, "1"),
    "eval_steps": (0, "0"), "loss": ("fused", "fused"), "compute_dtype": ("fp8", "fp8"),
    "lr_scheduler": ("step", "step"), "warmup_ratio": (1.0, "1"), "warmup_steps": (-1, "-1"),
    "data_format": ("xml", "xml"), "report_to": ("wandb", "wandb"), "optim": ("sgd", "sgd"),
    "method": ("ppo", "ppo"), "beta": (0.0, "0"), "orpo_lambda": (-0.1, "-0.1"),
}
# the adapter variants
BAD_VALUES |= {"lora_variant": ("vera", "vera"), "init_lora_weights": ("eva", "eva"),
               "loraplus_lr_ratio": (0.0, "0")}


def finetune_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["finetune"]


def actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest not in ("help", "debug", "config")}


def test_the_parser_has_exactly_the_declared_cli_settings() -> None:
    declared = {s.name for s in SETTINGS if s.option.cli}
    assert set(actions_by_dest(finetune_parser())) == declared
    assert "max_new_tokens" not in declared  # a library-only setting stays out of the CLI


def test_parser_defaults_equal_the_declared_defaults() -> None:
    args = finetune_parser().parse_args(REQUIRED)
    assert FinetuneSettings.from_args(args) == FinetuneSettings("models/tiny", "train.jsonl", "runs/tiny")


@pytest.mark.parametrize("declared", [s for s in SETTINGS if s.option.cli], ids=lambda s: s.name)
def test_each_option_shows_the_declared_help_default_and_flag(declared: Setting) -> None:
    action = actions_by_dest(finetune_parser())[declared.name]
    shown = action.help % {"default": action.default}
    assert shown.startswith(declared.option.help)
    if declared.option.positional:
        assert action.option_strings == [] and action.metavar == declared.option.metavar
        return
    assert action.option_strings == [declared.flag]
    # Nothing is required and nothing defaults in the namespace: a --config file may give any
    # setting, and only the options given on the command line override it.
    assert not action.required and action.default is argparse.SUPPRESS
    if declared.option.default_text:
        assert f"(default: {declared.option.default_text})" in shown
    elif declared.default not in (None, False, ()) and not declared.required:
        assert f"(default: {declared.default})" in shown


def test_every_cli_option_parses_a_non_default_value_into_the_settings() -> None:
    argv = [*REQUIRED, "--quantize", "int8", "--upcast", "all", "--compute-dtype", "float32", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-dropout", "0", "--target-modules", "q_proj, v_proj", "--lr", "1e-3",
            "--batch-size", "2", "--grad-accum", "3", "--max-steps", "7", "--seq-len", "64", "--seed", "5",
            "--loss", "full", "--save-steps", "9", "--fsdp", "--resume", "--sample", "a", "--sample", "b c",
            "--chat-template", "chat.jinja", "--pack", "--eval-fraction", "0.1", "--eval-steps", "5",
            "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--data-format", "alpaca",
            "--report-to", "tensorboard", "--optim", "adamw_bnb_8bit", "--method", "orpo", "--beta", "0.2",
            "--orpo-lambda", "0.3"]
    argv += ["--lora-variant", "dora", "--rslora", "--init-lora-weights", "olora", "--loraplus-lr-ratio", "16"]
    parsed = FinetuneSettings.from_args(finetune_parser().parse_args(argv))
    expected = FinetuneSettings("models/tiny", "train.jsonl", "runs/tiny", quantize="int8", upcast="all",
                                compute_dtype="float32", lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                                target_modules=("q_proj", "v_proj"), lr=1e-3, batch_size=2, grad_accum=3, max_steps=7,
                                seq_len=64, seed=5, loss="full", save_steps=9, fsdp=True, resume=True,
                                samples=("a", "b c"), chat_template="chat.jinja", pack=True, eval_fraction=0.1,
                                eval_steps=5, lr_scheduler="cosine", warmup_ratio=0.1, data_format="alpaca",
                                report_to="tensorboard", optim="adamw_bnb_8bit", method="orpo", beta=0.2,
                                orpo_lambda=0.3)
    expected = dataclasses.replace(expected, lora_variant="dora", rslora=True, init_lora_weights="olora",
                                   loraplus_lr_ratio=16.0)
    assert parsed == expected
    changed = {f.name for f in dataclasses.fields(FinetuneSettings)
               if getattr(parsed, f.name) != getattr(FinetuneSettings("m", "d", "o"), f.name)}
    untouched = {s.name for s in SETTINGS if s.option.cli} - changed
    # the paths are required anyway; --epochs is exclusive with --max-steps; --overwrite with --resume;
    # --eval-data with --eval-fraction; --warmup-steps with --warmup-ratio
    assert untouched == {"epochs", "overwrite", "eval_data", "warmup_steps"}


def test_every_bounded_setting_has_a_bad_value() -> None:
    bounded = {s.name for s in SETTINGS if s.option.bound is not None or s.option.choices is not None}
    assert bounded == set(BAD_VALUES)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_the_library_and_the_cli_refuse_the_same_out_of_range_value(name: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    value, text = BAD_VALUES[name]
    declared = next(s for s in SETTINGS if s.name == name)
    settings = FinetuneSettings("m", "d", "o", **{name: value})
    with pytest.raises(FinetuneError, match=f"^{declared.flag} must be "):
        settings.check()
    if text is not None:
        with pytest.raises(SystemExit) as exit_info:
            finetune_parser().parse_args([*REQUIRED, f"{declared.flag}={text}"])
        assert exit_info.value.code == 2
        assert declared.flag in capsys.readouterr().err


def test_defaults_pass_the_checks_and_conflicting_switches_do_not() -> None:
    FinetuneSettings("m", "d", "o").check()
    with pytest.raises(FinetuneError, match="--resume and --overwrite contradict each other"):
        FinetuneSettings("m", "d", "o", resume=True, overwrite=True).check()


# A different, valid value for every setting: a new setting without a row here fails the resume test.
OTHER_VALUES = {
    "model": "m2", "data": "d2", "output": "o2", "quantize": "int8", "upcast": "none", "lora_r": 8,
    "lora_alpha": 4.0, "lora_dropout": 0.1, "target_modules": ("q_proj",), "lr": 1.0, "batch_size": 2,
    "grad_accum": 2, "max_steps": 20, "epochs": 2.0, "seq_len": 64, "seed": 7, "save_steps": 5, "fsdp": True,
    "resume": True,
    "overwrite": True, "samples": ("a",), "max_new_tokens": 3, "chat_template": "t.jinja", "pack": True,
    "eval_data": "e.jsonl", "eval_fraction": 0.2, "eval_steps": 3, "loss": "full",
    "compute_dtype": "float32", "lr_scheduler": "cosine", "warmup_ratio": 0.1, "warmup_steps": 5,
    "data_format": "alpaca", "report_to": "tensorboard", "optim": "adamw_bnb_8bit",
    "method": "dpo", "beta": 0.5, "orpo_lambda": 0.2,
}
OTHER_VALUES |= {"lora_variant": "dora", "rslora": True, "init_lora_weights": "olora", "loraplus_lr_ratio": 16.0}


def test_settings_that_exclude_each_other_are_refused_together_by_the_library_too() -> None:
    with pytest.raises(FinetuneError, match="^--warmup-ratio and --warmup-steps cannot be given together; pass one$"):
        FinetuneSettings("m", "d", "o", warmup_ratio=0.1, warmup_steps=5).check()
    with pytest.raises(FinetuneError, match="^--eval-data and --eval-fraction cannot be given together"):
        FinetuneSettings("m", "d", "o", eval_data="e.jsonl", eval_fraction=0.1).check()
    FinetuneSettings("m", "d", "o", max_steps=5, warmup_steps=2).check()  # epochs keeps its default: no conflict


def test_eval_steps_needs_rows_to_evaluate_on() -> None:
    with pytest.raises(FinetuneError, match="--eval-steps needs rows to evaluate on: pass --eval-data FILE or "
                                            "--eval-fraction F"):
        FinetuneSettings("m", "d", "o", eval_steps=5).check()
    FinetuneSettings("m", "d", "o", eval_steps=5, eval_fraction=0.1).check()
    assert FinetuneSettings("m", "d", "o").resolved().eval_data is None  # an unset path stays unset


def test_resume_compares_exactly_the_settings_declared_resume() -> None:
    assert set(OTHER_VALUES) == {s.name for s in SETTINGS}
    run = FinetuneSettings("m", "d", "o", max_steps=10)
    assert run.resume_differences(run.to_dict()) == []
    for declared in SETTINGS:
        changed = dataclasses.replace(run, **{declared.name: OTHER_VALUES[declared.name]})
        assert bool(changed.resume_differences(run.to_dict())) == declared.option.resume, declared.name
    assert FinetuneSettings("m", "d", "o", lr=0.01).resume_differences({"lr": 0.02}) == [
        "lr 0.02 (run) vs 0.01 (now)"]


def test_the_report_records_every_setting_as_json() -> None:
    record = FinetuneSettings("m", "d", "o", samples=("a",)).to_dict()
    assert list(record) == [s.name for s in SETTINGS]
    assert record["target_modules"] == "all-linear" and record["samples"] == ["a"]
    assert json.loads(json.dumps(record)) == record


def test_the_demo_shares_the_declared_options_with_its_own_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ("output", "max_steps"), defaults={"output": "somewhere", "max_steps": 3}, groups=False)
    assert vars(parser.parse_args([])) == {"output": "somewhere", "max_steps": 3}
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-steps", "0"])


def test_docs_table_equals_the_generated_one() -> None:
    text = DOCS.read_text(encoding="utf-8")
    table = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].lstrip("\n")
    assert table == markdown_table(), "docs/cli.md is out of date: run `make docs`"


def test_the_class_docstring_lists_every_setting() -> None:
    doc = FinetuneSettings.__doc__ or ""
    for declared in SETTINGS:
        assert f"        {declared.name} (" in doc
