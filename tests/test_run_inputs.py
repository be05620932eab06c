"""A run reads each input once: config.json (besides transformers' own loads) and the tokenizer.

Counted with an audit hook on `open` (every Python file open raises the "open" audit
event), over one single-process finetune of the demo's tiny Llama, against what
transformers and peft themselves open for the same folder: a config, tokenizer and model
load, and the two adapter saves of a one-step run (its checkpoint and its adapter).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "kbitprep" / "data" / "demo.jsonl"

_WATCHED: list[tuple[str, list[str]]] = []  # (folder, opened paths) while a count is on


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, Path)):
        folder, opened = _WATCHED[-1]
        if str(args[0]).startswith(folder):
            opened.append(str(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it counts only while _WATCHED is set


def opens(folder: Path, work) -> list[str]:
    """The files below `folder` that `work()` opens."""
    opened: list[str] = []
    _WATCHED.append((str(folder), opened))
    try:
        work()
    finally:
        _WATCHED.pop()
    return opened


@pytest.mark.slow
def test_one_run_reads_config_json_once_and_loads_the_tokenizer_once(tmp_path: Path, monkeypatch) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.training.run import FinetuneSettings, finetune

    model = build_tiny_model(tmp_path / "tiny")
    config_json = str(model / "config.json")

    def libraries_own() -> None:  # what transformers and peft open for the loads and saves any run makes
        from peft import LoraConfig, get_peft_model

        AutoConfig.from_pretrained(model, local_files_only=True)
        AutoTokenizer.from_pretrained(model, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(model, local_files_only=True,
                                                      quantization_config=BitsAndBytesConfig(load_in_4bit=True))
        adapted = get_peft_model(loaded, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name in ("checkpoint", "adapter"):  # the one step's checkpoint, then the run's adapter
            adapted.save_pretrained(tmp_path / "saved" / name)

    baseline = opens(model, libraries_own).count(config_json)

    loads: list[str] = []
    original = AutoTokenizer.from_pretrained.__func__  # a classmethod

    def counted(cls, *args, **kwargs):
        loads.append(str(args[0]) if args else "?")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counted))
    settings = FinetuneSettings(str(model), str(DEMO_DATA), str(tmp_path / "run"), max_steps=1, batch_size=2,
                                seq_len=32, lora_r=4)
    ours = opens(model, lambda: finetune(settings)).count(config_json)
    assert len(loads) == 1, loads  # the tokenizer: loaded once, for the checks, the data and the samples
    assert 1 <= ours <= baseline + 1, (ours, baseline)  # at most transformers' own loads plus kbitprep's one read
