"""The LoRA paper's adapter analyses for ``analyze.py``: Figure 3 (subspace similarity of the A matrices of
two ranks, same-seed and cross-seed pairs, against random Gaussian A matrices) and Table 7 (amplification
factor of dW_q and dW_v with the paper's comparison rows), on the adapters a sweep's MLflow runs logged
(``dashboards.adapters.AdapterCache``) and the numbers of ``lora_core.analysis``.
"""

from __future__ import annotations

import itertools
import re
import statistics
from typing import Any

import torch

from dashboards.adapters import AdapterCache
from dashboards.records import ConfigStats, SweepData, TrialRecord

DRAWS = 20         # random baselines: draws averaged (torch generator seeded 0)
PAIR_TARGETS = "q,v"               # the adapters of Figure 3 and Table 7
TYPES = ("query", "value")         # BERT's names of W_q and W_v
Cells = dict[tuple[str, int], ConfigStats]


class StudyError(Exception):
    """A one-line reason to stop."""


def label(targets: str, r: int) -> str:
    return f"({targets}) r={r}"


def stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def by_layer(modules: dict[str, Any]) -> dict[str, str]:
    """``{"query.3": module path}`` for an adapter's query/value modules, in (type, layer) order."""
    found = {}
    for name in modules:
        kind, layer = name.rsplit(".", 1)[-1], re.search(r"\.(\d+)\.", name)
        if kind in TYPES and layer is not None:
            found[(kind, int(layer.group(1)))] = name
    return {f"{kind}.{layer}": found[(kind, layer)] for kind, layer in sorted(found)}


def with_adapter(c: ConfigStats) -> dict[int, TrialRecord]:
    """The configuration's trials that logged an adapter, by seed index."""
    return {t.seed_index: t for t in c.trials if t.has_adapter and t.run_id}


def figure3(cells: Cells, cache: AdapterCache, r_lo: int, r_hi: int) -> dict[str, Any]:
    """phi(A_lo, A_hi, i, j) per query/value layer over same-seed and cross-seed pairs, and for random A."""
    from lora_core.analysis import subspace_similarity_grid as phi_grid

    lo, hi = cells.get((PAIR_TARGETS, r_lo)), cells.get((PAIR_TARGETS, r_hi))
    if lo is None or hi is None or not with_adapter(lo) or not with_adapter(hi):
        return {"note": f"not run: needs {label(PAIR_TARGETS, r_lo)} and {label(PAIR_TARGETS, r_hi)} adapters"}
    lo_t, hi_t = with_adapter(lo), with_adapter(hi)
    pairs = {"same": [(k, k) for k in sorted(lo_t) if k in hi_t],
             "cross": [(k, j) for k in sorted(lo_t) for j in sorted(hi_t) if j != k]}
    grids: dict[str, dict[str, list[torch.Tensor]]] = {kind: {} for kind in pairs}   # kind -> "query.0" -> phi
    for kind, seed_pairs in pairs.items():
        for k, j in seed_pairs:
            a_lo, a_hi = cache.get(lo_t[k]).a, cache.get(hi_t[j]).a
            m_lo, m_hi = by_layer(a_lo), by_layer(a_hi)
            for key in m_lo.keys() & m_hi.keys():
                grids[kind].setdefault(key, []).append(phi_grid(a_lo[m_lo[key]], a_hi[m_hi[key]]))
    if not any(grids.values()):
        return {"note": "not run: the adapters have no query/value module in common"}
    dim = next(iter(cache.get(lo_t[min(lo_t)]).a.values())).shape[1]
    g = torch.Generator().manual_seed(0)
    rand = [phi_grid(torch.randn(r_lo, dim, generator=g, dtype=torch.float64),
                     torch.randn(r_hi, dim, generator=g, dtype=torch.float64)) for _ in range(DRAWS)]
    points = list(dict.fromkeys([(1, 1), (1, r_lo), (1, r_hi), (r_lo, r_lo), (r_lo, r_hi)]))

    def summary(gs: list[torch.Tensor]) -> dict[str, Any]:
        return {f"phi({i},{j})": stat([float(x[i - 1, j - 1]) for x in gs]) for i, j in points}

    keys = sorted({key for kind in grids.values() for key in kind},
                  key=lambda k: (TYPES.index(k.split(".")[0]), int(k.split(".")[1])))
    layers = {key: {kind: summary(grids[kind][key]) for kind in grids if key in grids[kind]} for key in keys}
    means: dict[str, dict[str, dict[str, float]]] = {}     # type -> kind -> point -> mean over layers
    for typ, kind, (i, j) in itertools.product(TYPES, grids, points):
        got = [v[kind][f"phi({i},{j})"]["mean"] for key, v in layers.items() if key.startswith(typ) and kind in v]
        if got:
            means.setdefault(typ, {}).setdefault(kind, {})[f"phi({i},{j})"] = statistics.fmean(got)
    return {"r_low": r_lo, "r_high": r_hi, "in_features": dim, "points": points, "seed_pairs": pairs,
            "trials": {"low": {k: t.number for k, t in lo_t.items()}, "high": {k: t.number for k, t in hi_t.items()}},
            "random": summary(rand) | {"draws": DRAWS}, "random_analytic": {f"phi({i},{j})": j / dim for i, j in points},
            "layers": layers, "mean_over_layers": means,
            "same_seed_grids": {key: [[round(v, 6) for v in row] for row in torch.stack(gs).mean(0).tolist()]
                                for key, gs in grids["same"].items()}}


