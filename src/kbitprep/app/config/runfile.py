"""A run file: every `kbitprep finetune` setting in one YAML file (`--config run.yaml`), read by the settings table.

    # run.yaml                                    kbitprep finetune --config run.yaml
    model: models/tiny                            kbitprep finetune --config run.yaml --lr 1e-3
    data: train.parquet                           kbitprep finetune --config runs/x/run.yaml --output runs/y
    output: runs/tiny
    lr_scheduler: cosine
    warmup_ratio: 0.05

The keys are the settings' names (`lora_r`, or its flag's spelling `lora-r`; `samples` is
also `sample`); every key, type, range and choice is checked against the declaration in
`kbitprep.app.config.settings`, the one the command line is built from, and a problem is
named with the file and the line (`run.yaml:4: unknown key "lora_rank"; did you mean
"lora_r"?`). Relative paths in the file are relative to the file's folder, so a run file
works from anywhere. On the command line, an option overrides the file's key (and the
file's keys that the option excludes: `--epochs 2` drops the file's `max_steps`).

Every run writes its resolved settings into its run folder as `run.yaml` (absolute paths;
without `resume` and `overwrite`, which are about a folder, not a run), so
`kbitprep finetune --config runs/x/run.yaml --output runs/y` repeats it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..runs.folder import atomic_write_bytes
from .settings import SETTINGS, FinetuneError, FinetuneSettings, Setting

__all__ = ["NOT_WRITTEN", "RunFileError", "read_run_file", "run_file_text", "settings_from", "write_run_file"]

# Settings that say what to do with the run folder rather than what the run is.
NOT_WRITTEN = ("resume", "overwrite")
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text", tuple: "a list of text"}


class RunFileError(FinetuneError):
    """A --config file cannot be used: unreadable, not YAML, an unknown key or a value of the wrong type or range."""


def _keys() -> dict[str, Setting]:
    """Every spelling of each setting's key: its name, and its flag without the dashes."""
    keys: dict[str, Setting] = {}
    for s in SETTINGS:
        keys[s.name] = s
        if s.option.cli and not s.option.positional:
            flag = s.flag.lstrip("-")
            keys.setdefault(flag, s)
            keys.setdefault(flag.replace("-", "_"), s)
    return keys


def _expected(s: Setting) -> str:
    expected = s.option.bound.expected if s.option.bound is not None and s.kind in (int, float) else _KINDS[s.kind]
    if s.option.choices is not None:
        expected = "one of " + ", ".join(s.option.choices)
    return expected + (" or null" if s.default is None else "")


_NOT_OF_THE_TYPE = object()  # what `_typed` returns for a value of another type


def _typed(s: Setting, value: Any) -> Any:
    """`value` as the setting's type, or `_NOT_OF_THE_TYPE` when YAML gave another type."""
    if value is None and s.default is None:
        return None
    kind = s.kind
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `2e-4` as text: it wants `2.0e-4`. Nobody means the text.
        try:
            return float(value)
        except ValueError:
            return _NOT_OF_THE_TYPE
    if kind is str and isinstance(value, str):
        return value
    if kind is tuple:
        if isinstance(value, str):  # one text: a comma list of module names, or the one sample prompt
            return (value,) if s.option.repeatable else tuple(part.strip() for part in value.split(","))
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
    return _NOT_OF_THE_TYPE


def _describe(value: Any) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list",
             dict: "a mapping", type(None): "null"}
    return f"{value!r} ({names.get(type(value), type(value).__name__)})"


