"""The chunked causal-LM loss against the full-logits loss that transformers computes.

Every comparison runs the same model twice on the same batch: once with its own loss
(`model(**batch).loss`, full logits) and once with `causal_lm_loss`, and compares the
loss and the gradient of every trainable (LoRA) parameter. The batches carry padding and
prompt masking (labels of -100). The chunk budget is shrunk (`small_chunks`) so that even
these tiny models are cut into several chunks and, where the head is upcast, several pieces.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    CohereConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
)

from kbitprep.loss import LossInputError, causal_lm_loss, plan_loss
from kbitprep.loss import causal_lm as loss_call
from kbitprep.loss import plan as loss_plan
from kbitprep.precision import override_fast_dtypes

_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64}

# name -> (config, what the plan must say about the head and its transform)
CONFIGS = {
    "llama": (lambda: LlamaConfig(vocab_size=128, **_SMALL), "none"),
    "mistral": (lambda: MistralConfig(vocab_size=128, **_SMALL), "none"),
    # Qwen2's real vocabulary with a tiny width: the case the chunks exist for.
    "qwen2-151k": (lambda: Qwen2Config(vocab_size=151_936, **_SMALL), "none"),
    "gemma-tied": (lambda: GemmaConfig(vocab_size=128, head_dim=8, **_SMALL), "none"),
    "gemma2-softcap": (lambda: Gemma2Config(vocab_size=128, head_dim=8, final_logit_softcapping=2.0,
                                            query_pre_attn_scalar=8, **_SMALL), "softcap"),
    "cohere-scale": (lambda: CohereConfig(vocab_size=128, logit_scale=0.25, **_SMALL), "multiply by logit_scale"),
    "granite-scaling": (lambda: GraniteConfig(vocab_size=128, logits_scaling=4.0, **_SMALL),
                        "divide by logits_scaling"),
    "gpt2-tied": (lambda: GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "none"),
}


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name][0]())
    # Random logits of a tiny untrained model are close to zero; bigger ones make softcapping bite.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.train()


def with_lora(model: torch.nn.Module, targets: list[str] | str = "all-linear") -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's FutureWarning about is_gradient_checkpointing; Conv1D notes
        return get_peft_model(model, config)


def masked_batch(vocab: int, seed: int = 0, length: int = 12) -> dict[str, torch.Tensor]:
    """Two rows: the first with a 4-token prompt (labels -100), the second padded after 8 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 positions and head pieces of 3 rows x 32 wide, so every path loops."""
    def shrink(vocab: int) -> None:
        monkeypatch.setattr(loss_plan, "CHUNK_LOGITS", 5 * vocab)
        monkeypatch.setattr(loss_plan, "AMORTIZE_TOKENS", 5)
        monkeypatch.setattr(loss_plan, "WEIGHT_PIECE", 3 * 32)
    return shrink


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def reference_step(model, batch, num_items=None):
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    value = model(**batch, **kwargs).loss
    value.backward()
    return value.detach(), trainable_grads(model)


def chunked_step(model, batch, num_items=None, **options):
    value = causal_lm_loss(model, batch, num_items_in_batch=num_items, **options)
    value.backward()
    return value.detach(), trainable_grads(model)


def assert_same(reference, chunked, rtol=1e-5):
    (ref_loss, ref_grads), (loss, grads) = reference, chunked
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=rtol * scale + 1e-9, msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_lora_gradients_equal_the_full_loss(name, small_chunks, single_thread):
    model = with_lora(tiny_model(name))
    vocab = model.get_output_embeddings().weight.shape[0]
    small_chunks(vocab)
    plan = plan_loss(model)
    assert (plan.loss, plan.reason, plan.logits_transform) == ("chunked", None, CONFIGS[name][1])
    assert plan.chunk_tokens == 5 and plan.vocab_size == vocab
    batch = masked_batch(vocab)
    assert_same(reference_step(model, batch), chunked_step(model, batch))


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap"])
def test_recomputing_backward_gives_the_same_gradients(name, small_chunks, single_thread):
    model = with_lora(tiny_model(name))
    small_chunks(128)
    batch = masked_batch(128)
    assert_same(reference_step(model, batch), chunked_step(model, batch, backward="recompute"))


def test_gradient_accumulation_normalises_over_the_whole_batch(small_chunks, single_thread):
    model = with_lora(tiny_model("gemma2-softcap"))
    small_chunks(128)
    batches = [masked_batch(128, seed=seed) for seed in (1, 2)]
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # as the Trainer counts them

    def accumulate(step):
        losses, grads = zip(*(step(model, batch, torch.tensor(num_items)) for batch in batches), strict=True)
        return sum(losses), {name: sum(g[name] for g in grads) for name in grads[0]}

    assert_same(accumulate(reference_step), accumulate(chunked_step))


def test_lora_on_the_head_is_split_into_base_and_adapter(small_chunks, single_thread):
    model = with_lora(tiny_model("llama"), targets=["q_proj", "lm_head"])
    small_chunks(128)
    assert plan_loss(model).head == "LoRA (1 adapter) on a linear weight (float32)"
    batch = masked_batch(128)
    reference, chunked = reference_step(model, batch), chunked_step(model, batch)
    assert any("lm_head.lora_B" in name for name in chunked[1])
    assert_same(reference, chunked)


def test_a_head_peft_trains_whole_is_called_per_chunk(small_chunks, single_thread):
    """`modules_to_save=["lm_head"]`: peft wraps a trainable copy of the head; its weight gets the gradient."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False)
    model = get_peft_model(tiny_model("gemma2-softcap"), config)
    small_chunks(128)
    assert plan_loss(model).head == "ModulesToSaveWrapper called per chunk"
    batch = masked_batch(128)
    reference, chunked = reference_step(model, batch), chunked_step(model, batch)
    assert any("modules_to_save" in name for name in chunked[1])
    assert_same(reference, chunked)


