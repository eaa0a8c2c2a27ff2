"""Tables derived from a sweep's configurations for the figures and the page: the metric-vs-rank
table (the best configuration per target set and rank) and the Pareto front of quality against cost."""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.records import ConfigStats, SweepData

__all__ = ["RankCell", "pareto_front", "rank_table"]


@dataclass
class RankCell:
    """One cell of the metric-vs-rank table: the best configuration at that (target set, rank)."""

    targets: str
    r: int
    config: ConfigStats
    alternatives: int                     # configurations at this (targets, r), the shown one included


def rank_table(data: SweepData) -> tuple[list[str], list[int], dict[tuple[str, int], RankCell]]:
    """(target sets, ranks, cells): each cell the configuration with the best seed mean at that target
    set and rank (other params, e.g. lr, may differ between cells); target sets in the search's order."""
    order = {t: i for i, t in enumerate(data.target_order())}
    cells: dict[tuple[str, int], RankCell] = {}
    for c in data.configs:
        key = (c.targets, c.r)
        cell = cells.get(key)
        if cell is None:
            cells[key] = RankCell(c.targets, c.r, c, 1)
            continue
        cell.alternatives += 1
        if data.better(c.mean, cell.config.mean) or (c.mean == cell.config.mean and c.n > cell.config.n):
            cell.config = c
    targets = sorted({k[0] for k in cells}, key=lambda t: (order.get(t, len(order)), t))
    ranks = sorted({k[1] for k in cells})
    return targets, ranks, cells


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats: cost (x) no higher and quality (y) at least as good,
    one of them strictly. Sorted by cost."""
    def close(a: float, b: float) -> bool:  # seed means that differ by rounding only are equal
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))

    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i:
                continue
            better_y = not close(y, y2) and (y2 > y if maximize else y2 < y)
            same_or_better_y = close(y, y2) or better_y
            if (x2 <= x and same_or_better_y) and (x2 < x or better_y):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
