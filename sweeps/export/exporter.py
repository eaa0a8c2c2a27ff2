"""The export of one trial into a new directory: a checked PEFT adapter with a model card, all or nothing.

What :func:`export_trial` does, in order (any failure raises ``LoraError`` before anything is written
to ``out``):

1. picks the trial (:func:`sweeps.export.source.pick_trial`): ``trial=N`` (it must be COMPLETE), else
   the study's best trial; a Pareto study with more than one best trial needs ``trial``;
2. reads the trial's MLflow run (user attr ``mlflow_run_id``) and downloads its ``adapter/``
   artifact into a temporary folder (sqlite store or tracking server alike);
3. rebuilds the trial's config (``trial_config``), loads the base model with the trial's LoRA
   layout injected as a reference, loads the downloaded adapter strictly with ``lora_core`` next to
   it and checks that both have the same adapted modules, saved modules (the classification head),
   shapes and scaling; then re-evaluates the validation split (prepared with the sweep's base seed,
   as the sweep did) and refuses unless the objective and ``eval_loss`` match the run's logged
   ``final_*`` metrics within ``TOLERANCE`` (:mod:`sweeps.export.verify`);
4. builds the output in a hidden sibling folder (``.DIR.<pid>-*.tmp``; ones an export killed before its end
   left are removed by the next export to DIR): the adapter files exactly as
   logged (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer, ``README.md`` (a
   Hugging Face style model card, :mod:`sweeps.export.card`, with the test-split figures the sweep's end
   stored in the study, ``lora_sweep.test``; export itself never reads the test split) and, with
   ``merged``, ``merged/`` (the
   base model with the adapter folded in, ``save_pretrained`` safetensors + tokenizer, checked to
   give the same metric; a quantized base is dequantized to a 16-bit copy to merge into, and its metric
   reported, not checked); ``register`` then registers the run's adapter artifact in the MLflow model
   registry (:mod:`sweeps.export.registry`); finally the folder is renamed to ``DIR`` in one step.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from lora_core import LoraError
from lora_core.io import current_umask
from sweeps.config.sweep import SweepConfig
from sweeps.export import Echo, registry
from sweeps.export.card import CARD_FILE, MERGED_DIR, model_card
from sweeps.export.registry import check_model_name, echo_registered
from sweeps.export.result import ExportResult
from sweeps.export.source import (
    check_run_matches,
    load_study,
    logged_metrics,
    open_client,
    pick_trial,
    trial_run,
)
from sweeps.export.verify import compare, counts, evaluate, load_checked, merged_dtype_of, write_merged
from sweeps.names import LADDER_ATTR, SEED_INDEX, TEST_ATTR
from sweeps.text import fmt_value, mask_url

__all__ = ["ADAPTER_FILES", "ExportResult", "export_trial"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _silent(_: str) -> None:
    pass


def export_trial(config: SweepConfig, out: str | os.PathLike[str], *, trial: int | None = None,
                 merged: bool = False, register: str | None = None, echo: Echo | None = None) -> ExportResult:
    """Export trial ``trial`` (default: the best) of sweep ``config`` to directory ``out``; see the module docstring.

    ``register``: also register the adapter in the MLflow model registry under that name.
    ``echo``: where the progress lines go (``print`` for the command; default nowhere).

    Raises:
        LoraError: ``out`` is not empty, the sweep or trial cannot be exported (unknown, not
            COMPLETE, Pareto without a trial), its run or adapter is missing or does not load
            strictly, or the re-evaluated metric differs from the logged one. Nothing is written then.
    """
    from sweeps.engine.loop import prepare_sweep_data
    from sweeps.engine.selection import best_trials, recommendation_why
    from sweeps.engine.space import trial_config
    from sweeps.engine.study import storage_label
    from sweeps.tracking.artifacts import download_adapter
    from sweeps.tracking.store import quiet_mlflow

    say = echo or _silent
    dest = _check_out(out)
    if register is not None:
        check_model_name(register)
    study = load_study(config)
    frozen = pick_trial(study, config, trial)
    objective = config.search.objective_name(config.model.task)
    seed_index = int(frozen.user_attrs.get(SEED_INDEX, 0))
    cfg = trial_config(config, frozen.params, seed_index)
    client = open_client(config)
    run_id, run = trial_run(client, config, frozen)
    check_run_matches(run, cfg, frozen.number)
    compared = [objective] + (["eval_loss"] if objective != "eval_loss" else [])
    logged = logged_metrics(run, compared, frozen.number)
    best = frozen.number in {t.number for t in best_trials(study)}
    say(f"sweep {config.name}: trial {frozen.number}{' (best)' if best else ''}, "
        f"{' '.join(f'{k}={fmt_value(v)}' for k, v in frozen.params.items())}, seed {cfg.seed}; MLflow run {run_id}")

    staging, created = _staging_dir(dest)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-sweep-export-") as tmp:
            adapter_dir = download_adapter(config.tracking, run_id, Path(tmp) / "adapter")
            data = prepare_sweep_data(config)
            loaded, model = load_checked(cfg, data, adapter_dir, run_id, frozen.number)
            generate = cfg.model.task == "causal-lm" and objective == "exact_match"
            reproduced = evaluate(model, data, cfg, loaded.tokenizer, generate)
            compare(reproduced, logged, frozen.number, "adapter", say)
            sizes = counts(model)
            for name in ADAPTER_FILES:
                shutil.copyfile(adapter_dir / name, staging / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.tokenizer.save_pretrained(str(staging))
        result = ExportResult(dest, frozen.number, run_id, objective, logged, reproduced)
        if merged:
            result.merged = dest / MERGED_DIR
            half = merged_dtype_of(loaded)
            result.merged_dtype = None if half is None else str(half).removeprefix("torch.")
            result.merged_metrics = write_merged(model, loaded, data, cfg, staging / MERGED_DIR, logged,
                                                 frozen.number, generate, say)
        test = study.user_attrs.get(TEST_ATTR)
        ladder = study.user_attrs.get(LADDER_ATTR)
        card = model_card(config, cfg, frozen, run, data, sizes, result, best=best,
                          tracking=mask_url(client.tracking_uri), storage=storage_label(config),
                          test=test if isinstance(test, dict) else None,
                          why=recommendation_why(study, config, ladder if isinstance(ladder, dict) else None))
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        if register is not None:
            with quiet_mlflow():
                result.registered = registry.register(open_client(config, registry=True), config, study,
                                                      frozen, run, register)
            echo_registered(result.registered, say)
        staging.chmod(0o777 & ~current_umask())
        try:
            staging.replace(dest)  # one rename; onto an empty directory too (POSIX), never onto a non-empty one
        except OSError as exc:
            raise LoraError(f"cannot move the export into {dest}: {exc.strerror or exc}",
                            hint="something was written there meanwhile; pass a new directory") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    say(f"exported trial {frozen.number} to {dest}" + (f" (merged model in {result.merged})" if merged else ""))
    return result


def _check_out(out: str | os.PathLike[str]) -> Path:
    dest = Path(out).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise LoraError(f"cannot export to {dest}: it exists and is not an empty directory",
                        hint="pass a new directory (or remove the old export first)")
    return dest


def _staging_dir(dest: Path) -> tuple[Path, list[Path]]:
    """A hidden folder beside ``dest`` (same file system: the final rename is atomic), and the parent
    folders created for it (removed again if the export fails)."""
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()][::-1]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(dest)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent)), created
    except OSError as exc:
        _remove_empty(created)
        raise LoraError(f"cannot write in {dest.parent}: {exc.strerror or exc}", hint="pass a writable --out") from None


LEFTOVER_GRACE_S = 3600.0  # a staging folder of unknown owner is left alone this long (it may be in use)


def remove_leftovers(dest: Path) -> list[Path]:
    """Remove the staging folders (``.DIR.<pid>-*.tmp``) that exports to ``dest`` killed before they ended
    left beside it: their process is gone (one without a pid in its name: an hour old). Returns them."""
    from sweeps.engine.liveness import process_alive

    removed = []
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        middle = path.name[len(dest.name) + 2: -len(".tmp")]
        pid = middle.split("-", 1)[0]
        try:
            if not path.is_dir() or path.is_symlink():
                continue
            if pid.isdigit() and "-" in middle:
                if int(pid) == os.getpid() or process_alive(int(pid)):
                    continue
            elif time.time() - path.stat().st_mtime < LEFTOVER_GRACE_S:
                continue
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()
