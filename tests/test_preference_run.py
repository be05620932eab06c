"""Preference runs end to end: the rows in each container, the method/data checks, a DPO and an ORPO run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kbitprep.app.config.settings import FinetuneError, FinetuneSettings
from kbitprep.app.data.files import read_data
from kbitprep.app.data.rows import DataError, Row

TEXT = [{"prompt": "abc", "chosen": "defg", "rejected": "zyx"}, {"prompt": "12", "chosen": "345", "rejected": "10"}]
CHAT = [{"prompt": [{"role": "user", "content": "abc"}], "chosen": [{"role": "assistant", "content": "def"}],
         "rejected": [{"role": "assistant", "content": "zyx"}]}]


def test_text_pairs_read_alike_from_every_container(tmp_path: Path) -> None:
    from datasets import Dataset

    expected = [Row(1, "abc", "defg", rejected=Row(1, "abc", "zyx")), Row(2, "12", "345", rejected=Row(2, "12", "10"))]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    (tmp_path / "p.json").write_text(json.dumps(TEXT))
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nabc,defg,zyx\n12,345,10\n")
    Dataset.from_list(TEXT).to_parquet(str(tmp_path / "p.parquet"))
    Dataset.from_list(TEXT).save_to_disk(str(tmp_path / "folder"))
    for name in ("p.jsonl", "p.json", "p.csv", "p.parquet", "folder"):
        assert read_data(tmp_path / name) == expected, name


def test_conversational_pairs_keep_the_prompt_as_context(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps(CHAT[0]) + "\n")
    (row,) = read_data(tmp_path / "c.jsonl")
    assert row.preference and row.kind == "messages" and row.context_turns == 1
    assert row.rejected is not None and row.rejected.messages[-1]["content"] == "zyx"


def test_a_pair_without_its_keys_names_the_keys_seen(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "abc", "chosen": "d", "rejected": "e"}) + "\n")
    with pytest.raises(DataError, match="needs the keys prompt, chosen and rejected, but has: chosen, question, "
                       "rejected"):
        read_data(tmp_path / "bad.jsonl")


def test_pairs_and_demonstrations_in_one_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mixed.jsonl").write_text(json.dumps(TEXT[0]) + "\n" + json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(DataError, match=":2: a demonstration row, but line 1 is a preference"):
        read_data(tmp_path / "mixed.jsonl")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbitprep.app.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("pref") / "tiny", seed=0)


def test_the_method_and_the_rows_must_agree(tmp_path: Path, model: Path) -> None:
    from kbitprep.app.demo import DEMO_DATA, DEMO_PREFERENCE_DATA
    from kbitprep.app.training.run import finetune

    with pytest.raises(DataError, match="--method dpo trains on preference rows"):
        finetune(FinetuneSettings(str(model), str(DEMO_DATA), str(tmp_path / "a"), method="dpo", max_steps=1))
    with pytest.raises(DataError, match="--method sft does not train on; pass --method dpo"):
        finetune(FinetuneSettings(str(model), str(DEMO_PREFERENCE_DATA), str(tmp_path / "b"), max_steps=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fsdp_and_pack_refuse_a_preference_method() -> None:
    settings = FinetuneSettings("m", "d", "o", method="dpo", fsdp=True)
    with pytest.raises(FinetuneError, match="--fsdp cannot train with --method dpo"):
        settings.check_sharded()
    with pytest.raises(FinetuneError, match="--pack cannot be used with --method orpo"):
        FinetuneSettings("m", "d", "o", method="orpo", pack=True).check()


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_demo_run_records_its_rewards(tmp_path: Path, method: str, single_thread) -> None:
    from kbitprep.app.demo import run_demo

    report = run_demo(tmp_path / "run", max_steps=12, method=method)
    record = json.loads((tmp_path / "run" / "report.json").read_text())
    assert record["settings"]["method"] == method and record["data"]["preference"] is True
    history = record["loss_history"]
    assert len(history) == 12 and all("rewards/margins" in entry for entry in history)
    if method == "dpo":  # the adapter starts as the reference
        assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    assert report.loss_history[-1]["loss"] < report.loss_history[0]["loss"]
    # the memory model sized the preference step (2 rows a pair, DPO's reference) at the data's longest row
    memory = record["memory"]
    assert memory["predicted"]["settings"]["method"] == method, memory
    assert abs(memory["error_percent"]) <= 10, memory
