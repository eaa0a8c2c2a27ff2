"""One rule for the credentials in a URL: they never leave the process that was given them, except to the
server they are for.

- :func:`mask_url` / :func:`mask_text`: what is printed, logged, relayed or put in a report: every
  ``scheme://user:PASSWORD@host`` (whatever the password holds: ``/``, ``@``, ``:``; an empty user) and every
  ``password=...`` (a query parameter as SQLAlchemy accepts it, or a libpq ``key=value`` string) shows
  ``***`` instead of the secret.
- :func:`strip_credentials`: what is stored (the study's config, MLflow artifacts, the spool): the URL
  without its password; a database URL keeps its user name (a libpq passfile or ``PGPASSWORD`` finds the
  password by it), an ``http(s)`` tracking URI loses its whole user info (MLflow then sends
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
- The ways to hand a process its URLs off the command line: :data:`STORAGE_ENV` (``LORA_SWEEP_STORAGE``,
  read as ``--storage``), :data:`STORAGE_FILE_ENV` (``LORA_SWEEP_STORAGE_FILE``: a file holding the URL),
  and MLflow's ``MLFLOW_TRACKING_URI``, which gives a stored (credential-free) tracking URI its
  credentials back when it names the same server (:func:`with_env_credentials`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["STORAGE_ENV", "STORAGE_FILE_ENV", "TRACKING_ENV", "has_credentials", "mask_log_records", "mask_text",
           "mask_tracebacks", "mask_url", "private_file", "storage_from_env", "strip_credentials",
           "with_env_credentials"]

STORAGE_ENV = "LORA_SWEEP_STORAGE"
STORAGE_FILE_ENV = "LORA_SWEEP_STORAGE_FILE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
MASK = "***"

# scheme://<userinfo>@...: the user info runs to the last '@' of the URL's token (a password may hold
# '@', '/', ':' unencoded: SQLAlchemy and requests read such URLs differently, so all of it is masked).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>`]+)")
_PASSWORD_PARAM = re.compile(r"(?i)(?P<key>\b(?:password|passwd|pwd|sslpassword)=)(?P<value>'[^']*'|[^\s&#;'\"]*)")
_HTTP = ("http://", "https://")


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """(user info or None, the rest after it) of what follows ``scheme://``."""
    at = rest.rfind("@")
    if at < 0:
        return None, rest
    return rest[:at], rest[at + 1:]


def mask_url(url: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://user:***@host/...``, ``?password=x`` -> ``?password=***``;
    any other text unchanged (also a text holding several URLs)."""
    return mask_text(url)


def mask_text(text: str) -> str:
    """Every URL password and ``password=`` value in ``text`` replaced by ``***``."""
    if not text:
        return text

    def one(match: re.Match[str]) -> str:
        info, rest = _split_userinfo(match["rest"])
        if info is None or ":" not in info:
            return match[0]
        user = info.split(":", 1)[0]
        return f"{match['scheme']}{user}:{MASK}@{rest}"

    text = _URL.sub(one, text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def has_credentials(url: str | None) -> bool:
    """Whether ``url`` carries a password (user info or a ``password=`` parameter)."""
    return bool(url) and mask_text(url) != url  # type: ignore[arg-type]


def strip_credentials(url: str | None) -> str | None:
    """``url`` as it may be stored: no password (see the module docstring); None and plain paths as they are."""
    if not url or "://" not in url:
        return url
    match = _URL.match(url)
    if match is None:
        return url
    scheme, rest = match["scheme"], url[len(match["scheme"]):]
    info, after = _split_userinfo(rest)
    if info is not None:
        if scheme.lower() in _HTTP:
            rest = after
        elif ":" in info:
            user = info.split(":", 1)[0]
            rest = f"{user}@{after}" if user else after
    base, sep, query = rest.partition("?")
    if sep:
        kept = [p for p in re.split(r"[&;]", query) if p and not _PASSWORD_PARAM.match(p)]
        rest = base + ("?" + "&".join(kept) if kept else "")
    return scheme + rest


def with_env_credentials(uri: str | None) -> str | None:
    """A tracking URI with its credentials back: ``MLFLOW_TRACKING_URI`` when it names the same server as
    ``uri`` (once both are stripped), else ``uri`` as it is (MLflow itself still reads
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``)."""
    env = os.environ.get(TRACKING_ENV, "").strip()
    if not uri or not env or env == uri:
        return uri
    return env if strip_credentials(env) == strip_credentials(uri) else uri


def storage_from_env() -> str | None:
    """The storage URL handed over off the command line: ``LORA_SWEEP_STORAGE``, else the first line of the
    file ``LORA_SWEEP_STORAGE_FILE`` names; None when neither is set.

    Raises:
        OSError: the file cannot be read (the caller words it).
    """
    value = os.environ.get(STORAGE_ENV, "").strip()
    if value:
        return value
    path = os.environ.get(STORAGE_FILE_ENV, "").strip()
    if not path:
        return None
    lines = Path(path).expanduser().read_text(encoding="utf-8").strip().splitlines()
    return lines[0].strip() if lines and lines[0].strip() else None


def private_file(path: Path) -> Path:
    """Create ``path`` (empty) readable and writable by its owner only (0600) if it does not exist, and take
    group and other access away from one this user owns: a study journal or an MLflow spool holds a sweep's
    config and run data, which are nobody else's business on a shared machine."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, os.fstat(fd).st_mode & 0o700)
    finally:
        os.close(fd)
    return path


def mask_log_records() -> None:
    """Make every log record of this process (any library's) carry its message with passwords masked: the
    record factory formats the message once and masks it. Idempotent; for a command line's process."""
    import logging

    factory = logging.getLogRecordFactory()
    if getattr(factory, "masks_secrets", False):
        return

    def masked(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it as usual when it is handled
            return record
        masked_message = mask_text(message)
        if masked_message != message:
            record.msg, record.args = masked_message, None
        return record

    masked.masks_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked)


def mask_tracebacks() -> None:
    """An exception that ends this process prints its traceback with passwords masked (its message, or a
    frame's source line, may quote a URL). Idempotent; for a command line's process."""
    import sys
    import traceback
    from types import TracebackType

    if getattr(sys.excepthook, "masks_secrets", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(kind, exc, tb))
        sys.stderr.write(mask_text(text))

    hook.masks_secrets = True  # type: ignore[attr-defined]
    sys.excepthook = hook
