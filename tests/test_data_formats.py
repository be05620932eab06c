"""Data formats (alpaca, sharegpt, messages, text, prompt/completion) in every container kbitprep reads.

- each format in each container (JSONL, JSON array, Parquet, CSV, a `save_to_disk` folder)
  reads into exactly the expected rows (CSV holds no nested lists: no chat formats there);
- the first matching format wins, `--data-format` overrides it, and a miss names the keys
  it saw and the formats accepted;
- each format is tokenized with the demo tokenizer and trains exactly the expected token
  ids (labels != -100), and a short real run on each trains those tokens (slow);
- a data folder is fingerprinted by its files, so --resume notices a changed one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kbitprep.app.data.files import data_fingerprint, read_data
from kbitprep.app.data.formats import FORMATS, row_from_record
from kbitprep.app.data.rows import IGNORE_INDEX, DataError, Row
from kbitprep.app.data.tokenize import tokenize_rows

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

# Two rows of each format, and the rows kbitprep reads from them.
RECORDS = {
    "alpaca": [{"instruction": "say abc", "input": "", "output": "abc"},
               {"instruction": "add", "input": "2 and 3", "output": "5"}],
    "sharegpt": [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "hello"}]},
                 {"conversations": [{"from": "user", "value": "012"}, {"from": "chatgpt", "value": "345"},
                                    {"from": "human", "value": "more"}, {"from": "model", "value": "678"}]}],
    "messages": [{"messages": [{"role": USER, "content": "hi"}, {"role": ASSISTANT, "content": "hello"}]},
                 {"messages": [{"role": SYSTEM, "content": "go"}, {"role": USER, "content": "012"},
                               {"role": ASSISTANT, "content": "345"}]}],
    "text": [{"text": "abcdef"}, {"text": "0123"}],
    "prompt-completion": [{"prompt": "after a:", "completion": " bcd"}, {"prompt": "after 1:", "completion": " 234"}],
}


def turns(*pairs: tuple[str, str]) -> tuple[dict[str, str], ...]:
    return tuple({"role": role, "content": content} for role, content in pairs)


EXPECTED = {
    "alpaca": [Row(1, "say abc", "abc"), Row(2, "add\n\n2 and 3", "5")],
    "sharegpt": [Row(1, messages=turns((SYSTEM, "be brief"), (USER, "hi"), (ASSISTANT, "hello"))),
                 Row(2, messages=turns((USER, "012"), (ASSISTANT, "345"), (USER, "more"), (ASSISTANT, "678")))],
    "messages": [Row(1, messages=turns((USER, "hi"), (ASSISTANT, "hello"))),
                 Row(2, messages=turns((SYSTEM, "go"), (USER, "012"), (ASSISTANT, "345")))],
    "text": [Row(1, "", "abcdef"), Row(2, "", "0123")],
    "prompt-completion": [Row(1, "after a:", " bcd"), Row(2, "after 1:", " 234")],
}
FLAT = ("alpaca", "text", "prompt-completion")  # what a CSV can hold


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json_array(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_folder(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, ".jsonl"), "json-array": (write_json_array, ".json"),
           "parquet": (write_parquet, ".parquet"), "csv": (write_csv, ".csv"), "folder": (write_folder, "")}
CASES = [(fmt, container) for fmt in RECORDS for container in WRITERS if container != "csv" or fmt in FLAT]


def write(tmp_path: Path, fmt: str, container: str, records: list[dict] | None = None) -> Path:
    writer, suffix = WRITERS[container]
    return writer(tmp_path / f"{fmt}-{container}{suffix}", RECORDS[fmt] if records is None else records)


@pytest.mark.parametrize(("fmt", "container"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_each_format_reads_the_same_rows_from_each_container(tmp_path: Path, fmt: str, container: str) -> None:
    path = write(tmp_path, fmt, container)
    assert read_data(path) == EXPECTED[fmt]
    assert read_data(path, fmt) == EXPECTED[fmt]  # the format named explicitly reads the same


def test_the_formats_table_is_in_the_documented_order_and_alpaca_wins_over_its_text_column() -> None:
    assert [f.name for f in FORMATS] == ["preference", "messages", "sharegpt", "alpaca", "text", "prompt-completion"]
    rendered = {"instruction": "say abc", "output": "abc", "text": "### say abc ### abc"}
    assert row_from_record(rendered, 1, "d:1") == Row(1, "say abc", "abc")  # the output alone is trained
    assert row_from_record(rendered, 1, "d:1", "text") == Row(1, "", "### say abc ### abc")


def test_a_row_of_no_format_names_its_keys_and_the_formats_accepted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as error:
        read_data(path)
    assert str(error.value) == (
        f"{path}:1: the row matches no data format (its keys: answer, question); kbitprep reads preference (prompt, "
        "chosen, rejected); messages (messages); sharegpt (conversations); alpaca (instruction, output); text (text); prompt-completion (prompt, completion)")


def test_a_data_format_that_contradicts_the_rows_says_which_format_they_are(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "text.jsonl", RECORDS["text"])
    with pytest.raises(DataError, match=r"text\.jsonl:1: --data-format alpaca needs the keys instruction, output, but "
                                        r"the row has: text \(its keys are those of text: pass --data-format text or "
                                        r"auto\)$"):
        read_data(path, "alpaca")


@pytest.mark.parametrize(("record", "says"), [
    ({"conversations": [{"from": "wizard", "value": "x"}]},
     r"conversations\[0\] \"from\" is 'wizard', which is no ShareGPT role kbitprep knows; use one of human, user"),
    ({"conversations": []}, r"\"conversations\" must be a non-empty list"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\]: \"value\" must be a string \(missing\)"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, r"no \"assistant\" turn with content"),
    ({"instruction": "x", "output": ""}, r"\"output\" is empty, so the row has nothing to train"),
    ({"instruction": 3, "output": "y"}, r"\"instruction\" must be a string \(a int\)"),
])
def test_bad_alpaca_and_sharegpt_rows_name_the_row_and_the_problem(tmp_path: Path, record: dict, says: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: {says}"):
        read_data(path)


def test_table_rows_are_named_by_row_number_and_null_cells_are_absent(tmp_path: Path) -> None:
    # A JSON array mixing text and prompt/completion rows, as a JSONL file may: the table's
    # missing cells (null) do not make a text row look like a prompt row.
    mixed = write_json_array(tmp_path / "mixed.json", [{"text": "abc"}, {"prompt": "p", "completion": "c"}])
    assert read_data(mixed) == [Row(1, "", "abc"), Row(2, "p", "c")]
    path = write_csv(tmp_path / "columns.csv", [{"a": "1", "b": "2"}])
    with pytest.raises(DataError, match=r"columns\.csv: row 1: the row matches no data format \(its keys: a, b\)"):
        read_data(path)


def test_csv_cells_are_text_and_empty_input_means_no_input(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "numbers.csv", [{"prompt": "007", "completion": "42"}])
    assert read_data(path) == [Row(1, "007", "42")]  # not the numbers 7 and 42


@pytest.mark.parametrize(("name", "content", "says"), [
    ("broken.parquet", b"PAR1 not really parquet", r"broken\.parquet: cannot be read as a Parquet file \(ArrowInvalid"),
    ("broken.json", b'[{"text": "a"},', r"broken\.json: cannot be read as a JSON array \("),
    ("empty.csv", b"", r"empty\.csv: holds no rows"),
    ("packed.csv", b"\x1f\x8b\x08\x00", r"packed\.csv: is a gzip-compressed file; decompress it first"),
])
def test_unreadable_files_name_the_container_and_the_reason(tmp_path: Path, name: str, content: bytes,
                                                             says: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=says):
        read_data(tmp_path / name)


def test_a_folder_datasets_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match=r"notes: is a folder, but not one `datasets` saved"):
        read_data(tmp_path / "notes")


def test_reading_writes_no_cache_beside_the_data(tmp_path: Path) -> None:
    for fmt, container in (("alpaca", "csv"), ("text", "json-array"), ("sharegpt", "parquet")):
        read_data(write(tmp_path, fmt, container))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca-csv.csv", "sharegpt-parquet.parquet",
                                                           "text-json-array.json"]


def test_a_data_folder_is_fingerprinted_by_its_files(tmp_path: Path) -> None:
    folder = write(tmp_path, "text", "folder")
    before = data_fingerprint(folder)
    assert data_fingerprint(folder) == before
    write_folder(tmp_path / "other", [{"text": "abcdeg"}, {"text": "0123"}])
    assert data_fingerprint(tmp_path / "other") != before


# --- which tokens are trained ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kbitprep.app.demo import DEMO_MODEL

    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained(example: dict[str, list[int]]) -> list[int]:
    """The token ids a row trains (labels other than -100, each equal to its input id)."""
    pairs = [(token, label) for token, label in zip(example["input_ids"], example["labels"], strict=True)
             if label != IGNORE_INDEX]
    assert all(token == label for token, label in pairs)
    return [token for token, _ in pairs]


def expected_trained(tokenizer, fmt: str) -> list[list[int]]:
    """Per row: alpaca and prompt/completion train the output (then eos), text everything after bos,
    the chat formats each assistant answer and the template's end-of-turn token `<|end|>`."""
    eos, end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")
    return {
        "alpaca": [ids(tokenizer, "abc") + [eos], ids(tokenizer, "5") + [eos]],
        "prompt-completion": [ids(tokenizer, " bcd") + [eos], ids(tokenizer, " 234") + [eos]],
        "text": [ids(tokenizer, "abcdef") + [eos], ids(tokenizer, "0123") + [eos]],
        "sharegpt": [ids(tokenizer, "hello") + [end], ids(tokenizer, "345") + [end] + ids(tokenizer, "678") + [end]],
        "messages": [ids(tokenizer, "hello") + [end], ids(tokenizer, "345") + [end]],
    }[fmt]


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_trains_exactly_the_expected_tokens(tokenizer, fmt: str) -> None:
    data = tokenize_rows(EXPECTED[fmt], tokenizer, seq_len=64)
    assert [trained(example) for example in data.examples] == expected_trained(tokenizer, fmt)
    if fmt == "alpaca":  # the whole prompt, instruction and input, is masked
        assert data.examples[1]["input_ids"][:-2] == [tokenizer.bos_token_id, *ids(tokenizer, "add\n\n2 and 3")]


