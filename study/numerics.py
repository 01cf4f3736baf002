"""
The bf16 numerics check (results/REPORT.md, "bf16 against fp32", issue 22): each bf16 run of `conv-bf16` against
its fp32 twin of `conv` (the same run but for --dtype), per cell, and the F1/F2 verdicts recomputed from bf16.

    text = markdown(compare(bf16_runs, fp32_runs))   # results/conv-bf16/numerics.md

Per cell (mode x condition) and measure, the per-seed paired difference bf16 - fp32 with its 95% t-interval:
equivalent if the interval lies inside the pre-stated margin (1 point of accuracy, 5 of ASR), different if it
excludes 0 (and is not inside the margin), inconclusive otherwise.
"""
import runspec
from study import effects, stats

MARGIN = {"acc": 1.0, "asr": 5.0}  # points, fixed in REPORT before any bf16 run


def twin_key(config):
    return runspec.run_key(config, without=("dtype",))


def compare(bf16_runs, fp32_runs):
    """{"cells": [(mode, condition, measure, effect dict, equivalence)], "verdicts": [(finding, condition, what,
    fp32 row, bf16 row)]} over the bf16 runs that have an fp32 twin."""
    fp32 = {twin_key(r["config"]): r for r in fp32_runs}
    pairs = [(r, fp32[twin_key(r["config"])]) for r in bf16_runs if twin_key(r["config"]) in fp32]
    cells = []
    for mode in ("lora", "ff"):
        arm = lambda cond, dtype: {r["config"]["seed"]: (r if dtype == "bf16" else f) for r, f in pairs
                                   if r["config"]["mode"] == mode and _is(r, cond)}
        clean_b, clean_f = arm("none", "bf16"), arm("none", "fp32")
        cells.append(_cell(mode, "clean", "accuracy", clean_b, clean_f, effects.acc, "acc"))
        for cond, name in (("upa", "UPA 0.3"), ("bpa", "BPA 0.15%")):
            b, f = arm(cond, "bf16"), arm(cond, "fp32")
            if cond == "upa":
                cells.append(_cell(mode, name, "accuracy", b, f, effects.acc, "acc"))
                drop = lambda runs, clean: {s: effects.acc(clean[s]) - effects.acc(r) for s, r in runs.items()
                                            if s in clean}
                cells.append(_cell(mode, name, "accuracy drop", drop(b, clean_b), drop(f, clean_f), None, "acc"))
            else:
                cells.append(_cell(mode, name, "ASR", b, f, effects.asr, "asr"))
                cells.append(_cell(mode, name, "net ASR", b, f, lambda r: effects.asr(r, True), "asr"))
    bf16_rows = {_label(r): r for r in effects.effects([r for r, _ in pairs]) if r["finding"] in ("F1", "F2")}
    fp32_rows = {_label(r): r for r in effects.effects([f for _, f in pairs]) if r["finding"] in ("F1", "F2")}
    verdicts = [(*k, fp32_rows.get(k), bf16_rows[k]) for k in bf16_rows]
    return dict(cells=[c for c in cells if c is not None], verdicts=verdicts)


def _is(run, attack):
    return run["config"]["attack"] == attack


def _label(row):
    return row["finding"], row["condition"], row["what"]


def _cell(mode, condition, measure, b, f, value, unit):
    """bf16 - fp32 over the seeds both have; value(run) in points, or None when b and f already hold numbers."""
    get = value or (lambda v: v)
    seeds = sorted(set(b) & set(f))
    if len(seeds) < 2:
        return None
    e = stats.effect([get(b[s]) - get(f[s]) for s in seeds], +1, MARGIN[unit])
    return mode, condition, measure, e, equivalence(e, MARGIN[unit])


def equivalence(e, margin):
    if -margin < e["lo"] and e["hi"] < margin:
        return "equivalent"
    if e["lo"] > 0 or e["hi"] < 0:
        return "different"
    return "inconclusive"


def markdown(res):
    ci = lambda e: f"{e['mean']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}], n={e['n']}"
    lines = ["# bf16 against fp32 (the conv protocol's F1/F2 cells)", "",
             f"Per-seed paired difference bf16 - fp32 in points, 95% t-interval; margins ±{MARGIN['acc']:g} "
             f"(accuracy) and ±{MARGIN['asr']:g} (ASR), fixed before the runs.", "",
             "| mode | condition | measure | bf16 - fp32 | check |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {c} | {what} | {ci(e)} | {v} |" for m, c, what, e, v in res["cells"]]
    changed = [v for v in res["verdicts"] if v[3] is None or v[3]["verdict"] != v[4]["verdict"]]
    lines += ["", "F1/F2 verdicts recomputed from the bf16 runs (fp32: the same seeds' fp32 twins):", "",
              "| finding | condition | effect | fp32 | bf16 |", "|---|---|---|---|---|"]
    for finding, cond, what, f, b in res["verdicts"]:
        fp = f"{ci(f)}, {f['verdict']}" if f else "-"
        lines.append(f"| {finding} | {cond} | {what} | {fp} | {ci(b)}, {b['verdict']} |")
    lines += ["", f"Verdicts that bf16 changes: {len(changed)} of {len(res['verdicts'])}."]
    return "\n".join(lines)
