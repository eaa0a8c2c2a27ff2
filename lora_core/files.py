"""The adapter directory on disk: reading and writing its two files, with no model involved.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` (PEFT's config) and
``adapter_model.safetensors`` (tensors keyed ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight``, plus ``base_model.model.<path>.<param>`` for ``modules_to_save``). lora_core adds
one safetensors metadata entry, ``lora_core``: JSON with its own config and the per-role layout of
fused q/k/v layers (output rows as ``[start, end)`` runs).

Writes are atomic (no reader ever sees a half-written adapter); reads accept safetensors only, never
a pickled ``adapter_model.bin``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core.errors import LoraError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
META_KEY = "lora_core"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterFiles:
    """What an adapter directory holds, as read by :func:`read_adapter_files`.

    Attributes:
        path: the directory.
        config: ``adapter_config.json`` as a dict (PEFT's fields: ``r``, ``lora_alpha``, ``target_modules``...).
        tensors: every tensor of ``adapter_model.safetensors`` by its key (``base_model.model.<path>.lora_A.weight``...),
            on the CPU, in the dtype stored.
        metadata: the safetensors header's metadata (strings); lora_core's entry is under ``"lora_core"``.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def lora_core_meta(self) -> dict[str, Any] | None:
        """lora_core's metadata entry (``version``, ``config``, ``fused``, ``paths``); None for a PEFT-written file.

        ``fused`` maps a fused layer's path to ``{"r": per-role rank, "roles": {role: [[start, end], ...]}}``:
        its A holds one ``(r, in)`` block per role in that order, and ``rows_from_runs`` decodes the rows.

        Raises:
            LoraError: the entry is not a JSON object (the file was edited or truncated).
        """
        if META_KEY not in self.metadata:
            return None
        try:
            meta = json.loads(self.metadata[META_KEY])
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("fused", {}), dict):
            raise LoraError(f"{self.path / WEIGHTS_NAME} has unreadable lora_core metadata",
                            hint="the file was edited or truncated; save the adapter again")
        return meta


def read_adapter_files(path: str | os.PathLike[str]) -> AdapterFiles:
    """Read a PEFT adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Needs no model and checks only that both files exist and parse; what the keys mean for a model is
    :func:`lora_core.load_adapter`'s business.

    Raises:
        LoraError: the directory or a file is missing, only a pickled ``adapter_model.bin`` is there
            (never unpickled), the config is not a JSON object, or the safetensors file is unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoraError(f"adapter directory {path} does not exist", hint="pass the directory that holds adapter_config.json")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights_file.exists():
        if (path / "adapter_model.bin").exists():
            raise LoraError(f"{path} holds a pickled adapter_model.bin; lora_core reads only safetensors",
                            hint="re-save it with PEFT's save_pretrained(safe_serialization=True)")
        raise LoraError(f"{weights_file} is missing", hint="an adapter directory holds adapter_model.safetensors")
    if not cfg_file.exists():
        raise LoraError(f"{cfg_file} is missing", hint="an adapter directory holds adapter_config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise LoraError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{cfg_file} holds a JSON {type(config).__name__}, not an object")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata: dict[str, str] = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types
        raise LoraError(f"cannot read {weights_file}: {exc}") from None
    return AdapterFiles(path, config, tensors, metadata)


def write_adapter_files(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                        config: dict[str, Any]) -> None:
    """Write both files so that no reader ever sees a half-written adapter.

    A new directory is built beside its destination and renamed into place in one step. Into an
    existing directory each file is replaced atomically, weights first.
    """
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata=metadata)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            staging.chmod(0o777 & ~current_umask())
            for f in staging.iterdir():
                f.chmod(0o666 & ~current_umask())
            os.rename(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    atomic_write(out / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Replace ``target`` in one step: ``write(tmp)`` fills a temporary file beside it, which is renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; an adapter is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def rows_to_runs(idx: torch.Tensor) -> list[list[int]]:
    """Sorted row indices as ``[start, end)`` runs (compact for contiguous and per-head layouts)."""
    values: list[int] = idx.tolist()
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][1] = v + 1
        else:
            runs.append([v, v + 1])
    return runs


def rows_from_runs(runs: list[list[int]]) -> torch.Tensor:
    """The inverse of :func:`rows_to_runs`: a LongTensor of row indices."""
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)
