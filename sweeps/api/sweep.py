"""`Sweep`: one sweep as a notebook sees it, read from its Optuna study and MLflow runs (never written).

What it shows is read once, on first use, and kept: :meth:`Sweep.refresh` reads the sweep again (a
sweep that other workers are still running changes). Its tables are pandas DataFrames, its choices plain
dataclasses (`sweeps.api.records`), its figures the report's plotly figures; ``report`` and ``export``
are ``lora-sweep report`` and ``lora-sweep export``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeps.api.records import Choice, Decision, choice_of, decisions_of
from sweeps.api.state import kept_process_state
from sweeps.config.sweep import SweepConfig

if TYPE_CHECKING:
    import pandas as pd

    from dashboards.records import SweepData
    from sweeps.engine.progress import SweepResult
    from sweeps.engine.trial_table import TrialRow
    from sweeps.export.result import ExportResult

__all__ = ["Sweep"]


class Sweep:
    """A sweep: its trials, configurations, choices, decisions, figures, report and exports.

    Made by ``sweeps.run`` (after running) or ``sweeps.load`` (read-only); reading it writes nothing.

    Example:
        >>> sweep = sweeps.load("ladder-demo")
        >>> sweep.trials[["number", "state", "r", "targets", "seed", "value"]]
        >>> sweep.recommendation
        >>> sweep.figures()["rank"]              # displays inline in Jupyter
        >>> sweep.export("best-adapter")
    """

    def __init__(self, config: SweepConfig, *, result: SweepResult | None = None, stored: bool = False) -> None:
        self._config = config
        self._result = result
        self._stored = stored   # the config was read back from the study, and the caller did not trust it
        self._data: SweepData | None = None
        self._rows: list[TrialRow] | None = None

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        """The sweep's name (its Optuna study's)."""
        return self._config.name

    @property
    def config(self) -> SweepConfig:
        """The validated sweep config (a dataclass; ``.to_dict()`` gives the YAML's mapping)."""
        return self._config

    @property
    def storage(self) -> str:
        """Where its Optuna study is (a journal file or a database URL, any password masked)."""
        from sweeps.engine.study import storage_label
        from sweeps.text import mask_url

        return mask_url(storage_label(self._config))

    @property
    def stopped(self) -> str | None:
        """Why the ``run`` that made this object stopped: ``budget``, ``timeout``, ``ladder`` (its plan is
        done), ``grid`` (none left) or ``interrupted`` (KeyboardInterrupt: run again to resume); None for a
        sweep from ``load``."""
        return self._result.stopped if self._result is not None else None

    @property
    def result(self) -> SweepResult | None:
        """What the ``run`` that made this object did (trials run, times, the test split), or None."""
        return self._result

    def refresh(self) -> Sweep:
        """Forget what was read, so the next look reads the study and the runs again; returns the sweep."""
        self._data, self._rows = None, None
        return self

    def _read(self) -> tuple[SweepData, list[TrialRow]]:
        if self._data is None or self._rows is None:
            from dashboards.collect import collect
            from sweeps.engine.trial_table import sweep_rows
            from sweeps.tracking.sweep_runs import read_tracking

            with kept_process_state():
                data = collect(self._config, require_complete=False)
                rows = sweep_rows(data.study, read_tracking(self._config))
            self._data, self._rows = data, rows
        return self._data, self._rows

    def __repr__(self) -> str:
        if self._data is None:
            return f"Sweep({self.name!r}, storage={self.storage!r})"
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self._data.counts.items())) or "no trials"
        return f"Sweep({self.name!r}: {counts})"

    # ------------------------------------------------------------------ tables

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial, in number order: ``number``, ``state``, ``best``, the ladder's ``stage``/``rung``,
        ``steps``, the configuration (``r``, ``alpha``, ``targets``, ``lr``, ``dropout``), ``seed_index`` and
        ``seed``, ``value`` (the objective, named in ``.attrs["objective"]``), the run's ``final_<metric>``
        and ``best_<metric>`` validation metrics, ``test_<metric>`` where the sweep stored one, the costs
        (``trainable_params``, ``lora_params``, ``adapter_bytes``, ``train_s``, ``eval_s``, ``wall_s``,
        ``step_time_s``, ``tokens_per_s``, ``peak_memory_bytes``, ``pack_size``), ``duration_s``, the start
        and end times, ``pack`` (trials that trained together share it), ``mlflow_run_id`` and ``fail_reason``.

        Example:
            >>> sweep.trials.query("state == 'COMPLETE'").groupby(["r", "targets"])["value"].agg(["mean", "std"])
        """
        from sweeps.api.frames import trials_frame

        data, rows = self._read()
        return trials_frame(data, rows)

    @property
    def configurations(self) -> pd.DataFrame:
        """One row per configuration (full-length COMPLETE trials grouped by params), best mean first: the
        params, ``mean``/``std`` of the objective over its ``seeds`` (their ``values`` and ``trials``), mean
        ``trainable_params``, ``train_s`` and ``peak_memory_bytes``, ``test_mean``/``test_std``/``test_seeds``
        where the sweep evaluated the test split, and ``recommended``/``best_quality`` flags.

        Example:
            >>> sweep.configurations[["r", "targets", "mean", "std", "seeds", "trainable_params"]]
        """
        from sweeps.api.frames import configurations_frame

        data, _ = self._read()
        return configurations_frame(data)

    # ------------------------------------------------------------------ choices

    def _single_objective(self, data: SweepData) -> bool:
        return len(data.study.directions) == 1

    @property
    def recommendation(self) -> Choice | None:
        """The configuration to use: the ladder's recommendation, or for other sweeps the cheapest
        configuration shown within the margin of the best seed mean (else the best), as the report and
        ``lora-sweep status`` say; None before a trial completes, and for a two-objective sweep.

        Example:
            >>> rec = sweep.recommendation
            >>> rec.r, rec.targets, rec.mean, rec.trial
        """
        data, _ = self._read()
        return choice_of(data, data.recommendation, "recommended") if self._single_objective(data) else None

    @property
    def best_quality(self) -> Choice | None:
        """The configuration with the best seed mean (the ladder's best-quality one for a ladder); None as for
        :attr:`recommendation`.

        Example:
            >>> sweep.best_quality.mean - sweep.recommendation.mean   # what the cheaper choice gives up
        """
        data, _ = self._read()
        return choice_of(data, data.best_quality, "best_quality") if self._single_objective(data) else None

    @property
    def decisions(self) -> list[Decision]:
        """The rank ladder's decisions in order (empty for other strategies).

        Example:
            >>> for d in sweep.decisions: print(d.stage, d.kind, d.text)
        """
        data, _ = self._read()
        return decisions_of(data.ladder)

    # ------------------------------------------------------------------ figures, report, export

    def _check_stored(self) -> None:
        if self._stored:
            from sweeps.api.resolve import check_stored

            check_stored(self._config, [])

    def figures(self, *, analyses: bool = True) -> dict[str, Any]:
        """The report's plotly figures by name, each displayable inline (the last expression of a notebook
        cell, or ``fig.show()``): ``rank``, ``cost``, ``curves``, ``optuna-importances``,
        ``optuna-parallel``, ``optuna-contour``, ``optuna-timeline``, ``similarity``, ``amplification``;
        those the sweep cannot have yet are left out. ``analyses=False`` skips the two that read the
        adapter files (quicker).

        Example:
            >>> figs = sweep.figures()
            >>> figs["rank"]
        """
        from dashboards.gallery import figures

        self._check_stored()
        data, _ = self._read()
        with kept_process_state():
            return dict(figures(data, analyses=analyses).figures)

    def report(self, path: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
        """Write the sweep's HTML report (``lora-sweep report``): to ``path``, or by default
        ``<home>/reports/<name>.html``, and log it to the sweep's MLflow parent run. An existing ``path`` is
        replaced only with ``force``. Returns the file written.

        Example:
            >>> sweep.report("ladder-demo.html")
        """
        from dashboards.report import build

        self._check_stored()
        with kept_process_state():
            built = build(self._config, path, log_to_mlflow=True, force=force)
        return built.path

    def export(self, out: str | os.PathLike[str], trial: int | None = None, merged: bool = False,
               register: str | None = None, *, echo: bool = True) -> ExportResult:
        """Export a COMPLETE trial's adapter as a PEFT directory (``lora-sweep export``): by default the
        recommended trial of a ladder, else the best trial. The adapter is reloaded strictly and must
        reproduce its logged metric within 1e-4; ``merged`` adds ``out/merged`` (the full model),
        ``register`` registers it in the MLflow model registry. Nothing is written unless every check
        passes. ``echo``: print the progress lines.

        Example:
            >>> exported = sweep.export("best-adapter")
            >>> exported.out, exported.trial, exported.reproduced
        """
        from sweeps.export.exporter import export_trial

        self._check_stored()
        with kept_process_state():
            return export_trial(self._config, out, trial=trial, merged=merged, register=register,
                                echo=print if echo else None)
