"""The MLflow store: which one a config names, a client bound to it, its experiment, and quiet calls.

The store is ``TrackingConfig.uri`` when set (any MLflow URI, e.g. ``http://127.0.0.1:5000``), else
``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/artifacts``. Every call goes through an
``MlflowClient`` built for that URI: MLflow's global tracking URI is never read or set, so two stores
in one process never mix.

What is logged to the store is :mod:`sweeps.tracking.trial_run`; reading runs and adapters back is
:mod:`sweeps.tracking.artifacts`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lora_core import LoraError
from sweeps.config.trial import TrackingConfig
from sweeps.secrets import has_credentials, with_env_credentials
from sweeps.text import first_line, mask_url

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "artifact_location",
    "client_for",
    "close_client",
    "ensure_experiment",
    "env_vars",
    "existing_store_uri",
    "experiment_name",
    "home_dir",
    "is_http",
    "is_local_store",
    "keep_url_quiet",
    "missing_store",
    "quiet_mlflow",
    "short_http_retries",
    "shown_uri",
    "sweep_client",
    "tracking_uri",
]

DEFAULT_EXPERIMENT = "lora-sweep"
# MLflow 3's experiment kind (the tag its UI's kind selector writes): a model-training ("Machine learning")
# experiment, not a GenAI one. MLflow 3.17's UI picks its views from its GenAI / Model training switch
# (``?workflowType=machine_learning``, see sweeps.cli.ui) rather than this tag, which earlier 3.x UIs read.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_NOISY_LOGGERS = ("mlflow", "alembic")


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Silence MLflow's (and alembic's) INFO chatter and warnings for the duration of one call."""
    saved: list[tuple[logging.Logger, int]] = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def env_vars(values: Mapping[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for a block (MLflow reads some at call time), then restore them.
    ``override=False`` leaves the ones the user already set."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if override:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def keep_url_quiet(uri: str) -> None:
    """MLflow prints "View run ... at: <the tracking URI>" when a run ends: not when that URI holds a password."""
    if has_credentials(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def short_http_retries() -> contextlib.AbstractContextManager[None]:
    """A tracking server that is down answers in seconds, not minutes (unless the user set these)."""
    return env_vars({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}, override=False)


# --------------------------------------------------------------------------- which store

def home_dir(cfg: TrackingConfig) -> Path:
    """``tracking.home`` as an absolute path (not created)."""
    return Path(cfg.home).expanduser().resolve()


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].lower() if ":" in uri else ""


def is_local_store(uri: str) -> bool:
    """A file or sqlite store (artifacts then go under ``<home>/artifacts``), or a plain path."""
    scheme = _scheme(uri)
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # one letter: a Windows drive


def is_http(uri: str) -> bool:
    """An ``http(s)://`` tracking server."""
    return _scheme(uri) in ("http", "https")


def tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.uri`` when set (its credentials back from ``MLFLOW_TRACKING_URI`` when a stored config dropped
    them, `sweeps.secrets`); else ``sqlite:///<absolute home>/mlflow.db``, creating ``home`` if needed. The
    URI may hold a password: print :func:`shown_uri` instead."""
    if cfg.uri:
        return with_env_credentials(cfg.uri) or cfg.uri
    home = home_dir(cfg)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoraError(f"cannot create the tracking folder {home}: {exc.strerror or exc}",
                        hint="set tracking.home to a writable folder, or tracking.uri to a server") from None
    return f"sqlite:///{home / 'mlflow.db'}"


def shown_uri(cfg: TrackingConfig) -> str:
    """The tracking store as it may be printed or stored: no password."""
    return mask_url(existing_store_uri(cfg))


def existing_store_uri(cfg: TrackingConfig) -> str:
    """``tracking_uri(cfg)`` without creating the home folder."""
    return (with_env_credentials(cfg.uri) if cfg.uri else None) or f"sqlite:///{home_dir(cfg) / 'mlflow.db'}"


def missing_store(uri: str) -> Path | None:
    """The local file or folder a local store URI names, when it does not exist (else None)."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        path = Path(re.sub(r"^sqlite:///", "", uri, flags=re.IGNORECASE))
        return None if path.is_file() or not uri.lower().startswith("sqlite:///") else path
    if scheme == "file" or scheme == "" or len(scheme) == 1:
        path = Path(urllib.parse.urlparse(uri).path) if scheme == "file" else Path(uri).expanduser()
        return None if path.is_dir() else path
    return None


def artifact_location(cfg: TrackingConfig) -> str | None:
    """``file://<home>/artifacts`` for file and sqlite stores; None (the server decides) otherwise."""
    if not is_local_store(tracking_uri(cfg)):
        return None
    folder = home_dir(cfg) / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


# --------------------------------------------------------------------------- the client and the experiment

def client_for(cfg: TrackingConfig) -> MlflowClient:
    """An ``MlflowClient`` bound to this config's store (never the global tracking URI)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    keep_url_quiet(uri)
    try:
        with quiet_mlflow():
            return MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise LoraError(f"cannot open the MLflow store {mask_url(uri)}: {first_line(exc)}",
                        hint="check tracking.uri (sqlite:///abs/path.db, http://host:port, ...)") from None


def sweep_client(cfg: TrackingConfig) -> MlflowClient:
    """The client a sweep process writes with: for a tracking server, one whose writes go through a
    durable spool under ``home`` (:mod:`sweeps.tracking.spool`), so that an outage of the server loses
    nothing and stops nothing; for a local store (the same disk as a spool), :func:`client_for`."""
    uri = tracking_uri(cfg)
    if not is_http(uri):
        return client_for(cfg)
    keep_url_quiet(uri)
    from sweeps.tracking.spool_client import SpoolingClient

    try:
        with quiet_mlflow():
            return SpoolingClient(uri, home_dir(cfg))
    except OSError as exc:
        raise LoraError(f"cannot create the MLflow write spool under {home_dir(cfg)}: {exc.strerror or exc}",
                        hint="set tracking.home (--home) to a writable folder") from None


def close_client(client: MlflowClient, timeout_s: float | None = None) -> int:
    """End a :func:`sweep_client`: wait (bounded) for its spool to reach the server; returns the writes
    left on disk for ``lora-sweep sync`` (0 for a plain client)."""
    from sweeps.tracking.spool_client import DRAIN_TIMEOUT_S, SpoolingClient

    if isinstance(client, SpoolingClient):
        return client.close(DRAIN_TIMEOUT_S if timeout_s is None else timeout_s)
    return 0


def experiment_name(cfg: TrackingConfig) -> str:
    """``tracking.experiment``, else ``lora-sweep`` (the same default for writing and reading)."""
    return cfg.experiment or DEFAULT_EXPERIMENT


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None,
                      restore_deleted: bool = True) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) if it does not exist.

    A deleted experiment of that name is restored (its old runs come back with it) unless
    ``restore_deleted`` is False, which raises instead.

    Raises:
        LoraError: the store cannot be reached, or the experiment is deleted and may not or cannot
            be restored.
    """
    from mlflow.exceptions import MlflowException

    with quiet_mlflow():
        try:
            exp = client.get_experiment_by_name(name)
        except MlflowException as exc:
            raise LoraError(f"cannot reach the MLflow store {mask_url(client.tracking_uri)}: {first_line(exc)}",
                            hint="start the tracking server (mlflow server ...) or fix tracking.uri") from None
        if exp is None:
            try:
                return str(client.create_experiment(name, artifact_location=artifact_location,
                                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
            except MlflowException:
                exp = client.get_experiment_by_name(name)  # created meanwhile by another worker
                if exp is None:
                    raise
    hint = (f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}), delete it for good "
            "(mlflow gc), or set tracking.experiment to another name")
    if exp.lifecycle_stage == "deleted":
        if not restore_deleted:
            raise LoraError(f"MLflow experiment {name!r} is deleted", hint=hint)
        try:
            with quiet_mlflow():
                client.restore_experiment(exp.experiment_id)
        except MlflowException as exc:
            raise LoraError(f"MLflow experiment {name!r} is deleted and cannot be restored: {first_line(exc)}",
                            hint=hint) from None
        logging.getLogger(__name__).warning("restored the deleted MLflow experiment %r", name)
    _mark_model_training(client, exp)
    return str(exp.experiment_id)


def _mark_model_training(client: MlflowClient, exp: Experiment) -> None:
    """Tag an experiment made before lora-sweep set :data:`EXPERIMENT_KIND_TAG` (best effort; a kind the
    user chose is kept). A spooling client's cached lookup carries no tags (nor a creation time): it is left
    alone, as that client tagged it when it first looked it up on the server."""
    from mlflow.exceptions import MlflowException

    if exp.tags.get(EXPERIMENT_KIND_TAG) or exp.creation_time is None:
        return
    with quiet_mlflow(), contextlib.suppress(MlflowException, OSError):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
