"""Splits: from a source to the three splits of one request, with class labels as ids, the missing
splits made from train and the subsets taken (see :mod:`sweeps.data.prepare` for the rules).

Row assignment is made in Python from the labels and the seed (the same rows land in each split as
before the data moved to Arrow); the text rows themselves are only selected, never copied.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lora_core import LoraError
from sweeps.config.trial import DataConfig
from sweeps.data.arrow import RoleSplit
from sweeps.data.builtin import builtin_dataset_names
from sweeps.data.sources import (
    ROLES,
    SPLITS,
    SourceSplit,
    choose_splits,
    column_map,
    column_names,
    load_builtin,
    load_hub,
    read_files,
    role_split,
)


@dataclass(frozen=True)
class RawSplits:
    """Role columns of the three splits (labels already ids), with the label names and a description."""

    splits: dict[str, RoleSplit]
    label_names: list[str] | None
    source: str

    def sizes(self) -> dict[str, int]:
        return {split: len(self.splits[split]) for split in SPLITS}


def load_raw(cfg: DataConfig, task: str, seed: int) -> RawSplits:
    """Read the source of ``cfg``, map its columns, encode labels, make missing splits, take subsets."""
    for role in cfg.columns:
        if role not in ROLES[task]:
            raise LoraError(f"data.columns.{role}: {role!r} is not a {task} role",
                            hint=f"{task} roles are: {', '.join(ROLES[task])}")
    for limit, key in ((cfg.max_train_samples, "max_train_samples"), (cfg.max_eval_samples, "max_eval_samples")):
        if limit is not None and limit < 1:
            raise LoraError(f"data.{key} must be >= 1 or null, got {limit}")

    described: list[str] = []
    class_names: list[str] | None = None
    available: dict[str, SourceSplit]
    if cfg.files is not None:
        available, where = read_files(cfg.files)
        must_use = set(available) if isinstance(cfg.files, dict) else set()
    elif cfg.name in builtin_dataset_names():
        available, where, must_use = load_builtin(cfg.name, seed), f"built-in data set {cfg.name}", set()
        described.append(f"seed {seed}")
    elif cfg.name:
        hub_label = f"{cfg.name}/{cfg.config}" if cfg.config else str(cfg.name)
        available, where, must_use = load_hub(cfg.name, cfg.config), f"hub data set {hub_label}", set()
    else:
        raise LoraError("data needs a name (built-in or hub data set) or files", hint="e.g. data.name: pydoc-topics")

    chosen = choose_splits(available, cfg.splits, where)
    unused = sorted(must_use - set(chosen.values()))
    if unused:
        raise LoraError(f"data.files names split(s) {', '.join(unused)}, which are not used",
                        hint="name the files train, validation and test, or map them with data.splits")
    columns = column_map(column_names(available[chosen["train"]]), cfg.columns, task)
    parts: dict[str, RoleSplit] = {}
    for ours, theirs in chosen.items():
        parts[ours], names = role_split(available[theirs], theirs, where, columns)
        if ours == "train":
            class_names = names
    mapped = [f"{ours} <- {theirs}" for ours, theirs in chosen.items() if ours != theirs]
    if mapped:
        described.append(", ".join(mapped))
    label_names = None
    if task == "classification":
        label_names, ids = encode_labels({split: part.labels or [] for split, part in parts.items()}, class_names,
                                         where)
        parts = {split: RoleSplit(part.table, ids[split], part.indices) for split, part in parts.items()}

    missing = [split for split in SPLITS if split not in parts]
    if missing:
        made = carve(parts["train"], missing, cfg.split_fractions, seed, stratify=task == "classification")
        parts.update(made)
        shares = ", ".join(f"{split} {len(made[split])}" for split in missing)
        described.append(f"{shares} rows made from train (seed {seed})")

    for split, limit in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples),
                         ("test", cfg.max_eval_samples)):
        n = len(parts[split])
        if limit is not None and limit < n:
            parts[split] = subset(parts[split], limit, f"lora-sweep/subset/{seed}/{split}")
            described.append(f"{split}: {limit} of {n} rows")
    sizes = "/".join(str(len(parts[split])) for split in SPLITS)
    source = f"{where} ({'; '.join([*described, f'train/validation/test {sizes}'])})"
    return RawSplits(splits={split: parts[split] for split in SPLITS}, label_names=label_names, source=source)


# ----------------------------------------------------------------------------------------------
# labels


def _normalise_label(value: Any) -> int | str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(value)


def encode_labels(labels: dict[str, list[Any]], class_names: list[str] | None, where: str
                  ) -> tuple[list[str], dict[str, list[int]]]:
    """The label names, and every split's labels as ids."""
    try:
        normalised = {split: [_normalise_label(v) for v in values] for split, values in labels.items()}
    except ValueError as exc:
        raise LoraError(f"{where}: label {exc.args[0]!r} is neither an integer nor a string",
                        hint="classification needs class labels; map data.columns.label to a class column") from None
    train = normalised["train"]
    if len(set(train)) < 2:
        raise LoraError(f"{where}: the train split has only one label ({train[0]!r})",
                        hint="classification needs at least two classes")
    kinds = {type(v) for values in normalised.values() for v in values}
    if len(kinds) > 1:
        raise LoraError(f"{where}: the labels mix integers and strings",
                        hint="use one kind: ids 0..K-1 or class names")
    ids: dict[Any, int]
    if class_names is not None or kinds == {int}:
        int_train = [int(v) for v in train]
        bad = [v for v in int_train if v < 0 or (class_names is not None and v >= len(class_names))]
        if bad:
            raise LoraError(f"{where}: train label {bad[0]} is not a class id 0..K-1",
                            hint="negative labels usually mark unlabelled rows; use a labelled split")
        names = list(class_names) if class_names is not None else [str(i) for i in range(max(int_train) + 1)]
        ids = {v: v for v in set(int_train)}
    else:
        names = sorted(str(v) for v in set(train))
        ids = {name: i for i, name in enumerate(names)}
    out: dict[str, list[int]] = {}
    for split, values in normalised.items():
        for i, value in enumerate(values):
            if value not in ids:
                hint = ("negative labels usually mark an unlabelled split (GLUE test): map data.splits.test to a "
                        "labelled split" if isinstance(value, int) and value < 0 else
                        "every validation/test label must also occur in train")
                raise LoraError(f"{where}, split {split!r}, row {i + 1}: label {value!r} does not occur in train",
                                hint=hint)
        out[split] = [ids[v] for v in values]
    return names, out


