"""The training loop: advance a list of trial slots step by step, read back losses, evaluate, ask each
slot's report hook whether to go on, and return each slot's outcome. No exception ends a trial here:
a stop request or a non-finite loss is recorded on the slot (anything else a hook raises, such as
KeyboardInterrupt, propagates)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sweeps.training.result import State
from sweeps.training.state import TrialSlot


def train_loop(slots: Sequence[TrialSlot]) -> list[tuple[State, str | None]]:
    """Train every slot to its last step or until it stops, one step of each in turn; return their
    (state, reason) outcomes in order. Time spent in the hooks counts as neither training nor evaluation."""
    switching = len(slots) > 1
    try:
        for slot in slots:
            slot.model.train()
        while live := [s for s in slots if not s.done]:
            for slot in live:
                with slot.turn(switching):
                    _advance(slot)
    finally:
        for slot in slots:
            slot.model.eval()
            slot.close()
    return [slot.outcome for slot in slots]


def _advance(slot: TrialSlot) -> None:
    """One step of ``slot``: train, read back (and show progress) when due, evaluate and report when due."""
    t0 = time.perf_counter()
    try:
        slot.step()
        if slot.should_sync():
            loss = slot.sync()
            if loss is None:  # not finite: the slot FAILED
                return
            if slot.progress:
                slot.progress(slot.steps, slot.total_steps, loss)
    finally:
        slot.train_s += time.perf_counter() - t0
    if slot.should_eval():
        metrics = slot.evaluate()
        reason = slot.report(slot.steps, metrics) if slot.report else None
        if reason is not None:
            slot.finish("PRUNED", reason)
            return
    if slot.steps >= slot.total_steps:
        slot.finish("COMPLETE")
