"""What one trial measured: its outcome (COMPLETE / PRUNED / FAILED and why), curves, metrics and costs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["COMPLETE", "PRUNED", "FAILED"]


@dataclass
class TrialResult:
    """What one trial measured. Times in seconds, memory in bytes."""

    state: State
    reason: str | None
    objective: str
    direction: Literal["maximize", "minimize"]
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    best_step: int
    steps_done: int
    history: list[dict[str, float]] = field(default_factory=list)  # evaluations: step + metrics
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    trainable_params: int = 0
    lora_params: int = 0
    trainable_fraction: float = 0.0
    adapter_bytes: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    pack_size: int = 1  # how many trials shared its steps (packed trials), at most; 1 when trained alone
    micro_batch_size: int = 0  # rows per forward/backward it trained with (less than the batch after an OOM)

    @property
    def value(self) -> float | None:
        return self.final_metrics.get(self.objective)

    def summary(self) -> dict[str, float]:
        out = {f"final_{k}": v for k, v in self.final_metrics.items()}
        out.update({f"best_{k}": v for k, v in self.best_metrics.items()})
        out.update(best_step=self.best_step, steps_done=self.steps_done, tokens_per_s=self.tokens_per_s,
                   step_time_s=self.step_time_s, peak_memory_bytes=self.peak_memory_bytes,
                   trainable_params=self.trainable_params, lora_params=self.lora_params,
                   trainable_fraction=self.trainable_fraction, adapter_bytes=self.adapter_bytes,
                   train_s=self.train_s, eval_s=self.eval_s, wall_s=self.wall_s, pack_size=self.pack_size,
                   micro_batch_size=self.micro_batch_size)
        return out
