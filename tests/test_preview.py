"""`kbitprep preview` and the template checks: rows as the run tokenizes them, and each check firing and not.

The demo's tiny Llama folder (config and tokenizer, no weights) is the model; a template
check is asserted by its code, never by its words.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from kbitprep.app.config.settings import FinetuneSettings
from kbitprep.app.data.files import read_data
from kbitprep.app.data.template_checks import TemplateCheckError, check_pad
from kbitprep.app.data.tokenize import CausalLMCollator, tokenize_rows
from kbitprep.app.model.loading import check_model_folder, load_tokenizer
from kbitprep.app.preview import preview
from kbitprep.app.training.inputs import RunRequest, read_inputs
from kbitprep.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kbitprep" / "data"
MODEL = PACKAGE / "tiny-llama"
CHAT = PACKAGE / "demo-chat.jsonl"
TEXT = PACKAGE / "demo.jsonl"

# A template that renders the user turns only: the answers are never written.
DROPS_ASSISTANT = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                   "<|end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# One that writes the assistant header after every conversation, asked or not.
UNASKED_PROMPT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
# One that ends turns with plain text, no special token.
PLAIN_END = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


def _settings(data: Path | str, model: Path | str = MODEL, **options) -> FinetuneSettings:
    return FinetuneSettings(str(model), str(data), "/dev/null", **options)


def _inputs(data: Path, model: Path = MODEL, *, for_run: bool = True, **options):
    settings = _settings(data, model, **options)
    rows = read_data(settings.data, settings.data_format)
    return read_inputs(RunRequest(settings, tuple(rows), (), check_model_folder(model, need_weights=False)),
                       for_run=for_run)


def _chat_file(tmp_path: Path, answers: list[str], name: str = "chat.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "ab"},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for a in answers), encoding="utf-8")
    return path


def _template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "template.jinja"
    path.write_text(text, encoding="utf-8")
    return path


def _model_with(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(MODEL, folder)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return folder


# --- preview -------------------------------------------------------------------------------


def test_preview_shows_the_rows_the_run_trains_and_sums_the_whole_file() -> None:
    report = preview(_settings(CHAT, seq_len=32, pack=True), shown=3)
    rows = read_data(CHAT)
    tokenizer = load_tokenizer(MODEL)
    data = tokenize_rows(rows, tokenizer, 32)  # the run's own tokenization
    for shown, example in zip(report.rows, data.examples, strict=False):
        assert [t.id for t in shown.tokens] == example["input_ids"]
        assert [t.trained for t in shown.tokens][1:] == [label != -100 for label in example["labels"][1:]]
    assert [row.line for row in report.rows] == [1, 2, 3]
    summary = report.summary
    assert summary.rows == len(rows) == 48 and summary.examples == len(data)
    assert summary.tokens == sum(len(e["input_ids"]) for e in data.examples)
    assert summary.trained_tokens == sum(label != -100 for e in data.examples for label in e["labels"][1:])
    assert summary.truncated_rows == data.truncated > 0
    assert summary.tokens_lost == sum(max(0, n - 32) for n in data.lengths) > 0
    assert summary.packing is not None and 0 < summary.packing["efficiency"] <= 1
    assert report.rows[1].truncated and report.rows[1].to_dict()["tokens_lost"] == report.rows[1].length - 32


def test_preview_counts_rows_with_nothing_trained(tmp_path: Path) -> None:
    data = tmp_path / "long-prompt.jsonl"
    data.write_text(json.dumps({"prompt": "abcdefghijklmnopqrstuvwxyz" * 2, "completion": "xyz"}) + "\n"
                    + json.dumps({"prompt": "ab", "completion": "cde"}) + "\n", encoding="utf-8")
    report = preview(_settings(data, seq_len=16))
    assert report.summary.untrained_rows == (1,) and report.rows[0].dropped and report.rows[0].trained == 0
    assert report.summary.examples == 1


def test_preview_opens_no_weight_file(tmp_path: Path) -> None:
    folder = _model_with(tmp_path)
    (folder / "model.safetensors").write_bytes(b"not read")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(str(folder)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # counts only opens below this test's own folder
    preview(_settings(CHAT, folder))
    assert opened and not [path for path in opened if path.endswith((".safetensors", ".bin"))]


def test_preview_json_carries_rows_summary_and_checks(tmp_path: Path, capsys) -> None:
    assert main(["preview", str(MODEL), str(CHAT), "-n", "2", "--seq-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "data", "kind", "seq_len", "pack", "rows", "summary", "checks"}
    assert len(out["rows"]) == 2 and {"id", "text", "trained"} == set(out["rows"][0]["tokens"][0])
    assert set(out["summary"]) >= {"rows", "tokens", "trained_tokens", "truncated_rows", "tokens_lost",
                                   "untrained_rows", "packing"}
    assert [d["code"] for d in out["checks"]["diagnostics"]] == ["stop-token-not-trained", "generation-stop-missing"]


def test_preview_takes_finetunes_run_file_and_shows_ids(tmp_path: Path, capsys) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {MODEL}\ndata: {TEXT}\noutput: runs/x\nseq_len: 8\nlr: 0.001\n", encoding="utf-8")
    assert main(["preview", "--config", str(run_file), "-n", "1", "--ids"]) == 0
    out = capsys.readouterr().out
    assert "--seq-len 8" in out and "\u2039" + "1" + "\u203a" in out  # the BOS's id after it
    assert main(["preview", "--config", str(run_file), "-n", "0", "--json", "--seq-len", "12"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 12


def test_preview_colours_trained_and_masked_tokens_apart() -> None:
    from rich.console import Console

    from kbitprep.cli.console import render_preview_report

    console = Console(record=True, force_terminal=True, color_system="truecolor", width=200)
    render_preview_report(console, preview(_settings(CHAT), shown=1))
    styles = {str(span.style) for line in console._record_buffer for span in [line] if line.style}
    assert any("green" in s for s in styles) and any("dim" in s for s in styles)


# --- the checks, each firing and not --------------------------------------------------------


def test_a_template_that_drops_the_answers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateCheckError) as caught:
        _inputs(CHAT, chat_template=str(_template(tmp_path, DROPS_ASSISTANT)))
    assert caught.value.code == "template-drops-assistant"
    assert "template-drops-assistant" not in _inputs(CHAT).checks.codes


def test_a_generation_prompt_written_unasked_is_named(tmp_path: Path) -> None:
    found = _inputs(_chat_file(tmp_path, ["cdef"]), chat_template=str(_template(tmp_path, UNASKED_PROMPT)))
    assert "generation-prompt-in-rows" in found.checks.codes
    assert "generation-prompt-in-rows" not in _inputs(CHAT).checks.codes


def test_a_template_without_a_special_end_of_turn_has_no_stop_token(tmp_path: Path) -> None:
    found = _inputs(_chat_file(tmp_path, ["cdef"]), chat_template=str(_template(tmp_path, PLAIN_END)))
    assert "no-stop-token" in found.checks.codes and found.checks.stop_ids == ()
    assert "no-stop-token" not in _inputs(CHAT).checks.codes


def test_stop_token_cut_from_every_row_is_an_error_and_from_some_a_warning(tmp_path: Path) -> None:
    every = _chat_file(tmp_path, ["cdefghijklmnopqrstuvwx"] * 3, "every.jsonl")
    with pytest.raises(TemplateCheckError) as caught:
        _inputs(every, seq_len=16)
    assert caught.value.code == "stop-token-never-trained"
    assert "stop-token-never-trained" in _inputs(every, seq_len=16, for_run=False).checks.codes  # preview shows it
    some = _inputs(CHAT, seq_len=32).checks
    assert "stop-token-not-trained" in some.codes and some.end_of_turn is not None
    assert some.end_of_turn.text == "<|end|>" and some.stop_ids == (103,)
    whole = _inputs(CHAT, seq_len=512).checks.codes
    assert "stop-token-not-trained" not in whole and "stop-token-never-trained" not in whole


def test_prompt_completion_rows_stop_at_eos(tmp_path: Path) -> None:
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": "ab", "completion": c}) + "\n" for c in ("cdefghijklmnop", "cd")),
                    encoding="utf-8")
    checks = _inputs(data, seq_len=8).checks
    assert checks.stop_ids == (2,) and "stop-token-not-trained" in checks.codes
    assert _inputs(data, seq_len=64).checks.codes == ()


def test_pad_equal_to_eos_is_an_error_only_where_the_collator_masks_it() -> None:
    from transformers import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer(MODEL)
    tokenizer.pad_token = tokenizer.eos_token
    masking = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels == pad id become -100
    finding = check_pad(masking, tokenizer.eos_token_id, (2,), tokenizer)
    assert getattr(finding, "severity", None) == "error" and finding.code == "pad-masks-stop-token"
    note = check_pad(CausalLMCollator(2), 2, (2,), tokenizer)  # kbitprep's collator masks by position
    assert note is not None and note.code == "pad-is-stop-token" and not hasattr(note, "severity")
    assert check_pad(CausalLMCollator(0), 0, (2,), tokenizer) is None


def test_a_doubled_bos_is_named(tmp_path: Path) -> None:
    data = tmp_path / "bos.jsonl"
    data.write_text(json.dumps({"text": "<s>abc"}) + "\n" + json.dumps({"text": "abc"}) + "\n", encoding="utf-8")
    assert "doubled-bos" in _inputs(data).checks.codes
    assert "doubled-bos" not in _inputs(TEXT).checks.codes


def test_a_generation_config_that_does_not_stop_at_the_end_of_turn(tmp_path: Path) -> None:
    preview_checks = _inputs(CHAT, for_run=False).checks
    assert "generation-stop-missing" in preview_checks.codes
    run_checks = _inputs(CHAT).checks  # the run's merge writes the stop token: a note, not a warning
    assert "generation-stop-missing" not in run_checks.codes
    assert [n.code for n in run_checks.notes] == ["generation-stop-missing"]
    stops = _model_with(tmp_path, generation_config__json=json.dumps({"eos_token_id": [2, 103]}))
    assert _inputs(CHAT, stops, for_run=False).checks.codes == ()
    assert _inputs(TEXT, for_run=False).checks.codes == ()  # text rows stop at eos 2, which config.json gives


def test_finetune_runs_the_template_checks_before_the_weights_load(tmp_path: Path, capsys) -> None:
    folder = _model_with(tmp_path)
    (folder / "model.safetensors").write_bytes(b"damaged: reading it would fail differently")
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).endswith(".safetensors"):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    code = main(["finetune", str(folder), str(CHAT), "--output", str(tmp_path / "run"),
                 "--chat-template", str(_template(tmp_path, DROPS_ASSISTANT))])
    err = capsys.readouterr().err
    assert code == 1 and "the chat template renders nothing of the assistant turn" in err
    assert not opened and not (tmp_path / "run").exists()
    every = _chat_file(tmp_path, ["cdefghijklmnopqrstuvwx"] * 3, "every.jsonl")
    assert main(["finetune", str(folder), str(every), "--output", str(tmp_path / "run"), "--seq-len", "16"]) == 1
    assert "would never learn to stop" in capsys.readouterr().err and not opened


def test_preview_exits_non_zero_on_a_check_error(tmp_path: Path, capsys) -> None:
    every = _chat_file(tmp_path, ["cdefghijklmnopqrstuvwx"] * 3, "every.jsonl")
    assert main(["preview", str(MODEL), str(every), "--seq-len", "16"]) == 1
    assert "error [stop-token-never-trained]" in capsys.readouterr().out


def test_rows_past_the_tokenizers_max_length_bring_no_indexing_errors_note(tmp_path: Path) -> None:
    """The demo tokenizer says model_max_length 256; rows are cut at --seq-len, so transformers' note that
    such a row "will result in indexing errors" warns of nothing and is not shown."""
    import logging

    import transformers

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "abcdefghij " * 60}) + "\n", encoding="utf-8")
    assert transformers.AutoTokenizer.from_pretrained(MODEL).model_max_length < 600  # the row is longer
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        assert len(_inputs(data, seq_len=512).data.examples[0]["input_ids"]) == 512
        transformers.AutoTokenizer.from_pretrained(MODEL)("abcdefghij " * 60)  # outside a run it is logged
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:29] for r in records] == ["Token indices sequence length"]
