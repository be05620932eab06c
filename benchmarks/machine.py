"""The machine and software a benchmark ran on, for the report's header."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["PACKAGES", "Machine", "describe_machine"]

PACKAGES = ("kbitprep", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors")


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where and with what a run happened.

    Args:
        cpu (str): CPU model name.
        cores (int): logical CPUs this process may use.
        ram_bytes (int | None): total RAM.
        platform (str): OS and architecture.
        python (str): Python version.
        packages (dict[str, str]): installed version of each of `PACKAGES`.
        commit (str | None): git commit of the working tree ("+dirty" when it has changes).
        load_average (tuple[float, float, float] | None): 1/5/15-minute load at the start.
        torch_threads (int): intra-op threads torch uses.
    """

    cpu: str
    cores: int
    ram_bytes: int | None
    platform: str
    python: str
    packages: dict[str, str]
    commit: str | None
    load_average: tuple[float, float, float] | None
    torch_threads: int


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit(repo: Path) -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe_machine(repo: Path) -> Machine:
    """Read the CPU, RAM, versions and current load of this machine."""
    import torch

    memory = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(
        cpu=_proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        cores=cores,
        ram_bytes=int(memory.split()[0]) * 1024 if memory else None,
        platform=platform.platform(),
        python=platform.python_version(),
        packages={package: _version(package) for package in PACKAGES},
        commit=_commit(repo),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        torch_threads=torch.get_num_threads(),
    )
