"""`kbitprep generate`: completions and chat from a finished run and from a merged folder.

Checked on the demo's tiny Llama trained on the demo's conversations (its template ends a
turn with `<|end|>`, several tokens of the demo tokenizer):

- a completion from the run folder equals greedy `model.generate` of the base loaded and
  prepared as the run did, with the adapter (peft); from a merged folder, greedy
  `generate` of `from_pretrained`; the streamed text is the returned text;
- `--chat` fed by a pipe: one reply line per user line, each stopped at the end-of-turn
  text (never printed) before --max-new-tokens, with the history kept (the replies equal
  the library's for the same conversation); `/exit` ends it;
- a folder that is no run, an unfinished run, and `--chat` without a chat template get one
  clear line.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kbitprep.app.export.generate import GenerateError, end_of_turn, load_generator

MAX_NEW = 24


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kbitprep", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"},
                          timeout=180)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo trained on its conversations, long enough to end its turns with <|end|>."""
    from kbitprep.app.data.jsonl import read_jsonl
    from kbitprep.app.demo import DEMO_CHAT_DATA, _base_model, demo_settings
    from kbitprep.app.training.run import run_pipeline

    run = tmp_path_factory.mktemp("generate") / "run"
    settings = dataclasses.replace(demo_settings(run, max_steps=60), data=str(DEMO_CHAT_DATA), samples=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_pipeline(settings, read_jsonl(DEMO_CHAT_DATA), None, setup=_base_model, makes=("base-model",))
    finally:
        torch.set_num_threads(threads)
    return run


def _greedy(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_a_run_completes_as_greedy_generate_of_its_base_and_adapter(chat_run: Path) -> None:
    from peft import PeftModel

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.model.loading import load_quantized_model, load_tokenizer
    from kbitprep.app.training.run import read_report

    settings = read_report(chat_run)["settings"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = prepare_model_for_kbit_training(load_quantized_model(settings["model"], settings["quantize"]),
                                               upcast=settings["upcast"])
        reference = PeftModel.from_pretrained(base, chat_run / "adapter")
        generator = load_generator(chat_run)
    tokenizer = load_tokenizer(settings["model"])
    streamed: list[str] = []
    for prompt in ("klm", "3456"):
        streamed.clear()
        ours = generator.complete(prompt, max_new_tokens=MAX_NEW, stream=streamed.append)
        assert ours == _greedy(reference, tokenizer, prompt)
        assert "".join(streamed) == ours
    assert generator.source == "run"


@pytest.mark.slow
def test_a_merged_folder_completes_as_greedy_generate_of_from_pretrained(chat_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbitprep.app.export.merge import merge_run

    merge_run(chat_run, tmp_path / "merged", dtype="fp32")
    generator = load_generator(tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert generator.source == "merged"
    assert generator.complete("klm", max_new_tokens=MAX_NEW) == _greedy(reference, tokenizer, "klm")
    result = _cli("generate", str(tmp_path / "merged"), "--prompt", "klm", "--prompt", "3456",
                  "--max-new-tokens", str(MAX_NEW))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [_greedy(reference, tokenizer, p) for p in ("klm", "3456")]


@pytest.mark.slow
def test_chat_from_a_pipe_stops_each_reply_at_the_end_of_turn_and_keeps_the_history(chat_run: Path) -> None:
    generator = load_generator(chat_run)
    assert end_of_turn(generator.tokenizer) == "<|end|>"
    result = _cli("generate", str(chat_run), "--chat", "--max-new-tokens", "40", stdin="klm\nmore\n/exit\n012\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 2  # "/exit" ended it: "012" was never answered
    history: list[dict[str, str]] = []
    for user, printed in zip(("klm", "more"), replies):
        history.append({"role": "user", "content": user})
        ids = generator.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        expected = generator.reply(history, max_new_tokens=40)
        assert printed == expected and "<|end|>" not in printed and ids
        # it stopped because the model ended its turn, well before the token limit
        assert len(generator.tokenizer(printed, add_special_tokens=False)["input_ids"]) < 40
        history.append({"role": "assistant", "content": expected})


@pytest.mark.slow
def test_what_cannot_be_generated_from_is_one_clear_line(chat_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenerateError, match="is not a kbitprep run folder.*or a folder written by `kbitprep merge`"):
        load_generator(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "INCOMPLETE").write_text("{}")
    with pytest.raises(GenerateError, match=r"unfinished run .*--resume`, then generate"):
        load_generator(unfinished)

    from kbitprep.app.export.merge import merge_run

    merge_run(chat_run, tmp_path / "merged")
    config = tmp_path / "merged" / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for name in ("chat_template.jinja",):
        (tmp_path / "merged" / name).unlink(missing_ok=True)
    result = _cli("generate", str(tmp_path / "merged"), "--chat", stdin="klm\n")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "kbitprep: error: the tokenizer has no chat template, so --chat cannot render a conversation; use "
        "--prompt TEXT, or train with --chat-template FILE (the run then carries it)"]
