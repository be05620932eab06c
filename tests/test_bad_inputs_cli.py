"""Bad inputs to the command line: a non-zero exit, one line naming the problem, nothing half-written.

Each case runs `kbitprep` as a user would, in a subprocess, and is one row of the CLI
table in docs/bad-inputs.md. What every case must show:

- a non-zero exit status and no Python traceback;
- exactly one line saying "error", naming the problem (and the file and line where there
  is one) and what to do;
- no half-written output: an output folder that did not exist still does not, and one that
  held a finished run holds exactly what it held before.

The runs are started a few at a time (they spend most of their time importing torch) and
each test reads its own result.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from conftest import save_tiny_model, tiny_llama_config

CLI_TIMEOUT_S = 240
PARALLEL_RUNS = 4  # the runs mostly import torch; a few at a time keeps memory and CPUs in bounds


def kbitprep_command() -> list[str]:
    script = pathlib.Path(sys.executable).with_name("kbitprep")
    found = str(script) if script.exists() else shutil.which("kbitprep")
    assert found, "the kbitprep command is not installed (pip install -e .)"
    return [found]


# ---------------------------------------------------------------------------------------------
# A workspace of good and bad inputs, made once


def write_lines(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


GOOD_ROWS = [{"text": f"abc {i} def"} for i in range(6)]


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: pathlib.Path
    model: pathlib.Path  # config, weights, tokenizer
    data: pathlib.Path  # good rows

    def __truediv__(self, name: str) -> pathlib.Path:
        return self.root / name


def make_workspace(root: pathlib.Path) -> Workspace:
    model = save_tiny_model(root / "model", tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=0),
                            tokenizer=True)
    space = Workspace(root, model, write_lines(root / "good.jsonl", GOOD_ROWS))

    (root / "no-config").mkdir()
    shutil.copy(model / "model.safetensors", root / "no-config" / "model.safetensors")
    (root / "config-only").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, root / "config-only" / name)
    shutil.copytree(model, root / "truncated")
    weights = (model / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a download cut short

    bad = [json.dumps(row) for row in GOOD_ROWS]
    bad.insert(3, '{"text": "a quote never closed}')
    (root / "bad-line.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")  # bad line 4 of 7
    (root / "empty.jsonl").write_bytes(b"")
    latin1 = [json.dumps(row).encode() for row in GOOD_ROWS]
    latin1.insert(1, '{"text": "caf\u00e9"}'.encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(b"\n".join(latin1) + b"\n")  # line 2 is not UTF-8
    write_lines(root / "long-prompts.jsonl", [{"prompt": "x" * 40, "completion": "yes"} for _ in range(4)])

    finished = root / "finished-run"
    (finished / "adapter").mkdir(parents=True)
    (finished / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of a finished run")
    (finished / "report.json").write_text('{"finished": true}\n', encoding="utf-8")

    unfinished = root / "unfinished-run"
    unfinished.mkdir()
    (unfinished / "INCOMPLETE").write_text('{"status": "incomplete"}\n', encoding="utf-8")
    merged = root / "merge-ready-run"  # what merge reads of a finished run, without training one
    (merged / "adapter").mkdir(parents=True)
    (merged / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}\n', encoding="utf-8")
    report = {"status": "finished", "settings": {"model": str(model), "quantize": "nf4"}}
    (merged / "report.json").write_text(json.dumps(report) + "\n", encoding="utf-8")
    chat = [{"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "def"}]}]
    write_lines(root / "chat.jsonl", chat * 4)
    write_lines(root / "mixed.jsonl", GOOD_ROWS[:2] + chat)  # a chat row on line 3
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("not a model\n", encoding="utf-8")
    make_hostile_inputs(root, model)
    make_data_and_run_files(root)
    return space


# The data formats' and run files' cases (docs/bad-inputs.md).
DATA_AND_RUN_FILES = {"qa.jsonl", "broken.parquet", "columns.csv", "typo.yaml", "wrong-type.yaml",
                      "warmup-both.yaml"}


def make_data_and_run_files(root: pathlib.Path) -> None:
    write_lines(root / "qa.jsonl", [{"question": "q", "answer": "a"}] * 2)  # keys of no format
    (root / "broken.parquet").write_bytes(b"PAR1 not really a Parquet file")
    (root / "columns.csv").write_text("a,b\n1,2\n", encoding="utf-8")  # no column a format reads
    # Paths in a run file are relative to its folder: "model" is root / "model".
    (root / "typo.yaml").write_text("model: model\nlora_rank: 4\n", encoding="utf-8")
    (root / "wrong-type.yaml").write_text("model: model\ndata: good.jsonl\nlora_r: sixteen\n", encoding="utf-8")
    (root / "warmup-both.yaml").write_text("model: model\ndata: good.jsonl\noutput: out-warmup-both\nmax_steps: 1\n"
                                           "warmup_ratio: 0.1\nwarmup_steps: 2\n", encoding="utf-8")


# The run-folder and early-refusal cases: what each holds is named beside it.
HOSTILE = {"other-shape", "missing-layers", "wrong-type", "small-vocab", "short-positions", "cyrillic.jsonl",
           "good.jsonl.gz",
           "utf16.jsonl", "absurd-layers", "demo-run", "damaged-marker", "changed-data"}


def make_hostile_inputs(root: pathlib.Path, model: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((model / "config.json").read_text())
    shutil.copytree(model, root / "other-shape")  # config.json of a wider model than the weights
    (root / "other-shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    shutil.copytree(model, root / "missing-layers")  # a shard lost: no tensor of layer 1
    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k},
              root / "missing-layers" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(model, root / "wrong-type")  # a number written as a string
    (root / "wrong-type" / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
    shutil.copytree(model, root / "small-vocab")  # the tokenizer of a model with a larger vocabulary
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**config, "vocab_size": 40})).save_pretrained(root / "small-vocab")
    shutil.copytree(model, root / "short-positions")  # GPT-2 with a table of 8 learned positions
    (root / "short-positions" / "model.safetensors").unlink()
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=config["vocab_size"])
                    ).save_pretrained(root / "short-positions")
    write_lines(root / "cyrillic.jsonl", [{"text": "привет мир"}, {"text": "добрый день"}])
    (root / "good.jsonl.gz").write_bytes(gzip.compress((root / "good.jsonl").read_bytes()))
    (root / "utf16.jsonl").write_bytes((root / "good.jsonl").read_text().encode("utf-16"))
    (root / "absurd-layers").mkdir()
    (root / "absurd-layers" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    # A finished demo run: its base model is recorded as kbitprep's own file.
    demo = root / "demo-run"
    shutil.copytree(model, demo / "base-model")
    (demo / "report.json").write_text('{"status": "finished"}\n')
    (demo / ".kbitprep-manifest.json").write_text(json.dumps(
        {"format": 1, "written": ["INCOMPLETE", "adapter", "base-model", "checkpoints", "loss.png", "report.json"]}))
    for name, marker in (("damaged-marker", '{"status": "incomplete", "sett'),
                         ("changed-data", json.dumps({"status": "incomplete", "settings": {"data_sha256": "0" * 64}}))):
        (root / name).mkdir()
        (root / name / "INCOMPLETE").write_text(marker)
        (root / name / ".kbitprep-manifest.json").write_text(json.dumps({"format": 1, "written": ["INCOMPLETE"]}))


def read_only_parent(root: pathlib.Path) -> pathlib.Path:
    """A folder no run can write into. Permission bits do not bind root, so as root use /sys."""
    if os.geteuid() == 0:
        return pathlib.Path("/sys/kbitprep-bad-inputs-test")
    locked = root / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o555)
    return locked


# ---------------------------------------------------------------------------------------------
# The cases


@dataclasses.dataclass(frozen=True)
class CliCase:
    id: str
    argv: Callable[[Workspace], list[str]]  # arguments after `kbitprep`
    says: Callable[[Workspace], tuple[str, ...]]  # fragments of the error line
    output: Callable[[Workspace], pathlib.Path | None] = lambda ws: None  # the --output folder, if any


def finetune(model: str | pathlib.Path, data: str | pathlib.Path, output: pathlib.Path, *extra: str) -> list[str]:
    return ["finetune", str(model), str(data), "--output", str(output), "--max-steps", "1", "--seq-len", "16",
            *extra]


CASES = [
    CliCase("model-folder-without-config",
            lambda ws: ["inspect", str(ws / "no-config")],
            lambda ws: (str(ws / "no-config" / "config.json"), "no such file", "needs config.json")),
    CliCase("config-without-weights",
            lambda ws: finetune(ws / "config-only", ws.data, ws / "out-config-only"),
            lambda ws: (str(ws / "config-only"), "holds no weights", "kbitprep inspect"),
            lambda ws: ws / "out-config-only"),
    CliCase("truncated-safetensors",
            lambda ws: finetune(ws / "truncated", ws.data, ws / "out-truncated"),
            lambda ws: (str(ws / "truncated" / "model.safetensors"), "damaged or truncated"),
            lambda ws: ws / "out-truncated"),
    CliCase("jsonl-bad-line-in-the-middle",
            lambda ws: finetune(ws.model, ws / "bad-line.jsonl", ws / "out-bad-line"),
            lambda ws: (f"{ws / 'bad-line.jsonl'}:4", "not valid JSON"),
            lambda ws: ws / "out-bad-line"),
    CliCase("empty-data-file",
            lambda ws: finetune(ws.model, ws / "empty.jsonl", ws / "out-empty"),
            lambda ws: (str(ws / "empty.jsonl"), "holds no rows"),
            lambda ws: ws / "out-empty"),
    CliCase("non-utf8-bytes",
            lambda ws: finetune(ws.model, ws / "latin1.jsonl", ws / "out-latin1"),
            lambda ws: (f"{ws / 'latin1.jsonl'}:2", "not UTF-8", "save the file as UTF-8"),
            lambda ws: ws / "out-latin1"),
    CliCase("rows-longer-than-seq-len",
            lambda ws: finetune(ws.model, ws / "long-prompts.jsonl", ws / "out-long"),
            lambda ws: (str(ws / "long-prompts.jsonl"), "--seq-len 16", "raise --seq-len or shorten the prompts"),
            lambda ws: ws / "out-long"),
    CliCase("output-on-read-only-path",
            lambda ws: finetune(ws.model, ws.data, read_only_parent(ws.root) / "run"),
            lambda ws: (str(read_only_parent(ws.root) / "run"), "choose another --output"),
            lambda ws: read_only_parent(ws.root) / "run"),
    CliCase("output-holds-finished-run",
            lambda ws: finetune(ws.model, ws.data, ws / "finished-run"),
            lambda ws: (str(ws / "finished-run"), "finished run", "--overwrite"),
            lambda ws: ws / "finished-run"),
    CliCase("merge-unfinished-run",
            lambda ws: ["merge", str(ws / "unfinished-run"), "--output", str(ws / "out-merge-unfinished")],
            lambda ws: (str(ws / "unfinished-run"), "unfinished run", "--resume"),
            lambda ws: ws / "out-merge-unfinished"),
    CliCase("merge-folder-of-another-tool",
            lambda ws: ["merge", str(ws / "finished-run"), "--output", str(ws / "out-merge-foreign")],
            lambda ws: (str(ws / "finished-run"), "not a kbitprep run folder", "kbitprep finetune"),
            lambda ws: ws / "out-merge-foreign"),
    CliCase("merge-output-exists",
            lambda ws: ["merge", str(ws / "merge-ready-run"), "--output", str(ws / "taken")],
            lambda ws: (str(ws / "taken"), "already exists", "another --output"),
            lambda ws: ws / "taken"),
    CliCase("chat-rows-without-a-chat-template",
            lambda ws: finetune(ws.model, ws / "chat.jsonl", ws / "out-chat"),
            lambda ws: (str(ws.model), "no chat template", "--chat-template FILE"),
            lambda ws: ws / "out-chat"),
    CliCase("chat-template-file-missing",
            lambda ws: finetune(ws.model, ws / "chat.jsonl", ws / "out-chat-file", "--chat-template",
                                str(ws / "absent.jinja")),
            lambda ws: (str(ws / "absent.jinja"), "no such --chat-template file"),
            lambda ws: ws / "out-chat-file"),
    CliCase("chat-and-text-rows-mixed",
            lambda ws: finetune(ws.model, ws / "mixed.jsonl", ws / "out-mixed"),
            lambda ws: (f"{ws / 'mixed.jsonl'}:3", '"messages" row, but line 1 is a "text" row', "Split it"),
            lambda ws: ws / "out-mixed"),
    CliCase("eval-steps-without-eval-rows",
            lambda ws: finetune(ws.model, ws.data, ws / "out-eval-steps", "--eval-steps", "5"),
            lambda ws: ("--eval-steps", "--eval-data FILE or --eval-fraction F"),
            lambda ws: ws / "out-eval-steps"),
    CliCase("eval-data-and-eval-fraction",
            lambda ws: finetune(ws.model, ws.data, ws / "out-eval-both", "--eval-data", str(ws.data),
                                "--eval-fraction", "0.2"),
            lambda ws: ("--eval-fraction", "not allowed with argument --eval-data"),
            lambda ws: ws / "out-eval-both"),
    CliCase("eval-data-of-another-kind",
            lambda ws: finetune(ws.model, ws.data, ws / "out-eval-kind", "--eval-data", str(ws / "chat.jsonl")),
            lambda ws: (f"{ws / 'chat.jsonl'}:1", '--eval-data holds "messages" rows but DATA holds "text" rows'),
            lambda ws: ws / "out-eval-kind"),
    CliCase("weights-of-another-shape",
            lambda ws: finetune(ws / "other-shape", ws.data, ws / "out-other-shape"),
            lambda ws: (str(ws / "other-shape" / "model.safetensors"), "has shape", "config.json gives it",
                        "different models"),
            lambda ws: ws / "out-other-shape"),
    CliCase("weights-missing-layers",
            lambda ws: finetune(ws / "missing-layers", ws.data, ws / "out-missing-layers"),
            lambda ws: (str(ws / "missing-layers"), "lack 9 tensor(s)", "model.layers.1.", "save or download"),
            lambda ws: ws / "out-missing-layers"),
    CliCase("config-value-of-wrong-type",
            lambda ws: finetune(ws / "wrong-type", ws.data, ws / "out-wrong-type"),
            lambda ws: (str(ws / "wrong-type" / "config.json"), "hidden_size", "fix that value"),
            lambda ws: ws / "out-wrong-type"),
    CliCase("rows-past-learned-positions",
            lambda ws: finetune(ws / "short-positions", ws.data, ws / "out-short-positions"),
            lambda ws: (str(ws.data), "longer than the model's 8 positions", "transformer.wpe", "--seq-len 8 or less"),
            lambda ws: ws / "out-short-positions"),
    CliCase("tokenizer-larger-than-vocabulary",
            lambda ws: finetune(ws / "small-vocab", ws.data, ws / "out-small-vocab"),
            lambda ws: (str(ws / "small-vocab"), "token id", "vocabulary has 40 entries", "another model"),
            lambda ws: ws / "out-small-vocab"),
    CliCase("text-all-unknown-tokens",
            lambda ws: finetune(ws.model, ws / "cyrillic.jsonl", ws / "out-cyrillic"),
            lambda ws: (str(ws / "cyrillic.jsonl"), "unknown token '<unk>'", "tokenizer covers the text"),
            lambda ws: ws / "out-cyrillic"),
    CliCase("compressed-data-file",
            lambda ws: finetune(ws.model, ws / "good.jsonl.gz", ws / "out-gz"),
            lambda ws: (str(ws / "good.jsonl.gz"), "gzip-compressed", "gunzip"),
            lambda ws: ws / "out-gz"),
    CliCase("utf16-data-file",
            lambda ws: finetune(ws.model, ws / "utf16.jsonl", ws / "out-utf16"),
            lambda ws: (str(ws / "utf16.jsonl"), "UTF-16", "save the file as UTF-8"),
            lambda ws: ws / "out-utf16"),
    CliCase("inspect-absurd-layer-count",
            lambda ws: ["inspect", str(ws / "absurd-layers")],
            lambda ws: (str(ws / "absurd-layers" / "config.json"), "num_hidden_layers", "1000000000",
                        "fix that value")),
    CliCase("overwrite-users-own-adapter",
            lambda ws: finetune(ws.model, ws.data, ws / "finished-run", "--overwrite"),
            lambda ws: (str(ws / "finished-run"), "would replace adapter, report.json", "kbitprep did not write"),
            lambda ws: ws / "finished-run"),
    CliCase("overwrite-would-delete-the-model",
            lambda ws: finetune(ws / "demo-run" / "base-model", ws.data, ws / "demo-run", "--overwrite"),
            lambda ws: (str(ws / "demo-run" / "base-model"), "which this run reads", "--overwrite would delete it"),
            lambda ws: ws / "demo-run"),
    CliCase("damaged-incomplete-marker",
            lambda ws: finetune(ws.model, ws.data, ws / "damaged-marker", "--resume"),
            lambda ws: (str(ws / "damaged-marker" / "INCOMPLETE"), "damaged", "--overwrite"),
            lambda ws: ws / "damaged-marker"),
    CliCase("resume-after-data-changed",
            lambda ws: finetune(ws.model, ws.data, ws / "changed-data", "--resume"),
            lambda ws: (str(ws / "changed-data"), "DATA's content changed", "--overwrite"),
            lambda ws: ws / "changed-data"),
    CliCase("diverging-run",
            lambda ws: finetune(ws.model, ws.data, ws / "out-diverge", "--lr", "1e30", "--max-steps", "3"),
            lambda ws: ("training diverged at step 2", "nan", "lower --lr (now 1e+30) or --lora-alpha"),
            lambda ws: ws / "out-diverge"),
    CliCase("fsdp-without-torchrun",
            lambda ws: finetune(ws.model, ws.data, ws / "out-fsdp-alone", "--fsdp"),
            lambda ws: ("--fsdp", "torchrun --nproc_per_node N -m kbitprep finetune"),
            lambda ws: ws / "out-fsdp-alone"),
    CliCase("fsdp-with-int8",
            lambda ws: finetune(ws.model, ws.data, ws / "out-fsdp-int8", "--fsdp", "--quantize", "int8"),
            lambda ws: ("--fsdp cannot shard --quantize int8", "pass --quantize nf4"),
            lambda ws: ws / "out-fsdp-int8"),
    CliCase("data-of-unknown-keys",
            lambda ws: finetune(ws.model, ws / "qa.jsonl", ws / "out-qa"),
            lambda ws: (f"{ws / 'qa.jsonl'}:1", "matches no data format (its keys: answer, question)",
                        "alpaca (instruction, output)", "prompt-completion (prompt, completion)"),
            lambda ws: ws / "out-qa"),
    CliCase("unreadable-parquet",
            lambda ws: finetune(ws.model, ws / "broken.parquet", ws / "out-parquet"),
            lambda ws: (str(ws / "broken.parquet"), "cannot be read as a Parquet file (ArrowInvalid"),
            lambda ws: ws / "out-parquet"),
    CliCase("csv-without-the-columns",
            lambda ws: finetune(ws.model, ws / "columns.csv", ws / "out-csv"),
            lambda ws: (f"{ws / 'columns.csv'}: row 1", "matches no data format (its keys: a, b)"),
            lambda ws: ws / "out-csv"),
    CliCase("data-format-contradicts-the-rows",
            lambda ws: finetune(ws.model, ws.data, ws / "out-data-format", "--data-format", "alpaca"),
            lambda ws: (f"{ws.data}:1", "--data-format alpaca needs the keys instruction, output",
                        "pass --data-format text or auto"),
            lambda ws: ws / "out-data-format"),
    CliCase("run-file-unknown-key",
            lambda ws: ["finetune", "--config", str(ws / "typo.yaml")],
            lambda ws: (f"{ws / 'typo.yaml'}:2", 'unknown key "lora_rank"', 'did you mean "lora_r"?')),
    CliCase("run-file-wrong-type",
            lambda ws: ["finetune", "--config", str(ws / "wrong-type.yaml"), "--output", str(ws / "out-wrong-yaml")],
            lambda ws: (f"{ws / 'wrong-type.yaml'}:3", "lora_r must be a whole number >= 1, not 'sixteen' (text)"),
            lambda ws: ws / "out-wrong-yaml"),
    CliCase("warmup-ratio-and-steps-in-a-run-file",
            lambda ws: ["finetune", "--config", str(ws / "warmup-both.yaml")],
            lambda ws: ("--warmup-ratio and --warmup-steps cannot be given together; pass one",),
            lambda ws: ws / "out-warmup-both"),
    CliCase("warmup-ratio-and-steps",
            lambda ws: finetune(ws.model, ws.data, ws / "out-warmup", "--warmup-ratio", "0.1", "--warmup-steps", "2"),
            lambda ws: ("--warmup-steps", "not allowed with argument --warmup-ratio"),
            lambda ws: ws / "out-warmup"),
    CliCase("unknown-quantize-value",
            lambda ws: finetune(ws.model, ws.data, ws / "out-nf5", "--quantize", "nf5"),
            lambda ws: ("--quantize", "nf5", "nf4"),
            lambda ws: ws / "out-nf5"),
]


def tree(path: pathlib.Path | None) -> dict[str, bytes] | None:
    """A folder's files and their bytes; None when it does not exist."""
    if path is None or not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@dataclasses.dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    output_before: dict[str, bytes] | None
    output_after: dict[str, bytes] | None


