"""Three bad inputs that used to give the wrong answer: a lone surrogate, a stray RANK, a wrapped model.

- invalid Unicode in a row (`"\\ud800"` in JSON) used to fail inside the tokenizer with no
  row number; it is refused when the row is read, naming the file and line;
- a `RANK` left in the environment without the rest of a torchrun launch used to make the
  command believe it was a non-main process and print nothing, even for a missing file;
- a model wrapped in DataParallel / DistributedDataParallel used to get a message about
  gradient checkpointing; it is refused first, naming `.module`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_llama_config
from kbitprep import PreparationError, prepare_model_for_kbit_training
from kbitprep.app.data.files import read_data
from kbitprep.app.data.rows import DataError
from kbitprep.app.distributed.processes import from_main_process, one_of_several
from kbitprep.cli import main

# --- invalid Unicode ---------------------------------------------------------------------

SURROGATE_ROWS = {
    "text": ('{"text": "fine"}', '{"text": "bad \\ud800 here"}', "text", 5),
    "prompt": ('{"prompt": "a", "completion": "b"}', '{"prompt": "x\\udfff", "completion": "y"}', "prompt", 2),
    "alpaca-output": ('{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "\\ud83d"}',
                      "completion", 1),
    "messages": ('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}',
                 '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a\\udc00"}]}',
                 "messages[1] content", 2),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_ROWS))
def test_a_lone_surrogate_names_the_file_and_line(tmp_path: Path, case: str) -> None:
    good, bad, field, column = SURROGATE_ROWS[case]
    data = tmp_path / "rows.jsonl"
    data.write_text(f"{good}\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_data(data)
    message = str(caught.value)
    assert message.startswith(f"{data}:2: invalid Unicode in the row's {field} (a lone surrogate \\u")
    assert f"at character {column}" in message and "fix or remove it" in message


def test_a_surrogate_pair_is_one_character_and_reads(tmp_path: Path) -> None:
    data = tmp_path / "emoji.jsonl"
    data.write_text('{"text": "smile \\ud83d\\ude00"}\n', encoding="utf-8")
    assert read_data(data)[0].completion == "smile \U0001f600"


def test_a_json_array_never_hands_a_lone_surrogate_on(tmp_path: Path) -> None:
    """pyarrow's JSON reader (a JSON array goes through `datasets`) drops the lone surrogate itself."""
    data = tmp_path / "rows.json"
    data.write_text('[{"text": "fine"}, {"text": "bad \\ud800"}]', encoding="utf-8")
    rows = read_data(data)
    assert rows[1].completion.startswith("bad") and rows[1].completion.encode("utf-8")


# --- a stray RANK --------------------------------------------------------------------------

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None), ({"RANK": "3"}, None), ({"RANK": "1", "WORLD_SIZE": "2"}, None),
    ({**TORCHRUN, "WORLD_SIZE": "1", "RANK": "0"}, None), ({**TORCHRUN, "RANK": "x"}, None),
    (TORCHRUN, (1, 2)), ({**TORCHRUN, "RANK": "0"}, (0, 2)),
])
def test_only_a_whole_torchrun_launch_makes_one_of_several(environ: dict, expected: tuple | None) -> None:
    assert one_of_several(environ) == expected


def _clear_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*TORCHRUN, "KBITPREP_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def test_a_stray_rank_still_prints_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _clear_launch(monkeypatch)
    monkeypatch.setenv("RANK", "3")
    assert main(["inspect", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kbitprep: error: {tmp_path / 'absent'}: no such model folder"), err


def test_under_torchrun_each_rank_shows_its_own_failure_with_its_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _clear_launch(monkeypatch)
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert main(["inspect", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith("kbitprep: error (rank 1 of 2): ")


def test_under_torchrun_an_error_the_main_process_decided_is_shown_by_it_alone(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The other ranks receive the main one's error from `main_decides`, marked, and say nothing."""
    import torch.distributed as dist

    from kbitprep.app.distributed import processes
    from kbitprep.errors import InvalidArgumentError

    _clear_launch(monkeypatch)
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)

    def broadcast(outcome: list, src: int) -> None:  # what rank 0 sends: its error
        outcome[:] = [None, InvalidArgumentError("the folder is taken")]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    with pytest.raises(InvalidArgumentError) as caught:
        processes.main_decides(False, lambda: None)
    assert from_main_process(caught.value)
    assert not from_main_process(InvalidArgumentError("its own"))

    def handler(args, console):
        raise caught.value

    import kbitprep.cli as cli

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_handler(parser, handler))
    assert main(["inspect", "anything"]) == 1
    assert capsys.readouterr().err == ""


def _with_handler(parser, handler):
    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.handler = handler
        return args

    parser.parse_args = parse_args
    return parser


def test_a_stray_rank_in_a_real_process_prints_a_missing_data_file(tmp_path: Path) -> None:
    """As a user runs it: `RANK=1 kbitprep finetune MODEL missing.jsonl --output DIR` says what is missing."""
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN}
    environ["RANK"] = "1"
    done = subprocess.run([sys.executable, "-m", "kbitprep", "finetune", str(tmp_path / "model"),
                           str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=environ, timeout=240)
    assert done.returncode == 1
    assert done.stderr.startswith("kbitprep: error: "), done.stderr
    assert "missing.jsonl" in done.stderr or "model" in done.stderr


# --- a wrapped model ---------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=1), dtype=torch.float16)


def _refused(wrapped: nn.Module, inner: nn.Module) -> None:
    before = {name: (p.dtype, p.requires_grad) for name, p in inner.named_parameters()}
    with pytest.raises(PreparationError) as caught:
        prepare_model_for_kbit_training(wrapped)
    assert [p.code for p in caught.value.problems] == ["wrapped-model"]
    message = caught.value.problems[0].message
    assert f"model is a {type(wrapped).__name__} wrapping a LlamaForCausalLM" in message
    assert "prepare_model_for_kbit_training(model.module)" in message and "checkpointing" not in message
    assert {name: (p.dtype, p.requires_grad) for name, p in inner.named_parameters()} == before


def test_a_model_in_data_parallel_is_refused_naming_module() -> None:
    model = _tiny_model()
    _refused(nn.DataParallel(model), model)
    prepared = prepare_model_for_kbit_training(model)  # the fix works
    assert not any(p.requires_grad for p in prepared.parameters())


def test_a_model_in_distributed_data_parallel_is_refused_naming_module(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _tiny_model().float()
        _refused(nn.parallel.DistributedDataParallel(model), model)
    finally:
        dist.destroy_process_group()
