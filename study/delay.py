"""
Delay or limit (results/REPORT.md, "Delay or limit", issue 24): is LoRA's resistance to BPA 0.15% a delay, gone
after three epochs, or a limit? From the runs of one results JSONL: the three-epoch runs of SST-2 and, for the
2,500-step budget, the grid's runs of the same seed, mode and condition (their bit-identical prefixes).

    result = delay_or_limit(runs)      # None until three-epoch runs are in
    markdown(result)                   # results/conv/delay.md

Pre-registered, per mode: the samples and poisoned samples seen when the net ASR first reaches 50% and 80%; raw and
net ASR at the budget and at the end, FF - LoRA paired by seed at both; the clean gap; the UPA drop at both points.
The verdict on d = net ASR(FF) - net ASR(LoRA) at the end, its 95% t-interval: delay if the upper end is below 10
points, limit if the lower end is above 10, inconclusive otherwise.
"""
import math
from collections import Counter

import runspec
from study import effects, stats

MARGIN = 10.0  # points: "within 10 points of FF's"
THRESHOLDS = (50, 80)  # net ASR (%) whose first crossing is reported
BPA = dict(attack="bpa", poison_rate=0.0015)
UPA = dict(attack="upa", poison_rate=0.3)
CLEAN = dict(attack="none")


def long_runs(runs):
    """(three-epoch runs, the grid's runs they extend): SST-2 runs longer than the task's usual budget, and the runs
    that share everything with them but the length and the evaluation spacing."""
    sst2 = [r for r in runs if r["config"]["task"] == "sst2" and r.get("curve")]
    if not sst2:
        return [], []
    budget = Counter(r["config"]["steps"] for r in sst2).most_common(1)[0][0]
    longer = [r for r in sst2 if r["config"]["steps"] > budget]
    keys = {_prefix_key(r["config"]) for r in longer}
    return longer, [r for r in sst2 if r["config"]["steps"] == budget and _prefix_key(r["config"]) in keys]


def _prefix_key(config):
    return runspec.run_key(config, without=("steps", "eval_every", "seed"))


def delay_or_limit(runs):
    longer, budget = long_runs(runs)
    if not longer:
        return None
    at = {"end": longer, "budget": budget}
    arm = lambda point, mode, cond: effects.pick(at[point], **effects.ARMS[mode], **cond)
    out = dict(steps=longer[0]["config"]["steps"], budget=budget[0]["config"]["steps"] if budget else None,
               crossing={}, asr={}, contrasts={}, clean_gap={}, upa_drop={})
    for mode in ("ff", "lora"):
        out["crossing"][mode] = {t: crossings(arm("end", mode, BPA), t) for t in THRESHOLDS}
    for point in ("budget", "end"):
        for net in (False, True):
            name = f"{'net ' if net else ''}ASR"
            f, lo = arm(point, "ff", BPA), arm(point, "lora", BPA)
            out["asr"][(point, name)] = {m: _mean([effects.asr(r, net) for r in a.values()]) for m, a in
                                         (("ff", f), ("lora", lo))}
            out["contrasts"][(point, name)] = _effect(f, lo, lambda a, b: effects.asr(a, net) - effects.asr(b, net),
                                                      effects.DELTA["asr"])
        out["clean_gap"][point] = _effect(arm(point, "ff", CLEAN), arm(point, "lora", CLEAN),
                                          lambda a, b: effects.acc(a) - effects.acc(b), effects.DELTA["acc"])
        drops = {m: _drops(arm(point, m, CLEAN), arm(point, m, UPA)) for m in ("ff", "lora")}
        out["upa_drop"][point] = {m: _mean(list(d.values())) for m, d in drops.items()}
        seeds = sorted(set(drops["ff"]) & set(drops["lora"]))
        out["upa_drop"][(point, "F1")] = stats.effect([drops["lora"][s] - drops["ff"][s] for s in seeds], +1,
                                                      effects.DELTA["acc"]) if len(seeds) > 1 else None
    end = out["contrasts"][("end", "net ASR")]
    out["verdict"] = verdict(end)
    return out


def verdict(e):
    """The pre-registered rule on the end-of-training net-ASR contrast FF - LoRA."""
    if e is None:
        return "not run yet"
    if e["hi"] < MARGIN:
        return "delay"
    if e["lo"] > MARGIN:
        return "limit"
    return "inconclusive"


def crossings(arm, threshold):
    """{seed: (samples, poisoned samples seen) at the first evaluation with net ASR >= threshold, or None}."""
    out = {}
    for seed, r in sorted(arm.items()):
        hit = next((p for p in r["curve"] if p.get("asr_net") is not None and 100 * p["asr_net"] >= threshold), None)
        out[seed] = (hit["samples"], hit["poisoned_seen"]) if hit else None
    return out


def _effect(a, b, diff, delta):
    seeds = sorted(set(a) & set(b))
    return stats.effect([diff(a[s], b[s]) for s in seeds], +1, delta) if len(seeds) > 1 else None


def _drops(clean, upa):
    return {s: effects.acc(clean[s]) - effects.acc(upa[s]) for s in sorted(set(clean) & set(upa))}


def _mean(values):
    """The mean (stats.mean_std) of the defined values; None when there are none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return stats.mean_std(values)[0] if values else None


# -----------------------------------------------------------------------------
# output

def markdown(res):
    pct = lambda v: "-" if v is None else f"{v:.1f}"
    ci = lambda e: "not run yet" if e is None else \
        f"{e['mean']:+.1f} [{e['lo']:+.1f}, {e['hi']:+.1f}], n={e['n']}, {e['verdict']}"
    lines = [f"# Delay or limit: SST-2, BPA 0.15%, {res['steps']:,} steps (three epochs) against the "
             f"{res['budget'] or '?'}-step budget", "",
             f"**Verdict (pre-registered): {res['verdict']}.** Net ASR FF - LoRA at the end: "
             f"{ci(res['contrasts'][('end', 'net ASR')])} (delay: upper end < {MARGIN:g}; limit: lower end > "
             f"{MARGIN:g}).", "",
             "| point | measure | FF | LoRA r8 | FF - LoRA, paired |", "|---|---|---|---|---|"]
    for point in ("budget", "end"):
        for name in ("ASR", "net ASR"):
            v = res["asr"][(point, name)]
            lines.append(f"| {point} | {name} (%) | {pct(v['ff'])} | {pct(v['lora'])} | "
                         f"{ci(res['contrasts'][(point, name)])} |")
        lines.append(f"| {point} | clean accuracy gap | | | {ci(res['clean_gap'][point])} |")
        d = res["upa_drop"][point]
        lines.append(f"| {point} | UPA 0.3 drop (points) | {pct(d['ff'])} | {pct(d['lora'])} | F1 (LoRA's extra "
                     f"drop): {ci(res['upa_drop'][(point, 'F1')])} |")
    lines += ["", "First evaluation with net ASR at or above a threshold, per seed: samples seen (poisoned samples "
              "seen); '-' = not reached.", "", "| mode | " + " | ".join(f"{t}%" for t in THRESHOLDS) + " |",
              "|---|" + "---|" * len(THRESHOLDS)]
    for mode in ("ff", "lora"):
        cells = []
        for t in THRESHOLDS:
            seeds = res["crossing"][mode][t]
            cells.append("; ".join(f"s{s}: " + (f"{c[0]:,} ({c[1]})" if c else "-") for s, c in seeds.items()))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
