"""The batches a plan probes (`sweeps.engine.plan`): rows cut to the lengths of the batches a trial
draws, so a few probe steps give a trial's median step time and its peak memory, and one evaluation
batch that stands for the whole split."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def batch_lengths(examples: Sequence[dict[str, Any]], batch_size: int, steps: int, seed: int) -> list[int]:
    """The padded lengths of the batches a trial of ``steps`` steps trains on (its stream, drawn)."""
    from sweeps.training.stream import batches

    stream = batches(examples, batch_size, seed)
    return [max(len(e["input_ids"]) for e in next(stream)) for _ in range(max(1, steps))]


def median_batch_length(examples: Sequence[dict[str, Any]], batch_size: int, steps: int, seed: int) -> int:
    """The median padded length of the batches a trial of ``steps`` steps trains on."""
    return int(statistics.median_low(batch_lengths(examples, batch_size, steps, seed)))


def _cut(examples: Sequence[dict[str, Any]], length: int, need: int) -> list[dict[str, Any]]:
    """``need`` examples exactly ``length`` long: examples at least that long, cut to it (the first token
    and the last ones are kept: [CLS], and a causal LM's completion with its labels); the longest
    shorter ones where the data have too few."""
    chosen: list[dict[str, Any]] = []
    shorter: list[dict[str, Any]] = []
    for e in examples:
        n = len(e["input_ids"])
        if n >= length:
            chosen.append({k: (v[:1] + v[n - length + 1:] if isinstance(v, list) and len(v) == n else v)
                           for k, v in e.items()})
            if len(chosen) == need:
                return chosen
        else:
            shorter.append(e)
    shorter.sort(key=lambda e: -len(e["input_ids"]))
    chosen += shorter[:need - len(chosen)]
    return (chosen * (need // len(chosen) + 1))[:need]


def probe_examples(examples: Sequence[dict[str, Any]], batch_size: int, steps: int, seed: int,
                   probe_steps: int) -> list[dict[str, Any]]:
    """``batch_size * probe_steps`` training examples for a probe: one batch as long as the trial's
    longest batch (its activations make the trial's peak memory) and the others as long as its median
    batch (`median_batch_length`: their step time is the median a trial logs). The stream sorts by
    length, so the long rows make one batch; the median of the probe's step times is a median batch's
    whichever step draws it."""
    lengths = batch_lengths(examples, batch_size, steps, seed)
    median, longest = int(statistics.median_low(lengths)), max(lengths)
    if probe_steps < 2 or longest == median:
        return _cut(examples, median, batch_size * probe_steps)
    return _cut(examples, longest, batch_size) + _cut(examples, median, batch_size * (probe_steps - 1))


def long_batch_first(examples: Sequence[dict[str, Any]], batch_size: int, seed: int) -> int:
    """The first seed from ``seed`` on whose stream draws the longest of ``examples`` (a probe's rows)
    in its first batch; ``seed`` itself if none of 1,000 does (each does with a chance of one in the
    probe's batches, so this does not happen in practice; a timed step would then be the long one)."""
    from sweeps.training.stream import batches

    longest = max(len(e["input_ids"]) for e in examples)
    for s in range(seed, seed + 1000):
        if max(len(e["input_ids"]) for e in next(batches(examples, batch_size, s))) == longest:
            return s
    return seed


def eval_sample(examples: Sequence[dict[str, Any]], batch_size: int) -> tuple[list[dict[str, Any]], float]:
    """One evaluation batch to time in place of the whole split: its ``batch_size`` longest examples
    (the batch with the largest activations: its peak is evaluation's peak), and the factor that scales
    its time to the whole split's (padded tokens of every evaluation batch over those of this one;
    evaluation batches are length-sorted: `sweeps.training.evaluate`)."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    if len(lengths) <= batch_size:
        return list(examples), 1.0
    padded = sum(max(lengths[s:s + batch_size]) * len(lengths[s:s + batch_size])
                 for s in range(0, len(lengths), batch_size))
    longest = sorted(examples, key=lambda e: len(e["input_ids"]))[-batch_size:]
    return longest, padded / (batch_size * lengths[-1])
