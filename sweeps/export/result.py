"""What an export produced (`ExportResult`): a module of its own, so that the model card
(`sweeps.export.card`) describes a result without importing the exporter that makes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sweeps.export.registry import Registered

__all__ = ["ExportResult"]


@dataclass
class ExportResult:
    """One exported trial: where it went, its logged and reproduced metrics, and the optional merged
    model and registry entry."""

    out: Path
    trial: int
    run_id: str
    objective: str
    logged: dict[str, float]
    reproduced: dict[str, float]
    merged: Path | None = None
    merged_metrics: dict[str, float] = field(default_factory=dict)
    merged_dtype: str | None = None  # a quantized base: the 16-bit dtype it was dequantized to for the merge
    registered: Registered | None = None
