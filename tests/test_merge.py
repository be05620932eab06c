"""`kbitprep merge`: the adapter folded into the dequantized base, checked against references.

- The merged folder's logits equal the run's own model (4-bit base + adapter, computed as
  training computed) within bf16 tolerance, and are much further from a merge onto the
  original 16-bit weights: the merge used the dequantized weights the adapter learned on.
- The merged weights equal peft's `merge_and_unload` onto transformers' own dequantization
  (the reference implementations), over architectures with Linear and Conv1D layers and
  over 4-bit, 8-bit and unquantized bases.
- The folder loads with `AutoModelForCausalLM.from_pretrained` in a process where peft and
  bitsandbytes cannot be imported.
- Unfinished runs, existing outputs and folders kbitprep did not write are refused before
  anything is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import Zoo, attach_lora

from kbitprep.app.export.merge import MERGE_RECORD, MergeError, dequantize_layers, merge_adapter, merge_run

# A process in which peft and bitsandbytes are not installed as far as imports and package
# metadata can tell: every finder is wrapped so that those two packages are never found.
_WITHOUT_PEFT_AND_BNB = textwrap.dedent('''
    import sys
    BLOCKED = ("peft", "bitsandbytes")

    class Hide:
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    return spec
            return None

        def find_distributions(self, *args, **kwargs):
            for finder in self.finders:
                for dist in getattr(finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
                    if (dist.metadata["Name"] or "").lower() not in BLOCKED:
                        yield dist

        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Hide(list(sys.meta_path))]
''')

_LOAD_AND_RUN = textwrap.dedent('''
    import importlib.util, json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for name in BLOCKED:
        try:
            __import__(name)
            raise SystemExit(name + " was importable")
        except ImportError:
            pass
    assert importlib.util.find_spec("peft") is None
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"logits": logits.tolist(), "dtype": str(model.dtype), "loaded": loaded,
                      "vocab": len(tokenizer)}))
''')


def _quiet_peft():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
    return context


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short demo run: 4-bit NF4 base (bfloat16), an adapter trained enough to matter."""
    from kbitprep.app.demo import run_demo

    run = tmp_path_factory.mktemp("merge") / "run"
    run_demo(run, max_steps=12)
    return run


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _run_model_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    """What the run's model computes: the base loaded and prepared as training did it, plus the adapter."""
    from peft import PeftModel

    from kbitprep import prepare_model_for_kbit_training
    from kbitprep.app.training.run import read_report
    from kbitprep.app.model.loading import load_quantized_model

    settings = read_report(run)["settings"]
    base = prepare_model_for_kbit_training(load_quantized_model(settings["model"], settings["quantize"]),
                                           upcast=settings["upcast"])
    context = _quiet_peft()
    try:
        return _logits(PeftModel.from_pretrained(base, run / "adapter"), ids)
    finally:
        context.__exit__(None, None, None)