# One container per format, so that every container is trained from once.
TRAINED_FROM = {"alpaca": "csv", "sharegpt": "parquet", "messages": "folder", "text": "json-array",
                "prompt-completion": "jsonl"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(TRAINED_FROM))
def test_a_run_on_each_format_trains_the_expected_tokens(tmp_path_factory: pytest.TempPathFactory, tokenizer,
                                                        fmt: str) -> None:
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.training.inputs import RunRequest, read_inputs, resolve_settings
    from kbitprep.app.training.run import FinetuneRun, FinetuneSettings

    root = tmp_path_factory.mktemp(f"train-{fmt}")
    model = build_tiny_model(root / "model")
    data = write(root, fmt, TRAINED_FROM[fmt])
    settings = FinetuneSettings(str(model), str(data), str(root / "run"), max_steps=2, batch_size=2, seq_len=64,
                                lora_r=4, lora_alpha=8, lr=1e-2)
    request = RunRequest(*resolve_settings(settings)[:1], tuple(read_data(data)))
    inputs = read_inputs(request)
    report = FinetuneRun(request, inputs=inputs).run()
    assert [trained(example) for example in inputs.data.examples] == expected_trained(tokenizer, fmt)
    assert report.data["trained_tokens_per_epoch"] == sum(map(len, expected_trained(tokenizer, fmt)))
    assert [entry["step"] for entry in report.loss_history] == [1, 2]