def majority_rate(train: list[int], validation: list[int]) -> float:
    """Validation accuracy of always predicting the most frequent train label (ties: the smallest id)."""
    counts = Counter(train)
    top = min(counts, key=lambda label: (-counts[label], label))
    return sum(1 for y in validation if y == top) / len(validation)


# ----------------------------------------------------------------------------------------------
# splitting and subsetting


def _shuffled(n: int, labels: list[Any] | None, rng: random.Random) -> list[int]:
    """A random order of ``range(n)``; with labels, every prefix holds each label about in proportion
    (each label's rows spread evenly over [0, 1), then sorted)."""
    if labels is None:
        order = list(range(n))
        rng.shuffle(order)
        return order
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    keyed: list[tuple[float, int]] = []
    for members in groups.values():  # first-appearance order: deterministic
        rng.shuffle(members)
        keyed.extend(((j + rng.random()) / len(members), i) for j, i in enumerate(members))
    keyed.sort()
    return [i for _, i in keyed]


def carve(train: RoleSplit, missing: list[str], fractions: list[float], seed: int,
          stratify: bool) -> dict[str, RoleSplit]:
    """Make the ``missing`` splits from ``train``; returns them and the new train."""
    n = len(train)
    share = dict(zip(SPLITS, fractions, strict=True))
    total = share["train"] + sum(share[split] for split in missing)
    sizes = {}
    for split in missing:
        if share[split] <= 0:
            raise LoraError(f"the {split} split must be made from train, but data.split_fractions gives it 0",
                            hint=f"give it a share, e.g. [0.8, 0.1, 0.1], or provide a {split} split")
        sizes[split] = max(1, round(n * share[split] / total))
    if n - sum(sizes.values()) < 1:
        raise LoraError(f"the train split has {n} rows, too few to make {' and '.join(missing)} from",
                        hint="provide more rows, or the missing splits themselves")
    order = _shuffled(n, train.labels if stratify else None, random.Random(f"lora-sweep/split/{seed}"))
    parts, start = {}, 0
    for split in missing:
        parts[split] = train.take(sorted(order[start:start + sizes[split]]))
        start += sizes[split]
    parts["train"] = train.take(sorted(order[start:]))
    return parts


def subset(part: RoleSplit, limit: int, seed_text: str) -> RoleSplit:
    """The first ``limit`` rows of a seeded shuffle, in source order."""
    order = list(range(len(part)))
    random.Random(seed_text).shuffle(order)
    return part.take(sorted(order[:limit]))
