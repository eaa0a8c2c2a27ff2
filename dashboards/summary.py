"""The report's first section: what was swept, counts by state, the recommendation and the
best-quality configuration as cards (validation figure, and the held-out test figure beside it when the
sweep's end evaluated one), the test split's table, and the rank ladder's decisions with their evidence."""

from __future__ import annotations

from typing import Any

from dashboards.markup import Page, esc, how, note, table
from dashboards.records import Choice, SweepData, effective_alpha, fmt_num, mean_std, params_label

__all__ = ["STAGES", "choice_card", "choice_json", "data_label", "decisions_html", "summary_section", "test_html",
           "test_of"]

TEST_ROLES = {"recommended": "Recommendation", "best_quality": "Best quality"}

STAGES = {0: "lr calibration", 1: "rank ladder", 2: "wider target sets", 3: "recommendation"}


def data_label(data: SweepData) -> str:
    """The sweep's data set in a few words: its name (and config), else its files."""
    d = data.config.data
    if d.name:
        return d.name + (f" ({d.config})" if d.config else "")
    files = d.files
    if isinstance(files, dict):
        return ", ".join(f"{k}: {v}" for k, v in files.items())
    return str(files)


def choice_json(choice: Choice | None) -> dict[str, Any] | None:
    """A choice for the page's JSON data block."""
    if choice is None:
        return None
    return {"params": choice.params, "mean": choice.mean, "std": choice.std, "n": choice.n,
            "trainable_params": choice.trainable_params, "trials": choice.trials, "source": choice.source,
            "how": choice.how}


def choice_card(data: SweepData, choice: Choice | None, cid: str, heading: str) -> str:
    """A choice as a card of facts (params, objective, cost, trials) and how it was picked."""
    if choice is None:
        return f'<div class="card" id="{cid}"><h3>{esc(heading)}</h3>{note("none yet")}</div>'
    p = choice.params
    alpha = p.get("alpha", effective_alpha(p) if "alpha_per_r" in p else None)
    facts = [("r", p.get("r")), ("alpha", alpha), ("targets", p.get("targets")), ("lr", p.get("lr")),
             ("dropout", p.get("dropout"))]
    items = [(k, fmt_num(v)) for k, v in facts if v is not None]
    items.append((f"validation {data.objective} (mean ± std (n))", mean_std(choice.mean, choice.std, choice.n)))
    tested = test_of(data, choice)
    if tested is not None:
        items.append((f"test {data.objective} (held out; mean ± std (n))",
                      mean_std(tested.get("mean"), tested.get("std"), tested.get("n"))))
    if choice.trainable_params is not None:
        items.append(("trainable parameters", fmt_num(float(choice.trainable_params))))
    if choice.trials:
        items.append(("trials", ", ".join(str(n) for n in choice.trials)))
    keys = {f"validation {data.objective}": data.objective, f"test {data.objective}": f"test_{data.objective}"}

    def key(label: str) -> str:  # the objective's own name for the validation figure (scripts read it)
        head = label.split(" (")[0]
        return keys.get(head, label.split(" ")[0])

    dl = "".join(f'<dt>{esc(k)}</dt><dd data-key="{esc(key(k))}">{esc(v)}</dd>' for k, v in items)
    source = "from the rank ladder" if choice.source == "ladder" else "derived by this report"
    return (f'<div class="card" id="{cid}" data-source="{esc(choice.source)}"><h3>{esc(heading)} '
            f'<small>({source})</small></h3><dl class="facts">{dl}</dl>{how(choice.how) if choice.how else ""}</div>')


def test_of(data: SweepData, choice: Choice) -> dict[str, Any] | None:
    """The test figures the sweep's end stored for the configuration of ``choice`` (matched by its trials),
    or None."""
    for entry in ((data.test or {}).get("choices") or {}).values():
        if isinstance(entry, dict) and set(entry.get("trials") or []) & set(choice.trials) and \
                isinstance(entry.get("test"), dict) and entry["test"].get("mean") is not None:
            return dict(entry["test"])
    return None


def test_html(data: SweepData) -> str:
    """The test split's figures beside the validation figures, or a note saying why there are none."""
    record = data.test
    if not record or not record.get("choices"):
        return note("The test split was not evaluated for this sweep (search.test_eval: false, a sweep that has "
                    "not ended, a two-objective sweep, or one run before lora-sweep read the test split); only "
                    "validation figures are shown.")
    objective = str(record.get("objective", data.objective))
    rows = []
    for role, entry in record["choices"].items():
        if not isinstance(entry, dict):
            continue
        val, test = entry.get("validation") or {}, entry.get("test") or {}
        rows.append([TEST_ROLES.get(role, role), params_label(entry.get("params") or {}),
                     ", ".join(str(n) for n in entry.get("trials") or []),
                     mean_std(val.get("mean"), val.get("std"), val.get("n")),
                     mean_std(test.get("mean"), test.get("std"), test.get("n"))])
    failed = record.get("failed") or {}
    missing = note(f"Not evaluated on the test split: trial(s) {', '.join(failed)} "
                   f"({'; '.join(str(v) for v in failed.values())}).") if failed else ""
    return (how(f"Every decision of the sweep was taken on the validation split, so the chosen configurations' "
                f"validation {objective} is biased upwards. The test split ({fmt_num(record.get('rows'))} rows) "
                "was read once, after the last decision, by reloading each seed's logged adapter onto the base "
                "model (its validation figure reproduced first); no decision used it. Mean ± std (n) over seeds.")
            + table(["", "configuration", "trials", f"validation {objective} (chose it)",
                     f"test {objective} (held out)"], rows, cls="test-split") + missing)