def test_a_trainable_head_gets_its_weight_gradient(small_chunks, single_thread):
    model = tiny_model("gemma2-softcap")  # every parameter trainable, the head's weight included
    small_chunks(128)
    batch = masked_batch(128)
    assert_same(reference_step(model, batch), chunked_step(model, batch))


class _Fp32Head(torch.nn.Module):
    """The oracle's head: the same half-precision weight, its matmul done in fp32."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight.float())


@pytest.mark.parametrize("fast", [True, False], ids=["bf16-fast", "bf16-slow"])
def test_half_precision_head_computes_in_the_device_fast_precision(fast, small_chunks, single_thread):
    """A bf16 model: the head stays bf16 where bf16 is fast, and is upcast piece by piece where it is slow.

    The oracle is the same model whose head computes the full logits in fp32: where the head
    is upcast the two agree to fp32 precision, where it computes in bf16 to bf16's.
    """
    model = tiny_model("llama").to(torch.bfloat16)
    oracle = copy.deepcopy(model)
    oracle.lm_head = _Fp32Head(oracle.lm_head.weight)
    model, oracle = with_lora(model), with_lora(oracle)
    small_chunks(128)
    batch = masked_batch(128)
    with override_fast_dtypes("cpu", {torch.bfloat16} if fast else set()):
        plan = plan_loss(model)
        chunked = chunked_step(model, batch)
    assert plan.compute_dtype == ("bfloat16" if fast else "float32")
    assert plan.weight_rows == (None if fast else 3)
    reference = reference_step(oracle, batch)
    # Upcast, the loss is the oracle's to fp32 precision; the gradients pass through a bf16
    # body, where a difference in the last fp32 bit can flip a bf16 rounding: bf16's tolerance.
    torch.testing.assert_close(chunked[0], reference[0], rtol=3e-2 if fast else 1e-6, atol=0)
    assert_same(reference, chunked, rtol=3e-2)


def test_a_slow_bf16_head_that_fits_one_piece_is_upcast_whole(single_thread):
    """Where bf16 is slow and the whole head fits one piece, forward and backward upcast it whole.

    The default piece size holds this tiny head in one piece: the path `kbitprep demo` takes
    on an AVX2-only CPU (it once failed there with "expected m1 and m2 to have the same dtype").
    """
    model = tiny_model("llama").to(torch.bfloat16)
    oracle = copy.deepcopy(model)
    oracle.lm_head = _Fp32Head(oracle.lm_head.weight)
    model, oracle = with_lora(model), with_lora(oracle)
    batch = masked_batch(128)
    with override_fast_dtypes("cpu", set()):
        plan = plan_loss(model)
        chunked = chunked_step(model, batch)
    assert plan.compute_dtype == "float32" and plan.weight_rows is not None
    assert plan.weight_rows >= model.get_output_embeddings().weight.shape[0]
    reference = reference_step(oracle, batch)
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-6, atol=0)
    assert_same(reference, chunked, rtol=3e-2)


def test_autocast_decides_the_head_precision(small_chunks, single_thread):
    """Under the caller's bf16 autocast (the Trainer's `bf16=True`) an fp32 head computes in bf16, piece by piece."""
    model = with_lora(tiny_model("llama"))
    small_chunks(128)
    batch = masked_batch(128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = plan_loss(model)
        chunked = chunked_step(model, batch)
        reference = reference_step(model, batch)
    assert (plan.compute_dtype, plan.weight_rows) == ("bfloat16", 3) and "autocast" in plan.precision
    assert plan_loss(model).compute_dtype == "float32"  # outside autocast: the head's own dtype
    assert_same(reference, chunked, rtol=3e-2)


def test_four_bit_head_is_called_per_chunk(zoo, small_chunks, single_thread):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=[])  # quantize the head as well
    model = zoo.load("llama", "fp32", quantization_config=config)
    assert type(model.lm_head).__name__ == "Linear4bit"
    model = with_lora(model, targets=["q_proj", "v_proj"])
    small_chunks(128)
    plan = plan_loss(model)
    assert plan.head == "Linear4bit called per chunk" and plan.compute_dtype == "module's own"
    batch = masked_batch(128)
    assert_same(reference_step(model, batch), chunked_step(model, batch))


class _ShiftedLogits(LlamaForCausalLM):
    """A model that changes its logits after the head in a way no transform row knows."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2 + 1
        return output


