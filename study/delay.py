"""
Delay or limit (results/REPORT.md, "Delay or limit", issue 24): is LoRA's resistance to BPA 0.15% a delay, gone
after three epochs, or a limit? From the runs of one results JSONL: the three-epoch runs of SST-2 and, for the
2,500-step budget, the grid's runs of the same seed, mode and condition (their bit-identical prefixes).

    result = delay_or_limit(runs)      # None until three-epoch runs are in
    markdown(result)                   # results/conv/delay.md

Pre-registered, per mode: the samples and poisoned samples seen when the net ASR first reaches 50% and 80%; raw and
net ASR at the budget and at the end, FF - LoRA paired by seed at both; the clean gap; the UPA drop at both points.
The verdict on d = net ASR(FF) - net ASR(LoRA) at the end, its 95% t-interval: delay if it lies within +-10 points,
limit if its lower end is above 10, opposite if its upper end is below -10, inconclusive otherwise (amended
2026-12-01, before any three-epoch run: the first text read "delay if the upper end is below 10", which also called
a LoRA that ends far more backdoored than FF a delay).
"""
import math
from collections import Counter

import runspec
from study import calibrate, effects, stats

MARGIN = 10.0  # points: "within 10 points of FF's"
THRESHOLDS = (50, 80)  # net ASR (%) whose first crossing is reported
BPA = dict(attack="bpa", poison_rate=0.0015)
UPA = dict(attack="upa", poison_rate=0.3)
CLEAN = dict(attack="none")
MODES = ("ff", "lora")
# the seeds the verdict was registered on; seeds 3-4 (issue 51's follow-up, 2026-12-05) give the n = 5 interval that
# study/dose.py reports beside it, never instead of it
REGISTERED_SEEDS = (0, 1, 2)


def long_runs(runs):
    """(three-epoch runs, the grid's runs they extend): SST-2 runs longer than the task's usual budget (calibration
    runs left out), and the runs that share everything with them, seed included, but the length and the evaluation
    spacing."""
    sst2 = [r for r in runs if r["config"]["task"] == "sst2" and r.get("curve") and not calibrate.is_calibration(r)]
    if not sst2:
        return [], []
    budget = Counter(r["config"]["steps"] for r in sst2).most_common(1)[0][0]
    longer = [r for r in sst2 if r["config"]["steps"] > budget]
    keys = {_prefix_key(r["config"]) for r in longer}
    return longer, [r for r in sst2 if r["config"]["steps"] == budget and _prefix_key(r["config"]) in keys]


def _prefix_key(config):
    return runspec.run_key(config, without=("steps", "eval_every"))


def delay_or_limit(runs, seeds=REGISTERED_SEEDS):
    """Every pre-registered quantity, each as {mode: {seed: value}} beside its paired contrast, over `seeds` (None:
    every seed in); None before the three-epoch runs."""
    longer, budget = long_runs(runs)
    if seeds is not None:
        longer = [r for r in longer if r["config"]["seed"] in seeds]
    if not longer:
        return None
    at = {"end": longer, "budget": budget}
    arm = lambda point, mode, cond: effects.pick(at[point], **effects.ARMS[mode], **cond)
    out = dict(steps=longer[0]["config"]["steps"], budget=budget[0]["config"]["steps"] if budget else None,
               crossing={}, asr={}, contrasts={}, clean={}, clean_gap={}, upa_drop={}, f1={})
    for mode in MODES:
        out["crossing"][mode] = {t: crossings(arm("end", mode, BPA), t) for t in THRESHOLDS}
    for point in ("budget", "end"):
        for net in (False, True):
            name = f"{'net ' if net else ''}ASR"
            v = {m: {s: effects.asr(r, net) for s, r in arm(point, m, BPA).items()} for m in MODES}
            out["asr"][(point, name)] = v
            e = out["contrasts"][(point, name)] = _paired(v["ff"], v["lora"], effects.DELTA["asr"])
            if e:  # REPORT.md's label, as in effects.md: every paired run at the ceiling
                e["saturated"] = effects.at_ceiling(v[m][s] for m in MODES for s in v["ff"] if s in v["lora"])
        clean = {m: {s: effects.acc(r) for s, r in arm(point, m, CLEAN).items()} for m in MODES}
        out["clean"][point] = clean
        out["clean_gap"][point] = _paired(clean["ff"], clean["lora"], effects.DELTA["acc"])
        drops = {m: {s: clean[m][s] - effects.acc(r) for s, r in arm(point, m, UPA).items() if s in clean[m]}
                 for m in MODES}
        out["upa_drop"][point] = drops
        out["f1"][point] = _paired(drops["lora"], drops["ff"], effects.DELTA["acc"])  # LoRA's extra drop
    out["verdict"] = verdict(out["contrasts"][("end", "net ASR")])
    return out