def test_merged_model_computes_what_the_run_trained_not_a_merge_onto_the_original_weights(
        finished_run: Path, batch: torch.Tensor, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = _run_model_logits(finished_run, batch)
    report = merge_run(finished_run, tmp_path / "merged-fp32", dtype="fp32")
    assert (report.dequantized, report.merged, report.quantize, report.dtype) == (14, 14, "nf4", "float32")
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged-fp32"), batch)

    original = AutoModelForCausalLM.from_pretrained(finished_run / "base-model", dtype=torch.float32)
    context = _quiet_peft()
    try:
        naive = _logits(PeftModel.from_pretrained(original, finished_run / "adapter").merge_and_unload(), batch)
    finally:
        context.__exit__(None, None, None)

    ours, theirs = (merged - reference).abs().max().item(), (naive - reference).abs().max().item()
    # The run computes its 4-bit layers in bfloat16: agreement to bf16 precision, not better.
    assert ours <= 0.02 * reference.abs().max().item(), (ours, theirs)
    # A merge onto the 16-bit weights misses the quantization error the adapter trained on.
    assert theirs >= 10 * ours and theirs >= 0.2, (ours, theirs)


def test_merged_folder_loads_without_peft_or_bitsandbytes(finished_run: Path, batch: torch.Tensor,
                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    report = merge_run(finished_run, output)  # the base model's own dtype
    assert report.dtype == "bfloat16"
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", MERGE_RECORD} <= names
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((output / MERGE_RECORD).read_text())["merged"] == 14

    script = tmp_path / "load.py"
    script.write_text(_WITHOUT_PEFT_AND_BNB + _LOAD_AND_RUN)
    done = subprocess.run([sys.executable, str(script), str(output), json.dumps(batch.tolist())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["dtype"] == "torch.bfloat16" and result["vocab"] > 26
    here = _logits(AutoModelForCausalLM.from_pretrained(output), batch)
    assert torch.equal(torch.tensor(result["logits"]), here)


@pytest.mark.parametrize(("arch", "mode"), [("llama", "nf4-dq"), ("gpt2", "nf4-dq"), ("opt", "int8"),
                                            ("gpt2", "fp32"), ("qwen2", "fp4")])
def test_merge_equals_peft_merge_onto_transformers_dequantization(
        zoo: Zoo, arch: str, mode: str, tmp_path: Path, single_thread: None) -> None:
    """The reference: transformers' `dequantize()` and peft's `merge_and_unload`, both independent of ours."""
    from peft import PeftModel

    context = _quiet_peft()
    try:
        attach_lora(zoo.load(arch, mode)).save_pretrained(tmp_path / "adapter")
        ours = zoo.load(arch, mode)
        replaced = dequantize_layers(ours)
        updated = merge_adapter(ours, tmp_path / "adapter", torch.float32)
        reference = zoo.load(arch, mode)
        if mode in ("nf4-dq", "fp4", "int8"):
            reference.dequantize(dtype=torch.float32)
        reference = PeftModel.from_pretrained(reference.float(), tmp_path / "adapter").merge_and_unload()
    finally:
        context.__exit__(None, None, None)

    assert (replaced > 0) == (mode != "fp32") and updated > 0
    assert "quantization_config" not in ours.config.to_dict()
    expected = reference.state_dict()
    actual = ours.float().state_dict()
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_merge_is_scale_times_b_at_a_on_the_dequantized_weight(finished_run: Path) -> None:
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from kbitprep.app.model.loading import load_quantized_model

    base = load_quantized_model(finished_run / "base-model", "nf4")
    layer = base.model.layers[1].mlp.down_proj
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    tensors = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    scale = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())["lora_alpha"] / a.shape[0]
    assert b.abs().max() > 0  # the adapter was trained

    dequantize_layers(base)
    merge_adapter(base, finished_run / "adapter", torch.float32)
    torch.testing.assert_close(base.model.layers[1].mlp.down_proj.weight, dequantized + scale * b @ a)


# --- refusals -----------------------------------------------------------------------------------


def _unfinished(root: Path) -> Path:
    run = root / "unfinished"
    run.mkdir()
    (run / "INCOMPLETE").write_text("{}")
    return run


def _foreign(root: Path) -> Path:
    run = root / "foreign"
    run.mkdir()
    (run / "report.json").write_text('{"accuracy": 0.9}')
    return run


def _bare_adapter(root: Path) -> Path:
    run = root / "bare-adapter"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    return run


@pytest.mark.parametrize(("make", "fragments"), [
    (_unfinished, ("unfinished run", "--resume")),
    (_foreign, ("not a kbitprep run folder", "finished `kbitprep finetune` run")),
    (_bare_adapter, ("not a kbitprep run folder", "bare adapter")),
    (lambda root: root / "missing", ("no such run folder",)),
], ids=["unfinished-run", "foreign-report", "bare-adapter", "missing-run"])
def test_merge_refuses_what_is_not_a_finished_run(make, fragments, tmp_path: Path) -> None:
    run = make(tmp_path)
    with pytest.raises(MergeError) as caught:
        merge_run(run, tmp_path / "out")
    assert all(fragment in str(caught.value) for fragment in fragments), caught.value
    assert not (tmp_path / "out").exists()


def test_merge_refuses_an_existing_output_and_leaves_it_alone(finished_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "taken"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    with pytest.raises(MergeError, match="already exists"):
        merge_run(finished_run, output)
    assert [p.name for p in output.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind


def test_merge_command_writes_the_chosen_dtype(finished_run: Path, tmp_path: Path, capsys) -> None:
    from kbitprep.cli import main

    assert main(["merge", str(finished_run), "--output", str(tmp_path / "fp16"), "--dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    out = capsys.readouterr().out
    assert "merged 14 adapted layer(s)" in out and str(tmp_path / "fp16") in out


def test_the_merged_tokenizer_carries_the_runs_chat_template(tmp_path: Path) -> None:
    from kbitprep.app.demo import build_tiny_model
    from kbitprep.app.export.merge import read_finished_run, run_tokenizer

    model = build_tiny_model(tmp_path / "model")
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    settings = {"model": str(model), "quantize": "nf4", "chat_template": str(template)}
    (run / "report.json").write_text(json.dumps({"status": "finished", "settings": settings}))
    assert run_tokenizer(read_finished_run(run)).chat_template == template.read_text()
    template.unlink()
    with pytest.raises(MergeError, match="chat.jinja: the run's --chat-template cannot be read"):
        run_tokenizer(read_finished_run(run))
