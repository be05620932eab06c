"""The pieces under `kbitprep finetune`, in process and without a model: JSONL reading,
label masking, and the run folder's states, atomic writes and checkpoint markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_tiny_model
from kbitprep.app.data.rows import IGNORE_INDEX, DataError, Row
from kbitprep.app.data.jsonl import read_jsonl
from kbitprep.app.data.tokenize import CausalLMCollator, tokenize_rows
from kbitprep.app.runs.folder import CHECKPOINT_COMPLETE, RunFolder, RunFolderError, atomic_directory, atomic_write_json


class CharTokenizer:
    """One id per character; bos 1, eos 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


# --- JSONL -------------------------------------------------------------------------------


def test_read_jsonl_reads_both_row_forms_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "abc"}\n\n{"prompt": "Q:", "completion": " A"}\n')
    assert read_jsonl(path) == [Row(1, "", "abc"), Row(3, "Q:", " A")]


@pytest.mark.parametrize(("content", "fragment"), [
    (b'{"text": "ok"}\n{"text": "broken\n', "rows.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n["a", "list"]\n', "rows.jsonl:2: expected a JSON object"),
    (b'{"text": "ok"}\n{"prompt": "p"}\n', 'rows.jsonl:2: has "prompt" but no "completion"'),
    (b'{"completion": "c"}\n', 'rows.jsonl:1: has "completion" but no "prompt"'),
    (b'{"txt": "typo"}\n',
     "rows.jsonl:1: the row matches no data format (its keys: txt); kbitprep reads preference (prompt, chosen, "
     "rejected); messages (messages); sharegpt (conversations); alpaca (instruction, output); text (text); prompt-completion (prompt, completion)"),
    (b'{"text": 3}\n', 'rows.jsonl:1: "text" must be a string, not int'),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "rows.jsonl:2: not UTF-8 text"),
    (b"\n  \n", "rows.jsonl: holds no rows"),
])
def test_read_jsonl_names_the_file_and_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert fragment in str(error.value)


def test_read_jsonl_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_jsonl(tmp_path)


def test_only_the_completion_is_trained_and_long_rows_are_cut() -> None:
    rows = [Row(1, "ab", "cd"), Row(2, "", "xyz"), Row(3, "a long prompt", "z")]
    data = tokenize_rows(rows, CharTokenizer(), seq_len=6)
    a, b, c, d, x, y, z = map(ord, "abcdxyz")
    assert data.examples[0] == {"input_ids": [1, a, b, c, d, 2], "labels": [IGNORE_INDEX] * 3 + [c, d, 2]}
    assert data.examples[1] == {"input_ids": [1, x, y, z, 2], "labels": [IGNORE_INDEX, x, y, z, 2]}
    assert data.truncated == 1 and data.dropped == (3,)  # row 3's completion lies beyond 6 tokens
    batch = CausalLMCollator(pad_token_id=0)(data.examples)
    assert batch["input_ids"][1].tolist() == [1, x, y, z, 2, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, x, y, z, 2, IGNORE_INDEX]


def test_no_trainable_row_is_an_error() -> None:
    with pytest.raises(DataError, match="no row has a completion token within --seq-len 3"):
        tokenize_rows([Row(1, "long prompt", "c")], CharTokenizer(), seq_len=3, source="d.jsonl")


# --- run folder ------------------------------------------------------------------------------


def test_run_folder_states_and_claims(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert run.check_claim(overwrite=False, resume=False) == "absent"
    run.start(overwrite=False, settings={"lr": 0.1})
    assert run.state() == "incomplete" and run.marker()["settings"] == {"lr": 0.1}
    with pytest.raises(RunFolderError, match="unfinished run .*--resume"):
        run.check_claim(overwrite=False, resume=False)
    assert run.check_claim(overwrite=False, resume=True) == "incomplete"

    (run.path / "adapter").mkdir()
    run.finish({"status": "finished"})
    assert run.state() == "finished" and not (run.path / "INCOMPLETE").exists()
    for resume in (False, True):
        with pytest.raises(RunFolderError, match="finished run .*--overwrite"):
            run.check_claim(overwrite=False, resume=resume)
    (run.path / "notes.txt").write_text("mine")
    run.start(overwrite=True, settings={})
    # only kbitprep's files go (its manifest stays: it records what the new run writes)
    assert sorted(p.name for p in run.path.iterdir()) == [".kbitprep-manifest.json", "INCOMPLETE", "notes.txt"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(RunFolderError, match="holds no kbitprep run"):
        RunFolder(other).check_claim(overwrite=False, resume=False)
    with pytest.raises(RunFolderError, match="is a file"):
        RunFolder(other / "data.csv").check_claim(overwrite=True, resume=False)


def test_atomic_directory_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"half")
        raise RuntimeError("killed while saving")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (target / "weights").read_bytes() == b"whole"


def test_resume_uses_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for step in (10, 20, 30):
        (run.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
    atomic_write_json(run.checkpoints_dir / "checkpoint-10" / CHECKPOINT_COMPLETE, {"step": 10})
    atomic_write_json(run.checkpoints_dir / "checkpoint-20" / CHECKPOINT_COMPLETE, {"step": 20})
    # checkpoint-30 has no marker: the process died while saving it.
    assert run.latest_checkpoint() == run.checkpoints_dir / "checkpoint-20"
    assert [p.name for p in run.remove_incomplete_checkpoints()] == ["checkpoint-30"]

    (run.checkpoints_dir / "checkpoint-40").mkdir()
    run.mark_checkpoint_complete(run.checkpoints_dir / "checkpoint-40", 40)
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["checkpoint-40"]  # older ones pruned after
    assert json.loads((run.checkpoints_dir / "checkpoint-40" / CHECKPOINT_COMPLETE).read_text()) == {"step": 40}


# --- model folders -----------------------------------------------------------------------------


def test_model_folder_problems_name_the_file(tmp_path: Path) -> None:
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.model.loading import ModelFolderError, check_model_folder, load_quantized_model, load_tokenizer

    model = build_tiny_model(tmp_path / "tiny")
    assert check_model_folder(model)["model_type"] == "llama"

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="holds no weights .*kbitprep inspect"):
        check_model_folder(config_only)
    assert check_model_folder(config_only, need_weights=False)["hidden_size"] == 64
    with pytest.raises(ModelFolderError, match="holds no tokenizer"):
        load_tokenizer(config_only)

    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: damaged or truncated weight file"):
        load_quantized_model(model, "nf4")


# --- LoRA targets --------------------------------------------------------------------------


def test_default_targets_are_the_linear_layers_and_train_a_mixture_of_experts(tmp_path: Path) -> None:
    """Mixtral in transformers 5 keeps its experts as fused parameters; asking peft for
    "all-linear" also wraps those, and peft's parameter wrapper refuses dropout. Named
    linear layers adapt attention and the router, and train with dropout on."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MixtralConfig

    from kbitprep import prepare_model_for_kbit_training, verify_gradient_flow
    from kbitprep.app.model.lora import attach_lora, linear_layer_names
    from kbitprep.app.config.settings import FinetuneSettings

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    save_tiny_model(tmp_path, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' CPU backend: torch.jit deprecations
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    names = linear_layer_names(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(names) and "lm_head" not in names

    settings = FinetuneSettings(model=str(tmp_path), data="unused.jsonl", output=str(tmp_path / "run"), lora_dropout=0.1)
    model = attach_lora(prepare_model_for_kbit_training(model), settings)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == set(names)
    verify_gradient_flow(model)