def test_a_head_it_cannot_split_falls_back_to_the_full_loss(single_thread):
    torch.manual_seed(0)
    model = _ShiftedLogits(LlamaConfig(vocab_size=128, **_SMALL)).train()
    plan = plan_loss(model)
    assert plan.loss == "full" and "LOGIT_TRANSFORMS" in plan.reason
    batch = masked_batch(128)
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(model, batch), expected)


def test_mixture_of_experts_adds_the_router_loss(small_chunks, single_thread):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                           router_aux_loss_coef=0.5, **_SMALL)
    model = with_lora(AutoModelForCausalLM.from_config(config).train(), targets=["q_proj"])
    small_chunks(128)
    batch = masked_batch(128)
    assert_same(reference_step(model, batch), chunked_step(model, batch))


def _tensors(values) -> list[torch.Tensor]:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [v for v in values if isinstance(v, torch.Tensor)]


class _Shapes(TorchDispatchMode):
    """Records the element count of every tensor an operator allocates, forward and backward.

    Views (an output sharing an input's storage) allocate nothing and are not counted.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors([*args, *kwargs.values()])}
        for value in _tensors(out):
            if value.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, value.numel())
        return out


def test_no_tensor_of_the_full_logits_exists(single_thread):
    """Qwen2's 151,936-token vocabulary, 2 x 64 tokens: nothing the size of tokens x vocabulary."""
    model = with_lora(tiny_model("qwen2-151k"))
    plan = plan_loss(model)  # the real chunk budget: 27 positions per chunk
    batch = masked_batch(151_936, length=64)
    tokens, vocab = batch["input_ids"].numel(), 151_936
    with _Shapes() as shapes:
        causal_lm_loss(model, batch).backward()
    assert plan.chunk_tokens == loss_plan.CHUNK_LOGITS // vocab < tokens
    assert shapes.largest <= plan.chunk_tokens * vocab < tokens * vocab
    with _Shapes() as reference:  # the check itself sees the full logits where they exist
        model(**batch).loss.backward()
    assert reference.largest >= tokens * vocab