def verdict(e):
    """The pre-registered rule on the end-of-training net-ASR contrast FF - LoRA: delay if its interval lies within
    +-10 points, limit if it lies above +10, opposite if below -10 (LoRA ends the more backdoored)."""
    if e is None:
        return effects.NO_INTERVAL
    if -MARGIN < e["lo"] and e["hi"] < MARGIN:
        return "delay"
    if e["lo"] > MARGIN:
        return "limit"
    if e["hi"] < -MARGIN:
        return "opposite"
    return "inconclusive"


def crossings(arm, threshold):
    """{seed: (samples, poisoned samples seen) at the first evaluation with net ASR >= threshold, or None}."""
    out = {}
    for seed, r in sorted(arm.items()):
        i = first_crossing(r["curve"], threshold)
        out[seed] = None if i is None else (r["curve"][i]["samples"], r["curve"][i]["poisoned_seen"])
    return out


def first_crossing(curve, threshold):
    """The index of the first curve point with net ASR >= threshold (%), or None."""
    return next((i for i, p in enumerate(curve) if p.get("asr_net") is not None and 100 * p["asr_net"] >= threshold),
                None)


def _paired(a, b, delta):
    """a - b paired by seed ({seed: value} each), its 95% t-interval and verdict; None under two pairs."""
    seeds = sorted(set(a) & set(b))
    return stats.effect([a[s] - b[s] for s in seeds], +1, delta) if len(seeds) > 1 else None


def _mean(values):
    """The mean (stats.mean_std) of the defined values; None when there are none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return stats.mean_std(values)[0] if values else None


# -----------------------------------------------------------------------------
# output

def markdown(res):
    ci = lambda e: effects.NO_INTERVAL if e is None else stats.effect_text(e) + effects.saturated_text(e)
    gap = res["clean_gap"]["end"]
    fit = effects.NO_INTERVAL if gap is None else ("reached" if abs(gap["mean"]) <= 1 else "not reached")
    lines = [f"# Delay or limit: SST-2, BPA 0.15%, {res['steps']:,} steps (three epochs) against the "
             f"{format(res['budget'], ',') if res['budget'] else '?'}-step budget", "",
             f"**Verdict (pre-registered): {res['verdict']}.** Net ASR FF - LoRA at the end: "
             f"{ci(res['contrasts'][('end', 'net ASR')])} (delay: the interval within +-{MARGIN:g}; limit: its lower "
             f"end above {MARGIN:g}; opposite: its upper end below -{MARGIN:g}).", "",
             f"Matched fit at the end (|clean gap FF - LoRA| <= 1 point): {fit}.", "",
             "Each cell: the mean over seeds, then each seed's value (s0, s1, ...).", "",
             "| point | measure | FF | LoRA r8 | FF - LoRA, paired |", "|---|---|---|---|---|"]
    for point in ("budget", "end"):
        for name in ("ASR", "net ASR"):
            v = res["asr"][(point, name)]
            lines.append(f"| {point} | {name} (%) | {_seeds(v['ff'])} | {_seeds(v['lora'])} | "
                         f"{ci(res['contrasts'][(point, name)])} |")
        c = res["clean"][point]
        lines.append(f"| {point} | clean accuracy (%) | {_seeds(c['ff'])} | {_seeds(c['lora'])} | "
                     f"{ci(res['clean_gap'][point])} |")
        d = res["upa_drop"][point]
        lines.append(f"| {point} | UPA 0.3 drop (points) | {_seeds(d['ff'])} | {_seeds(d['lora'])} | F1 (LoRA's extra "
                     f"drop, LoRA - FF): {ci(res['f1'][point])} |")
    lines += ["", "First evaluation with net ASR at or above a threshold: samples seen (poisoned samples seen), the mean "
              "over seeds (only when every seed reaches it), then each seed; '-' = not reached.", "",
              "| mode | " + " | ".join(f"{t}%" for t in THRESHOLDS) + " |", "|---|" + "---|" * len(THRESHOLDS)]
    for mode in MODES:
        cells = []
        for t in THRESHOLDS:
            seeds = res["crossing"][mode][t]
            hits = list(seeds.values())
            mean = (f"{_mean([c[0] for c in hits]):,.0f} ({_mean([c[1] for c in hits]):.0f}); "
                    if hits and all(hits) else "")
            cells.append(mean + "; ".join(f"s{s}: " + (f"{c[0]:,} ({c[1]})" if c else "-") for s, c in seeds.items()))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seeds(values):
    """'mean (s0, s1, ...)' of {seed: value}; '-' for an undefined value."""
    if not values:
        return "-"
    pct = lambda v: "-" if v is None or math.isnan(v) else f"{v:.1f}"
    return f"{pct(_mean(list(values.values())))} ({', '.join(pct(values[s]) for s in sorted(values))})"
