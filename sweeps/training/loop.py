"""The training loop: advance a list of trial slots step by step, read back losses, evaluate, ask each
slot's report hook whether to go on, and return each slot's outcome. No exception ends a trial here:
a stop request or a non-finite loss is recorded on the slot (anything else a hook raises, such as
KeyboardInterrupt, propagates)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sweeps.training.result import State
from sweeps.training.state import TrialBook, TrialSlot


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
        if not read_back(slot):
            return
    finally:
        slot.train_s += time.perf_counter() - t0
    evaluate_and_report(slot)


def read_back(book: TrialBook) -> bool:
    """After a step: read the pending losses back (and show progress) when due; False when a loss was
    not finite (the trial is then FAILED)."""
    if book.should_sync():
        loss = book.sync()
        if loss is None:
            return False
        if book.progress:
            book.progress(book.steps, book.total_steps, loss)
    return True


def evaluate_and_report(book: TrialBook) -> None:
    """After a step: evaluate and ask the report hook when due (PRUNED on its say), COMPLETE at the end."""
    if book.should_eval():
        metrics = book.evaluate()
        reason = book.report(book.steps, metrics) if book.report else None
        if reason is not None:
            book.finish("PRUNED", reason)
            return
    if book.steps >= book.total_steps:
        book.finish("COMPLETE")