def read_run_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings a run file gives, checked, by setting name; paths made absolute against the file's folder.

    Args:
        path (str | PathLike): the YAML file.

    Returns:
        dict[str, Any]: setting name -> value, for the keys the file has.

    Raises:
        RunFileError: the file is missing or unreadable, is not YAML or not a mapping, or a
            key is unknown or repeated, or a value has the wrong type or is out of range;
            the message names the file and the line.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such --config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"{path}: --config cannot be read ({getattr(error, 'strerror', None) or error})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes keep their line numbers
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or error
        raise RunFileError(f"{where}: not valid YAML ({problem}); write one `key: value` per line") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise RunFileError(f"{path}:{root.start_mark.line + 1}: a run file is a mapping of setting names to values "
                           "(`lr: 0.0002`, one per line), not a list or a single value")
    keys = _keys()
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    constructor = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        where = f"{path}:{line}"
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in keys:
            close = difflib.get_close_matches(str(key), [s.name for s in SETTINGS], n=1)
            hint = f"; did you mean \"{close[0]}\"?" if close else ""
            raise RunFileError(f"{where}: unknown key \"{key}\"{hint} (the keys are the names of kbitprep finetune's "
                               "settings, listed in docs/cli.md)")
        declared = keys[key]
        if declared.name in lines:
            raise RunFileError(f"{where}: \"{key}\" is given twice (also on line {lines[declared.name]}); keep one")
        raw = constructor.construct_object(value_node, deep=True)
        value = _typed(declared, raw)
        if value is _NOT_OF_THE_TYPE:
            raise RunFileError(f"{where}: {key} must be {_expected(declared)}, not {_describe(raw)}")
        problem = declared.value_problem(value, name=key)
        if problem:
            raise RunFileError(f"{where}: {problem}")
        if declared.option.path and value is not None:
            value = str(path.parent.absolute() / os.path.expanduser(value))  # relative to the file, not the shell
        values[declared.name], lines[declared.name] = value, line
    return values


def settings_from(given: Mapping[str, Any], run_file: str | os.PathLike[str] | None) -> FinetuneSettings:
    """The settings of a command: the declared defaults, then the run file's keys, then the options given.

    Args:
        given (Mapping[str, Any]): the settings given on the command line, by name.
        run_file (str | PathLike | None): the `--config` file, if any.

    Raises:
        RunFileError: see `read_run_file`; or MODEL, DATA or --output given by neither.
    """
    values = read_run_file(run_file) if run_file is not None else {}
    for name in given:  # an option overrides the file's keys that it excludes, not only its own
        exclusive = next(s.option.exclusive for s in SETTINGS if s.name == name)
        for s in SETTINGS:
            if exclusive is not None and s.option.exclusive == exclusive and s.name not in given:
                values.pop(s.name, None)
    values.update(given)
    missing = [s for s in SETTINGS if s.required and s.name not in values]
    if missing:
        flags = ", ".join(s.flag for s in missing)
        keys = ", ".join(f"{s.name}:" for s in missing)
        if run_file is not None:
            raise RunFileError(f"{flags} missing: {run_file} gives no {keys}; add it there or give it on the "
                               "command line")
        them = "it" if len(missing) == 1 else "them"
        raise RunFileError(f"{flags} missing: give {them} on the command line, or as {keys} in a --config FILE")
    return FinetuneSettings(**values)


def run_file_text(settings: FinetuneSettings, config: Mapping[str, Any] | None = None) -> str:
    """A run file of `settings` (resolved first, against `config` when the model's config.json is
    already read): every setting but `NOT_WRITTEN`, in declaration order."""
    import yaml

    resolved = settings.resolved(config)
    values = {s.name: list(value) if isinstance(value := getattr(resolved, s.name), tuple) else value
              for s in SETTINGS if s.name not in NOT_WRITTEN}
    header = ("# The settings of this kbitprep finetune run. Repeat it with\n"
              "#   kbitprep finetune --config run.yaml --output NEW_FOLDER\n"
              "# (options given on the command line override these keys).\n")
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=False)


def write_run_file(path: str | os.PathLike[str], settings: FinetuneSettings,
                   config: Mapping[str, Any] | None = None) -> None:
    """Write `run_file_text(settings, config)` to `path` atomically (a run folder's run.yaml)."""
    atomic_write_bytes(path, run_file_text(settings, config).encode("utf-8"))