class _LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensors created inside the block (a storage counted once).

    It sees what operators return, not the scratch memory inside a kernel (logsumexp's):
    `LossPlan.chunk_bytes` allows for that too, so this is a lower bound that it must cover.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors([*args, *kwargs.values()])}
        for value in _tensors(out):
            if value.untyped_storage().data_ptr() not in inputs:  # a view or an in-place result allocates nothing
                self._track(value)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        weakref.finalize(tensor, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))


@pytest.mark.parametrize("name", ["qwen2-151k", "gemma2-softcap"])
def test_working_bytes_bound_what_the_loss_holds(name, single_thread):
    """`LossPlan.working_bytes` (the figure the memory model uses) covers the loss's own tensors."""
    model = with_lora(tiny_model(name))
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = masked_batch(vocab, length=64)
    plan = plan_loss(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with loss_call._captured_head_input(model.get_output_embeddings()) as captured:
        model(**inputs)
    hidden = captured[0].detach().requires_grad_(True)
    targets = loss_call._targets(batch["labels"], None)
    resolved = loss_plan._resolve(model, "chunked", "fused")
    with _LiveBytes() as held:
        value = loss_call._chunked_value(resolved, hidden, targets, None)
        value.backward()
    trained = int((targets != -100).sum())
    assert 0 < held.peak <= plan.working_bytes(trained)


def test_labels_outside_the_vocabulary_are_named():
    model = tiny_model("llama")
    batch = masked_batch(128)
    batch["labels"][0, 6] = 500
    with pytest.raises(LossInputError, match="token id 500, outside the model's vocabulary of 128"):
        causal_lm_loss(model, batch)


def test_a_batch_without_labels_is_refused():
    with pytest.raises(LossInputError, match="no 'labels'"):
        causal_lm_loss(tiny_model("llama"), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_unknown_choices_are_refused():
    with pytest.raises(LossInputError, match="loss must be one of chunked, full"):
        plan_loss(tiny_model("llama"), loss="fused")


def _train(trainer_class, seed_batches, grad_accum: int, tmp_path) -> dict[str, torch.Tensor]:
    from transformers import TrainingArguments

    model = with_lora(tiny_model("gemma2-softcap"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=grad_accum, max_steps=2, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             dataloader_drop_last=True, seed=0)
    rows = [{key: value[i] for key, value in batch.items()} for batch in seed_batches for i in range(2)]
    trainer = trainer_class(model=model, args=args, train_dataset=rows,
                            data_collator=lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]})
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_trainer_mixin_trains_as_the_trainer_does_with_gradient_accumulation(small_chunks, single_thread, tmp_path):
    """Two optimizer steps of plain SGD, 2 micro-batches each with different numbers of trained tokens."""
    from transformers import Trainer

    from kbitprep.loss import ChunkedLossMixin

    class ChunkedTrainer(ChunkedLossMixin, Trainer):
        pass

    small_chunks(128)
    # Batches with 19, 5 and 23 trained tokens: a per-micro-batch mean would weigh them differently.
    batches = [masked_batch(128, seed=seed) for seed in range(4)]
    batches[1]["labels"][:, :9] = -100
    reference = _train(Trainer, batches, 2, tmp_path / "reference")
    chunked = _train(ChunkedTrainer, batches, 2, tmp_path / "chunked")
    start = with_lora(tiny_model("gemma2-softcap"))
    assert any(not torch.equal(p, reference[n]) for n, p in start.named_parameters() if n in reference)  # it trained
    for name, value in chunked.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_public_names_load_lazily_and_import_kbitprep_stays_light():
    code = ("import sys, kbitprep\n"
            "assert 'kbitprep.loss' not in sys.modules\n"
            "assert kbitprep.causal_lm_loss.__module__ == 'kbitprep.loss.causal_lm' and kbitprep.ChunkedLossMixin\n"
            "heavy = {'peft', 'matplotlib', 'rich'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
