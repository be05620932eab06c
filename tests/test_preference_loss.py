"""The preference losses (DPO, ORPO) through the chunked head, against the full logits and against TRL.

TRL is the reference: its DPOTrainer's loss and its ORPOTrainer's (trl.experimental.orpo)
are computed on the same tiny model, adapter and token sequences as kbitprep's.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kbitprep.loss import LossInputError, label_log_probs, plan_loss, preference_loss
from kbitprep.loss import plan as loss_plan
from test_loss import _Shapes, masked_batch, tiny_model, with_lora

VOCAB = 128


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 positions, so every path loops."""
    monkeypatch.setattr(loss_plan, "CHUNK_LOGITS", 5 * VOCAB)
    monkeypatch.setattr(loss_plan, "AMORTIZE_TOKENS", 5)
    monkeypatch.setattr(loss_plan, "WEIGHT_PIECE", 3 * 32)


def preference_batch(pairs: int = 2, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """`pairs` chosen rows then their rejected rows: a 3-token prompt, completions of differing lengths, padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2 * pairs, length), generator=generator)
    ids[pairs:, :3] = ids[:pairs, :3]  # each pair shares its prompt
    mask = torch.ones_like(ids)
    for row in range(2 * pairs):
        mask[row, length - 1 - row % 3:] = 0  # some padding on most rows
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close_grads(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float) -> None:
    assert grads.keys() == reference.keys() and grads
    for name, grad in grads.items():
        scale = float(reference[name].abs().max())
        torch.testing.assert_close(grad, reference[name], rtol=rtol, atol=rtol * scale + 1e-9, msg=name)


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap", "gpt2-tied"])
@pytest.mark.parametrize("backward", ["fused", "recompute"])
def test_label_log_probs_equal_the_full_logits(name, backward, small_chunks, single_thread):
    """Values and gradients (of a weighted sum, as a preference loss weighs them) within 1e-5 relative."""
    model = with_lora(tiny_model(name))
    batch = masked_batch(VOCAB)
    weights = torch.randn(batch["labels"].shape, generator=torch.Generator().manual_seed(3))
    results = {}
    for loss in ("full", "chunked"):
        values = label_log_probs(model, batch, loss=loss, backward=backward)
        (values * weights).sum().backward()
        results[loss] = (values.detach(), grads_of(model))
    torch.testing.assert_close(results["chunked"][0], results["full"][0], rtol=1e-5, atol=1e-6)
    assert bool((results["full"][0][0, :3] == 0).all())  # the first row's prompt positions score nothing
    assert_close_grads(results["chunked"][1], results["full"][1], 1e-5)


def test_lora_on_the_head_gets_its_gradients_by_recomputing(small_chunks, single_thread):
    """A head whose own adapter trains needs each position's weight before the chunk is gone."""
    model = with_lora(tiny_model("llama"), targets=["q_proj", "lm_head"])
    assert "LoRA" in plan_loss(model).head
    batch = masked_batch(VOCAB)
    weights = torch.randn(batch["labels"].shape, generator=torch.Generator().manual_seed(4))
    results = {}
    for loss in ("full", "chunked"):
        (label_log_probs(model, batch, loss=loss) * weights).sum().backward()
        results[loss] = grads_of(model)
    assert any("lm_head" in name for name in results["full"])
    assert_close_grads(results["chunked"], results["full"], 1e-5)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_losses_equal_their_full_logit_computation(method, small_chunks, single_thread):
    model = with_lora(tiny_model("llama"))
    batch = preference_batch()
    results = {}
    for loss in ("full", "chunked"):
        result = preference_loss(model, batch, method, 0.1, loss=loss)
        result.loss.backward()
        results[loss] = (result.loss.detach(), result.metrics(), grads_of(model))
    torch.testing.assert_close(results["chunked"][0], results["full"][0], rtol=1e-5, atol=0)
    for key, value in results["full"][1].items():
        assert results["chunked"][1][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert_close_grads(results["chunked"][2], results["full"][2], 1e-5)


def test_dpo_is_ln2_while_the_adapter_is_the_reference(single_thread):
    """peft's default initialisation (B = 0): the policy is the reference, every reward 0, the loss ln 2."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    result = preference_loss(model, preference_batch(), "dpo", 0.1)
    assert float(result.loss) == pytest.approx(math.log(2), abs=1e-7)
    assert result.metrics() == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                                "rewards/accuracies": 0.0}


def test_no_tensor_of_the_full_logits_exists_in_a_dpo_step(single_thread):
    """Qwen2's 151,936-token vocabulary: the policy, the reference and the backward stay within a chunk."""
    model = with_lora(tiny_model("qwen2-151k"))
    plan = plan_loss(model)
    batch = masked_batch(151_936, length=40)
    batch = {key: torch.cat([value, value.flip(0)]) for key, value in batch.items()}  # 2 pairs
    with _Shapes() as shapes:
        preference_loss(model, batch, "dpo", 0.1).loss.backward()
    tokens = batch["input_ids"].numel()
    assert shapes.largest <= plan.chunk_tokens * 151_936 < tokens * 151_936


def test_a_model_without_an_adapter_has_no_dpo_reference():
    with pytest.raises(LossInputError, match="no peft adapter"):
        preference_loss(tiny_model("llama"), preference_batch(), "dpo", 0.1)


def test_a_batch_that_is_not_pairs_is_refused():
    batch = {key: value[:3] for key, value in preference_batch().items()}
    with pytest.raises(LossInputError, match="PreferenceCollator"):
        preference_loss(with_lora(tiny_model("llama")), batch, "dpo", 0.1)


# --- TRL as the reference --------------------------------------------------------------------------------------


def _char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(97 + i): 4 + i for i in range(26)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _trained_adapter_model() -> torch.nn.Module:
    """A tiny Llama with a LoRA whose B is not zero (else every DPO loss is ln 2), dropout off."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_model("llama").config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))
    return model.eval()


def _pairs_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["abc", "hello"], "chosen": ["defg", "world"],
                              "rejected": ["xy", "there"]})


def test_dpo_equals_trl_dpo_trainer(tmp_path, single_thread):
    """TRL's DPOTrainer._compute_loss on the same sequences, adapter and beta: the loss and the rewards."""
    from trl import DPOConfig, DPOTrainer

    model = _trained_adapter_model()
    batch = preference_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=DPOConfig(str(tmp_path), beta=0.25, report_to="none", use_cpu=True),
                             train_dataset=_pairs_dataset(), processing_class=_char_tokenizer())
        # TRL keeps a trained adapter's starting copy ("ref") as the reference; kbitprep's reference is the
        # base (a run's adapter starts at B = 0, where the two are the same): without the copy, TRL's is too.
        assert "ref" in model.peft_config
        model.delete_adapter("ref")
        completion = (batch["labels"] != -100).long()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": completion}
        with torch.no_grad():
            expected = trainer._compute_loss(model, inputs, return_outputs=False)
    ours = preference_loss(model, batch, "dpo", 0.25)
    assert float(ours.loss) == pytest.approx(float(expected), rel=1e-4)
    assert abs(float(ours.loss) - math.log(2)) > 1e-3  # a real comparison, not two ln 2
    logged = {key: sum(values) / len(values) for key, values in trainer._metrics["eval"].items()}  # eval: dropout off
    for key, value in ours.metrics().items():
        assert value == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key


def test_orpo_equals_trl_orpo_trainer(tmp_path, single_thread):
    """TRL's ORPOTrainer.get_batch_loss_metrics on the same sequences, adapter and lambda."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _trained_adapter_model()
    batch = preference_batch()
    half = batch["input_ids"].shape[0] // 2
    sides = {"chosen": slice(0, half), "rejected": slice(half, None)}
    trl_batch = {f"{side}_{key}": batch[name][rows] for side, rows in sides.items()
                 for key, name in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                                   ("labels", "labels"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=ORPOConfig(str(tmp_path), beta=0.3, report_to="none", use_cpu=True),
                              train_dataset=_pairs_dataset(), processing_class=_char_tokenizer())
        with torch.no_grad():
            expected, metrics = trainer.get_batch_loss_metrics(model, trl_batch)
    ours = preference_loss(model, batch, "orpo", 0.3)
    assert float(ours.loss) == pytest.approx(float(expected), rel=1e-4)
    for key, value in ours.metrics().items():
        assert value == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
