"""The order in which a trial sees its training examples: an endless, seeded stream of batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

GROUP_BATCHES = 16  # batches per length-sorted group


def batches(examples: Sequence[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Endless shuffled batches of similar length; each epoch is a new seeded permutation.

    Each run of ``GROUP_BATCHES`` batches' worth of shuffled examples is sorted by length and cut
    into batches, whose order is then shuffled again: batches stay random but carry little padding
    (dynamic padding pads to the longest example in the batch). The stream owns its generator, so
    streams of several trials do not disturb each other or the global RNG.
    """
    g = torch.Generator().manual_seed(seed)
    if len(examples) < batch_size:
        while True:
            yield [examples[j] for j in torch.randperm(len(examples), generator=g).tolist()]
    group = batch_size * GROUP_BATCHES
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        usable = len(order) - len(order) % batch_size
        for start in range(0, usable, group):
            chunk = sorted(order[start:min(start + group, usable)], key=lambda j: len(examples[j]["input_ids"]))
            cut = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            for k in torch.randperm(len(cut), generator=g).tolist():
                yield [examples[j] for j in cut[k]]