def run_case(case: CliCase, space: Workspace, env: dict[str, str]) -> Outcome:
    before = tree(case.output(space))
    done = subprocess.run([*kbitprep_command(), *case.argv(space)], cwd=space.root, env=env, text=True,
                          capture_output=True, timeout=CLI_TIMEOUT_S)
    return Outcome(done.returncode, done.stdout, done.stderr, before, tree(case.output(space)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("cli-bad-inputs"))


@pytest.fixture(scope="module")
def outcomes(workspace: Workspace, request: pytest.FixtureRequest) -> dict[str, Outcome]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # Only the selected cases run (`-k`), unless a test that reads them all is selected too.
    selected = {item.callspec.params["case"].id for item in request.session.items
                if isinstance(getattr(item, "callspec", None) and item.callspec.params.get("case"), CliCase)}
    if any(item.name == "test_failed_runs_leave_nothing_behind" for item in request.session.items):
        selected = {case.id for case in CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
        futures = {case.id: pool.submit(run_case, case, workspace, env) for case in CASES if case.id in selected}
        return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_cli_input_fails_cleanly(case: CliCase, workspace: Workspace, outcomes: dict[str, Outcome]) -> None:
    space = workspace
    outcome = outcomes[case.id]
    shown = f"exit {outcome.returncode}\n--- stdout\n{outcome.stdout}\n--- stderr\n{outcome.stderr}"

    assert outcome.returncode != 0, shown
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    error_lines = [line for line in outcome.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, shown
    for fragment in case.says(space):
        assert fragment in error_lines[0], f"{fragment!r} not in the error line\n{shown}"
    assert outcome.output_after == outcome.output_before, "the output folder was changed or half-written"


def test_failed_runs_leave_nothing_behind(workspace: Workspace, outcomes: dict[str, Outcome]) -> None:
    """No output folder, staging folder or temporary file from any of the failed runs."""
    made = {"model", "good.jsonl", "no-config", "config-only", "truncated", "bad-line.jsonl",
            "empty.jsonl", "latin1.jsonl", "long-prompts.jsonl", "finished-run", "locked",
            "unfinished-run", "merge-ready-run", "taken", "chat.jsonl", "mixed.jsonl", *HOSTILE,
            *DATA_AND_RUN_FILES}
    assert {entry.name for entry in workspace.root.iterdir()} <= made
