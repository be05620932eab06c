"""`--optim`: torch's AdamW and bitsandbytes' 8-bit AdamW (paged or not), through the Trainer and the
sharded loop's `make_optimizer`, and the memory model's size of each one's state.

The Trainer's own optimizer factory (`Trainer.get_optimizer_cls_and_kwargs`) is the reference:
`make_optimizer` must build what it builds for each name. On this CPU bitsandbytes 0.50 steps
both 8-bit optimizers (the paged one without paging: there is no unified memory on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from kbitprep.app.config import optimizer as optim_module
from kbitprep.app.config.optimizer import OPTIM_CHOICES, OptimizerUnavailableError, make_optimizer
from kbitprep.app.config.settings import FinetuneError, FinetuneSettings
from kbitprep.app.memory.optimizers import OPTIMIZERS


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.untyped_storage().nbytes() for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def _trainer_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="unused", optim=name, learning_rate=lr, weight_decay=0.0, use_cpu=True,
                             report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    # Trainer.create_optimizer passes the decay in its parameter groups (args.weight_decay, 0 here)
    return cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs)


@pytest.mark.parametrize("name", OPTIM_CHOICES)
def test_make_optimizer_builds_what_the_trainer_builds_and_steps_the_same(name: str) -> None:
    torch.manual_seed(0)
    ours_param, theirs_param = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(8))
    reference = [torch.nn.Parameter(p.detach().clone()) for p in (ours_param, theirs_param)]
    ours = make_optimizer([ours_param, theirs_param], FinetuneSettings("m", "d", "o", optim=name, lr=1e-2))
    theirs = _trainer_optimizer(name, reference, 1e-2)
    keys = ("lr", "betas", "eps", "weight_decay")
    assert {k: ours.param_groups[0][k] for k in keys} == {k: theirs.param_groups[0][k] for k in keys}
    assert ours.defaults.get("optim_bits", 32) == theirs.defaults.get("optim_bits", 32)
    assert getattr(ours, "is_paged", False) == getattr(theirs, "is_paged", False)
    for _ in range(3):
        for optimizer, params in ((ours, (ours_param, theirs_param)), (theirs, reference)):
            for p in params:
                p.grad = torch.full_like(p, 0.5) * torch.arange(p.numel()).reshape(p.shape) / p.numel()
            optimizer.step()
    assert torch.equal(ours_param, reference[0]) and torch.equal(theirs_param, reference[1])


@pytest.mark.parametrize("name", OPTIM_CHOICES)
def test_the_memory_model_sizes_each_optimizers_state_as_it_is_held(name: str) -> None:
    # 4,096 values and more: 8-bit state; fewer: fp32 (bitsandbytes' min_8bit_size)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((16, 512), (64, 4096), (16, 100), (7,))]
    optimizer = make_optimizer(params, FinetuneSettings("m", "d", "o", optim=name))
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    measured = _state_bytes(optimizer)
    assert OPTIMIZERS[name].state(params) == measured
    if name != "adamw_torch":
        big = optimizer.state[params[1]]
        assert big["state1"].dtype == big["state2"].dtype == torch.uint8
        assert optimizer.state[params[2]]["state1"].dtype == torch.float32
        fp32 = OPTIMIZERS["adamw_torch"].state(params)
        assert measured < 0.3 * fp32  # about 2 bytes a value against 8


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 256 and rank 16: each LoRA A holds 4,096 values, enough for bitsandbytes' 8-bit state
    config = tiny_llama_config(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return save_tiny_model(tmp_path_factory.mktemp("optim") / "model", config, tokenizer=True)


@pytest.mark.parametrize("name", OPTIM_CHOICES)
def test_finetune_trains_with_each_optimizer_and_keeps_its_state_in_its_bits(
        name: str, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Trainer

    from kbitprep.app.demo import DEMO_DATA
    from kbitprep.app.training.run import finetune

    built: list[torch.optim.Optimizer] = []
    create = Trainer.create_optimizer

    def keep(self, *args, **kwargs):  # the optimizer the Trainer made for the run, to look at its state
        built.append(create(self, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(Trainer, "create_optimizer", keep)

    settings = FinetuneSettings(str(model_folder), str(DEMO_DATA), str(tmp_path / "run"), max_steps=3,
                                save_steps=3, batch_size=2, seq_len=32, lora_r=16, lr=1e-3, optim=name,
                                loss="full")
    report = finetune(settings)
    losses = torch.tensor([entry["loss"] for entry in report.loss_history])
    assert len(losses) == 3 and bool(torch.isfinite(losses).all())
    recorded = json.loads((tmp_path / "run" / "report.json").read_text())
    assert recorded["settings"]["optim"] == name
    optimizer = getattr(built[-1], "optimizer", built[-1])  # the Trainer may wrap it (accelerate)
    dtypes = {value.dtype for entry in optimizer.state.values() for key, value in entry.items()
              if key in ("exp_avg", "state1") and isinstance(value, torch.Tensor)}
    assert dtypes == ({torch.float32} if name == "adamw_torch" else {torch.uint8})  # every adapter has >= 4,096
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert OPTIMIZERS[name].state(trained) == _state_bytes(optimizer)  # what the memory model adds


def test_an_optimizer_that_cannot_step_here_is_refused_before_the_run_folder_is_touched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kbitprep.app.training.run import finetune

    optim_module.why_not_here.cache_clear()
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no 8-bit kernel for this device")

    monkeypatch.setattr(bnb.optim, "PagedAdamW8bit", broken)
    try:
        settings = FinetuneSettings("model", "data.jsonl", str(tmp_path / "run"), optim="paged_adamw_8bit")
        with pytest.raises(FinetuneError, match="--optim must be an optimizer whose library steps") as error:
            finetune(settings)
        assert "pass --optim adamw_torch" in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()
        with pytest.raises(OptimizerUnavailableError, match="--optim paged_adamw_8bit: bitsandbytes cannot step"):
            make_optimizer([torch.nn.Parameter(torch.zeros(4))], settings)
    finally:
        optim_module.why_not_here.cache_clear()
    assert dataclasses.replace(settings, optim="adamw_torch").optim == "adamw_torch"
