"""`kbitprep demo`: the whole fine-tuning pipeline on a tiny model and data set shipped in the package.

The package data (`kbitprep/data/`) holds a 2-layer Llama config (hidden 64), a
character-level tokenizer built with the `tokenizers` library, and `demo.jsonl`: runs of
the alphabet and of the digits starting anywhere ("klmnopq...", "7890123..."). After each
character the next one is certain, so even LoRA on a frozen, randomly initialised 4-bit
model learns it in a hundred steps: the loss falls by well over half, and the greedy
completion of "klm" goes from noise to "nopqrstu...".

The demo builds that model with a fixed seed, saves it into the run folder
(`base-model/`, so the saved adapter has its base beside it), and then runs exactly the
code `kbitprep finetune` runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from importlib import resources
from pathlib import Path

from .data.jsonl import read_jsonl
from .runs.folder import BASE_MODEL_DIR, atomic_directory
from .training.run import FinetuneObserver, FinetuneReport, FinetuneSettings, run_pipeline

__all__ = ["DEMO_CHAT_DATA", "DEMO_DATA", "DEMO_MODEL", "DEMO_PREFERENCE_DATA", "build_tiny_model", "demo_settings",
           "run_demo"]

_PACKAGE_DATA = resources.files("kbitprep") / "data"
DEMO_MODEL = _PACKAGE_DATA / "tiny-llama"  # config.json, tokenizer.json, tokenizer_config.json
DEMO_DATA = _PACKAGE_DATA / "demo.jsonl"
DEMO_CHAT_DATA = _PACKAGE_DATA / "demo-chat.jsonl"  # the same task as conversations, for the chat template
# The same task as preference pairs: the run continued (chosen) or walked backwards (rejected), for --method dpo|orpo.
DEMO_PREFERENCE_DATA = _PACKAGE_DATA / "demo-preference.jsonl"
DEMO_STEPS = 120
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_model(destination: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build the shipped tiny Llama with seeded random weights and save it, with its tokenizer, to `destination`.

    The folder appears whole or not at all (it is built beside and renamed into place).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    destination = Path(destination)
    with resources.as_file(DEMO_MODEL) as source, atomic_directory(destination) as staging:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(staging)
        for name in _TOKENIZER_FILES:
            shutil.copyfile(source / name, staging / name)
    return destination


def _base_model(run: Path) -> None:
    """The demo's base model in its run folder: built, or kept when a resumed run already has it."""
    if not (run / BASE_MODEL_DIR / "config.json").is_file():
        build_tiny_model(run / BASE_MODEL_DIR)


def demo_settings(output: str | os.PathLike[str], *, max_steps: int = DEMO_STEPS,
                  overwrite: bool = False, resume: bool = False, method: str = "sft") -> FinetuneSettings:
    """The demo's settings: a learning rate and batch that make the tiny model learn in ~100 steps.

    A preference `method` ("dpo", "orpo") trains on the demo's preference pairs.
    """
    output = Path(output).absolute()
    return FinetuneSettings(
        model=str(output / BASE_MODEL_DIR),
        data=str(DEMO_DATA if method == "sft" else DEMO_PREFERENCE_DATA),
        method=method,
        output=str(output),
        quantize="nf4",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lr=1e-2,
        batch_size=8,
        max_steps=max_steps,
        seq_len=64,
        seed=0,
        save_steps=50,
        overwrite=overwrite,
        resume=resume,
        samples=("klm", "3456"),
        max_new_tokens=16,
    )


def run_demo(output: str | os.PathLike[str], *, max_steps: int = DEMO_STEPS, overwrite: bool = False,
             resume: bool = False, observer: FinetuneObserver | None = None, method: str = "sft") -> FinetuneReport:
    """Build the tiny model into `output/base-model`, then fine-tune it as `kbitprep finetune` would
    (with a preference `method`, on the demo's preference pairs).

    Raises:
        RunFolderError: `output` holds a finished run and `overwrite` is False, or an
            unfinished one and neither `resume` nor `overwrite` is True.
    """
    import torch

    # The demo's matrices are 64 wide: one thread is fastest, and on a busy two-core
    # machine extra threads only wait on each other (a step goes from ~10 ms to seconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = DEMO_DATA if method == "sft" else DEMO_PREFERENCE_DATA
        with resources.as_file(data) as data_file:  # a real file even if the package is zipped
            settings = dataclasses.replace(demo_settings(output, max_steps=max_steps, overwrite=overwrite,
                                                         resume=resume, method=method), data=str(data_file))
            return run_pipeline(settings, read_jsonl(data_file), observer, setup=_base_model,
                                makes=(BASE_MODEL_DIR,))
    finally:
        torch.set_num_threads(threads)