def base_modules(data: SweepData, trial: TrialRecord) -> dict[str, torch.nn.Module]:
    """The base model's modules, loaded once on the CPU in float32 (as ``dashboards.adapters.amplification``)."""
    from dashboards.adapters import _transformers_quiet
    from sweeps.engine.space import trial_config
    from sweeps.models.load import load_model

    cfg = trial_config(data.config, trial.params, trial.seed_index)
    with _transformers_quiet():  # only the adapted matrices' weights are read: the head's size does not matter
        loaded = load_model(cfg.model.name, cfg.model.task, num_labels=2, dtype="float32", device="cpu",
                            trust_remote_code=cfg.model.trust_remote_code)
    return dict(loaded.model.named_modules())


def projections(w: torch.Tensor, delta: torch.Tensor, r: int, g: torch.Generator) -> dict[str, float]:
    """Table 7's numbers for one module: ||U^T W V^T||_F with U, V of rank r from dW, from W's own SVD, random."""
    from lora_core.analysis import amplification_factor

    def orthonormal(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=w.dtype)).Q

    factor = amplification_factor(w, delta, r)
    d_norm = float(torch.linalg.matrix_norm(delta))
    rand = [float(torch.linalg.matrix_norm(orthonormal(w.shape[0]).t() @ w @ orthonormal(w.shape[1])))
            for _ in range(DRAWS)]
    return {"dW_norm": d_norm, "proj_dW": d_norm / factor, "factor": factor,
            "proj_W_top": float(torch.linalg.svdvals(w)[:r].pow(2).sum().sqrt()),
            "proj_random": statistics.fmean(rand), "W_norm": float(torch.linalg.matrix_norm(w))}


def table7(data: SweepData, cells: Cells, cache: AdapterCache) -> dict[str, Any]:
    """The amplification factor of every (q,v) adapter's dW_q and dW_v, per layer and mean, with the paper's
    comparison rows."""
    from lora_core.analysis import base_weight

    ranks = sorted(r for t, r in cells if t == PAIR_TARGETS and with_adapter(cells[(t, r)]))
    if not ranks:
        return {"note": f"not run: no {PAIR_TARGETS} adapter"}
    modules = base_modules(data, next(iter(with_adapter(cells[(PAIR_TARGETS, ranks[0])]).values())))
    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"draws": DRAWS, "ranks": {}}
    for r in ranks:
        per: dict[str, list[dict[str, float]]] = {}       # "query.0" -> one row per seed
        for t in with_adapter(cells[(PAIR_TARGETS, r)]).values():
            adapter = cache.get(t)
            for key, name in by_layer(adapter.delta).items():
                if name not in modules:
                    raise StudyError(f"adapted module {name} of trial {t.number} is not in the base model")
                w = base_weight(modules[name]).double()
                per.setdefault(key, []).append(projections(w, adapter.delta[name], adapter.rank[name], g))
        layers = {key: {k: statistics.fmean(x[k] for x in rows) for k in rows[0]}
                  | {"factor_std": stat([x["factor"] for x in rows])["std"], "seeds": len(rows)}
                  for key, rows in per.items()}
        mean = {typ: {k: statistics.fmean(x[k] for x in xs) for k in xs[0]} for typ in TYPES
                if (xs := [x for key, rows in per.items() if key.startswith(typ) for x in rows])}
        out["ranks"][str(r)] = {"layers": layers, "mean": mean}
    return out
