"""Where a model loads from and on what (`sweeps.models.load`): a built-in alias, a local directory or a
hub id; the device; the dtype."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import torch

from lora_core import LoraError
from sweeps.models.builtin import BUILTIN_MODELS, builtin_aliases, ensure_builtin_model

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path | str:
    """Where ``name_or_path`` loads from: a local directory (``Path``) or a hub id (``str``).

    A built-in alias is fetched and converted on first use. Nothing is downloaded from the hub.

    Raises:
        LoraError: a local path that does not exist, is not a directory, or has no ``config.json``;
            or a built-in alias whose fetch failed.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        return ensure_builtin_model(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraError(
                f"model directory {path} has no config.json",
                hint="point to a directory saved with save_pretrained (config.json + model.safetensors "
                f"+ tokenizer files), or use a built-in alias ({alias_list()})",
            )
        return path
    if path.exists():
        raise LoraError(
            f"model path {path} is a file, not a directory",
            hint="pass the directory that holds config.json and model.safetensors",
        )
    if looks_like_path(name):
        raise LoraError(
            f"model directory {name} does not exist",
            hint=f"check the path, or use a hub id (org/name) or a built-in alias ({alias_list()})",
        )
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is ``cuda`` when available, else ``cpu``; other values are checked and returned.

    Raises:
        LoraError: an unknown device string, or a CUDA device on a machine without one.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LoraError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraError(f"device {device!r} requested but CUDA is not available", hint="use auto or cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LoraError(
                f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)",
                hint="use auto or cuda:N with a smaller N",
            )
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on a CUDA device that supports it, else float32.

    Also accepts ``"float32"``, ``"bfloat16"``, ``"float16"`` and those ``torch.dtype`` values.

    Raises:
        LoraError: any other value.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype == "auto":
        return torch.bfloat16 if cuda_supports_bf16(device) else torch.float32
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise LoraError(f"unsupported dtype {dtype!r}", hint=f"use one of: {', '.join(get_args(DTypeName))}")


def alias_list() -> str:
    return ", ".join(builtin_aliases())


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def cuda_supports_bf16(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)