def _compact(value: Any, depth: int = 0) -> str:
    """One piece of evidence in a few words: a configuration as ``r=4 α=4 q,v lr=0.01: mean ± std (n)``,
    lists of up to 8 items, numbers with 4 significant digits."""
    if isinstance(value, dict):
        if isinstance(value.get("params"), dict):
            n = value.get("n")
            return f"{params_label(value['params'])}: {mean_std(value.get('mean'), value.get('std'), n)}"
        if depth >= 2:
            return "{…}"
        return "{" + ", ".join(f"{k}: {_compact(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        items = [_compact(v, depth + 1) for v in list(value)[:8]]
        more = f", … ({len(value)} in all)" if len(value) > 8 else ""
        sep = "; " if any(isinstance(v, dict) for v in value) else ", "
        return "[" + sep.join(items) + more + "]"
    return fmt_num(value)


def _evidence(evidence: Any) -> str:
    if not isinstance(evidence, dict):
        return _compact(evidence)
    return "; ".join(f"{k}={_compact(v)}" for k, v in evidence.items())


def decisions_html(ladder: dict[str, Any]) -> str:
    decisions = ladder.get("decisions") or []
    if not isinstance(decisions, list) or not decisions:
        return note("the ladder has recorded no decision yet")
    rows = []
    for d in decisions:
        if not isinstance(d, dict):
            continue
        stage = d.get("stage")
        stage_text = f"{stage} ({STAGES[stage]})" if isinstance(stage, int) and stage in STAGES else fmt_num(stage)
        rows.append([stage_text, fmt_num(d.get("rung")), str(d.get("kind", "")), str(d.get("text", "")),
                     _evidence(d.get("evidence"))])
    facts = []
    if ladder.get("margin") is not None:
        facts.append(f"margin {fmt_num(ladder.get('margin'))}")
    if ladder.get("threshold") is not None:
        facts.append(f"threshold {fmt_num(ladder.get('threshold'))}")
    facts.append("done" if ladder.get("done") else "not done yet")
    return (how("The rank ladder's decisions in the order it took them: each says what it compared and "
                "with which numbers (the evidence column lists them as recorded).")
            + table(["stage", "rung", "kind", "decision", "evidence"], rows, cls="decisions")
            + f'<p class="how">Ladder: {esc(", ".join(facts))}.</p>')


def summary_section(page: Page, data: SweepData) -> None:
    cfg = data.config
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data.counts.items(), key=lambda kv: -kv[1]))
    facts = [("sweep", data.name), ("model", f"{cfg.model.name} ({cfg.model.task})"), ("data", data_label(data)),
             ("strategy", cfg.search.strategy + (" (with a ladder record)" if data.ladder is not None
                                                  and not data.ladder_sweep else "")),
             ("objective", f"{data.objective} ({data.direction})"),
             ("margin that matters", f"{cfg.search.margin_value(cfg.model.task):g} of {data.objective}: a gain must be "
                                     "shown above it; a cheaper configuration is recommended only when shown within it "
                                     "of the best"),
             ("seeds per configuration", data.seeds),
             ("trials", f"{len(data.trials)}: {counts}"), ("configurations with a COMPLETE trial", len(data.configs)),
             ("MLflow parent run", data.parent_run_id or "–")]
    stages = sorted({t.stage for t in data.trials if t.stage is not None})
    if stages:
        by_stage = ", ".join(f"stage {s} ({STAGES.get(s, s)}): {sum(1 for t in data.trials if t.stage == s)}"
                             for s in stages)
        facts.append(("trials by ladder stage", by_stage))
    dl = "".join(f'<dt>{esc(k)}</dt><dd data-key="{esc(k)}">{esc(v)}</dd>' for k, v in facts)
    body = how("What was swept and what it found. The recommendation is the configuration to use; the "
               "best-quality configuration is the one with the best seed mean, whatever it costs.")
    body += f'<dl class="facts" id="facts">{dl}</dl>'
    body += "".join(note(n) for n in data.notes)
    if data.ladder is not None and not isinstance(data.ladder.get("recommendation"), dict):
        body += note(f"The rank ladder has not recommended a configuration yet (done: "
                     f"{fmt_num(bool(data.ladder.get('done')))}); the recommendation below is derived by this report.")
    body += ('<div class="cards">' + choice_card(data, data.recommendation, "recommendation", "Recommendation")
             + choice_card(data, data.best_quality, "best-quality", "Best quality") + "</div>")
    body += "<h3>The test split</h3>" + test_html(data)
    if data.ladder is not None:
        body += "<h3>The ladder's decisions</h3>" + decisions_html(data.ladder)
    page.section("summary", "Summary", body)
    page.data.update({"sweep": data.name, "objective": data.objective, "direction": data.direction,
                      "counts": data.counts, "recommendation": choice_json(data.recommendation),
                      "best_quality": choice_json(data.best_quality), "noise": data.noise,
                      "decisions": (data.ladder or {}).get("decisions"), "notes": data.notes,
                      "test": (data.test or {}).get("choices"), "test_rows": (data.test or {}).get("rows")})
