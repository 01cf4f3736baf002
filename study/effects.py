"""
The paper's findings as per-seed paired effects, each with its 95% t-interval, n and verdict (study/stats.py), and the
curves over training, from the runs of one results JSONL (any protocol).

    rows = effects(runs)                         # one dict per (finding, task, condition)
    markdown(rows)                               # the table REPORT.md quotes
    draw_curves(runs, "sst2", "results/conv/curves-sst2.png")
    draw_zoo_curves(runs, "results/conv/zoo-curves.png")

Two runs are paired when they share a seed and a context: every setting except the arm fields below (mode, lr,
the LoRA settings, the attack) is equal. Effects are in points (percent), oriented so that + is the paper's
direction:
    F1  (LoRA's drop clean -> UPA) - (FF's drop)                       the paper: LoRA hurt more, +
    F2  ASR_FF - ASR_LoRA, raw and net of false positives              the paper: LoRA resists more, +
    F3  UPA: drop(rank lo) - drop(rank hi); BPA: ASR(hi) - ASR(lo)     the paper: higher rank, less UPA drop, more ASR
    F4  BPA: ASR(k hi) - ASR(k lo); UPA: drop(k lo) - drop(k hi)       Sec. 3.3: smaller Var(A), lower ASR, more drop
    zoo each init minus the baseline (kaiming k = 1/3): no paper direction, so + is only "higher than baseline"

For the init zoo it also asks whether the NTK at initialisation (study/ntk_study.py inits) predicts the robustness each
init shows after training: Spearman's rho across inits with its exact p-value and a bootstrap interval (study/stats.py).
"""
import math
import textwrap
from collections import Counter, defaultdict

import runspec
from study import stats, sweep

ARM_FIELDS = ("mode", "lr", *runspec.LORA_ONLY, "attack", "poison_rate", "poison_pool", "trigger", "target_label", "seed")
BASELINE = dict(mode="lora", rank=8, alpha=16.0, rslora=False, init="kaiming_uniform", init_scale=1 / 3)
DELTA = {"acc": 2.0, "asr": 5.0}  # the 'no effect' margins, in points (REPORT.md)
CEILING = 90.0  # ASR (points) at or above which, in every paired run of a contrast, the contrast shows saturation
# the paper's effect sizes where its text gives one (its figures are not in our copy): F1 from its 5-seed SST-2
# numbers at UPA 0.3 (91.3 vs 90.8), F2 from "up to 30% improvement"; otherwise a reference effect of 2 x delta
PAPER_EFFECT = {"F1": 0.5, "F2": 30.0}
# F1 on QNLI and QQP: the paper says only that its gap is "more pronounced" there than on SST-2, and its figure is not
# in our copy, so the reference is 2 x delta = 4 points (fixed 2026-12-01, before any attacked run of these tasks);
# the same for MRPC and RTE, where the paper gives no number either (fixed 2026-12-05, before any run of them)
PAPER_EFFECT_ON = {("F1", task): 4.0 for task in (*sweep.PAIR_TASKS, *sweep.SMALL_TASKS)}


def context(config):
    """Everything that must be equal for two runs to be compared: the run's identity less the arm fields."""
    return runspec.run_key(config, without=ARM_FIELDS)


def _main_context(runs):
    """The context most of these runs share: the grid's, not a stray run's."""
    return Counter(context(r["config"]) for r in runs).most_common(1)[0][0]


def pick(runs, **want):
    """{seed: run} of the runs whose config has these values (floats equal to 1e-6 relative); one run per seed."""
    out = {}
    for r in runs:
        c = runspec.complete(r["config"])
        if all(_same(c.get(k), v) for k, v in want.items()):
            if c["seed"] in out:
                raise ValueError(f"two runs answer {want} for seed {c['seed']} in one context: "
                                 f"{out[c['seed']]['config']} and {c}")
            out[c["seed"]] = r
    return out


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def num(v):
    """A recorded number as arithmetic uses it: an undefined one (null; NaN in lines before 2026-12-01) is nan."""
    return math.nan if v is None else v


def acc(r):
    return 100 * r["metrics"]["clean"]["acc"]


def asr(r, net=False):
    m = r["metrics"]
    return 100 * num(m["asr_net"]) if net else 100 * m["asr"]


def asr_during(r):
    """Net ASR during training (exploratory, defined 2026-11-30 after seed 0 of the zoo): the mean over the evenly
    spaced intermediate evaluations on the fixed dev subset, i.e. the area under the net-ASR curve per sample seen
    (the last curve point, on the whole dev set, is left out). None for a run without them."""
    points = r.get("curve", [])[:-1]
    if not points or not all("asr_net" in p for p in points):
        return None
    return 100 * sum(num(p["asr_net"]) for p in points) / len(points)


def _row(finding, task, condition, what, diffs, sign, unit, saturated=False):
    if len(diffs) < 2:  # fewer than two paired seeds: no interval to report
        return None
    e = stats.effect(diffs, paper_sign=sign, delta=DELTA[unit])
    ref = PAPER_EFFECT_ON.get((finding, task), PAPER_EFFECT.get(finding, 2 * DELTA[unit]))
    need = stats.seeds_needed(ref, e["sd"]) if e["n"] > 1 and e["sd"] > 0 else None
    return dict(finding=finding, task=task, condition=condition, what=what, ref=ref, seeds_needed=need,
                saturated=saturated, **e)


def at_ceiling(values):
    """Whether every ASR (points) of a contrast's paired runs is at the ceiling: its cell then reads SATURATED."""
    return all(v >= CEILING for v in values)


def _saturated(arms, net=False):
    """Whether every paired run of an ASR contrast is at the ceiling: its 'no effect' is then saturation."""
    return at_ceiling(_paired(arms, lambda s: min(asr(r, net) for r in s.values())))


def _paired(arms, value):
    """value(runs of one seed) over the seeds that every arm has, in seed order."""
    seeds = sorted(set.intersection(*(set(a) for a in arms.values()))) if arms else []
    return [value({k: a[s] for k, a in arms.items()}) for s in seeds]


# -----------------------------------------------------------------------------
# the findings

def effects(runs):
    """Every measurable finding in these runs, one row per (finding, task, condition)."""
    rows = []
    budget = _budgets(runs)
    for group in _groups(runs):
        task, steps = group[0]["config"]["task"], group[0]["config"]["steps"]
        found = _f1(group, task) + _f2(group, task) + _sweep(group, task, "F3") + _sweep(group, task, "F4")
        found = [r for r in found + _zoo(group, task) if r is not None]
        if steps != budget[task]:  # e.g. the three-epoch runs beside the 2,500-step grid: named by their length
            for r in found:
                r["condition"] += f", {steps:,} steps"
        rows += found
    return rows


def _groups(runs):
    """The runs grouped by context (the runs of one group can be paired)."""
    by_context = defaultdict(list)
    for r in runs:
        by_context[context(r["config"])].append(r)
    return list(by_context.values())


def _budgets(runs):
    """{task: the step count most of its runs have}: the grid's budget."""
    return {task: Counter(r["config"]["steps"] for r in runs if r["config"]["task"] == task).most_common(1)[0][0]
            for task in {r["config"]["task"] for r in runs}}


def at_budget(runs):
    """The runs at their task's grid budget: runs of another length (the three-epoch runs) left out."""
    budget = _budgets(runs)
    return [r for r in runs if r["config"]["steps"] == budget[r["config"]["task"]]]


def _rates(group, attack):
    return sorted({r["config"]["poison_rate"] for r in group if r["config"]["attack"] == attack})


def _f1(group, task):
    out = []
    for rate in _rates(group, "upa"):
        arms = dict(lc=pick(group, **BASELINE, attack="none"), lu=pick(group, **BASELINE, attack="upa", poison_rate=rate),
                    fc=pick(group, mode="ff", attack="none"), fu=pick(group, mode="ff", attack="upa", poison_rate=rate))
        d = _paired(arms, lambda s: (acc(s["lc"]) - acc(s["lu"])) - (acc(s["fc"]) - acc(s["fu"])))
        out.append(_row("F1", task, f"UPA {rate:g}", "extra accuracy drop of LoRA", d, +1, "acc"))
    return out


# F2's backdoors: BadNets (Sec. 4.2) and Tab. E.1's four, with the names the paper gives them
BACKDOORS = {"bpa": "BPA", "clbpa": "CL-BPA", "ilbpa": "IL-BPA", "mt": "MT", "sbpa": "S-BPA"}


def _f2(group, task):
    out = []
    for attack, name in BACKDOORS.items():
        for rate in _rates(group, attack):
            arms = dict(f=pick(group, mode="ff", attack=attack, poison_rate=rate),
                        l=pick(group, **BASELINE, attack=attack, poison_rate=rate))
            cond = f"{name} {100 * rate:g}%"
            out.append(_row("F2", task, cond, "ASR FF - LoRA",
                            _paired(arms, lambda s: asr(s["f"]) - asr(s["l"])), +1, "asr", _saturated(arms)))
            if all("asr_net" in r["metrics"] for a in arms.values() for r in a.values()):
                out.append(_row("F2", task, cond, "net ASR FF - LoRA",
                                _paired(arms, lambda s: asr(s["f"], True) - asr(s["l"], True)), +1, "asr",
                                _saturated(arms, True)))
    return out


def _sweep(group, task, finding):
    """F3 (rank, with alpha/r and with rsLoRA) and F4 (k): the smallest against the largest swept value."""
    field = "rank" if finding == "F3" else "init_scale"
    fixed = {k: v for k, v in BASELINE.items() if k not in (field, "alpha", "rslora")}
    out = []
    for rslora in ((False, True) if finding == "F3" else (False,)):
        lora = [r for r in group if r["config"]["mode"] == "lora" and r["config"]["rslora"] == rslora
                and all(_same(r["config"].get(k), v) for k, v in fixed.items())
                and (finding == "F3" or r["config"]["rank"] == 8)]
        values = sorted({r["config"][field] for r in lora})
        if len(values) < 2:
            continue
        lo, hi = values[0], values[-1]
        tag = f"{field} {lo:g} vs {hi:g}" + (" (rsLoRA)" if rslora else "")
        at = lambda v, **a: pick([r for r in lora if _same(r["config"][field], v)], **a)
        for rate in _rates(lora, "upa"):
            arms = dict(cl=at(lo, attack="none"), ul=at(lo, attack="upa", poison_rate=rate),
                        ch=at(hi, attack="none"), uh=at(hi, attack="upa", poison_rate=rate))
            drop = lambda s, x: acc(s["c" + x]) - acc(s["u" + x])  # F3: low rank drops more; F4: small k does
            out.append(_row(finding, task, f"UPA {rate:g}, {tag}", f"drop({lo:g}) - drop({hi:g})",
                            _paired(arms, lambda s: drop(s, "l") - drop(s, "h")), +1, "acc"))
        for rate in _rates(lora, "bpa"):
            arms = dict(l=at(lo, attack="bpa", poison_rate=rate), h=at(hi, attack="bpa", poison_rate=rate))
            out.append(_row(finding, task, f"BPA {100 * rate:g}%, {tag}", f"ASR({hi:g}) - ASR({lo:g})",
                            _paired(arms, lambda s: asr(s["h"]) - asr(s["l"])), +1, "asr", _saturated(arms)))
    return out


def _zoo(group, task):
    """Each non-baseline init at rank 8 against the kaiming baseline: CACC, UPA drop, raw and net ASR."""
    base = {k: v for k, v in BASELINE.items() if k != "init"}
    inits = sorted({r["config"]["init"] for r in group if r["config"]["mode"] == "lora"} - {"kaiming_uniform"})
    out = []
    for init in inits:
        arm = lambda i, **a: pick(group, **base, init=i, **a)
        cond = dict(attack="none")
        arms = dict(b=arm("kaiming_uniform", **cond), x=arm(init, **cond))
        out.append(_row("zoo", task, init, "clean CACC init - baseline", _paired(arms, lambda s: acc(s["x"]) - acc(s["b"])), +1, "acc"))
        for rate in _rates(group, "upa"):
            arms = dict(bc=arm("kaiming_uniform", attack="none"), bu=arm("kaiming_uniform", attack="upa", poison_rate=rate),
                        xc=arm(init, attack="none"), xu=arm(init, attack="upa", poison_rate=rate))
            d = _paired(arms, lambda s: (acc(s["xc"]) - acc(s["xu"])) - (acc(s["bc"]) - acc(s["bu"])))
            out.append(_row("zoo", task, f"{init}, UPA {rate:g}", "UPA drop init - baseline", d, +1, "acc"))
        for rate in _rates(group, "bpa"):
            arms = dict(b=arm("kaiming_uniform", attack="bpa", poison_rate=rate), x=arm(init, attack="bpa", poison_rate=rate))
            for net in (False, True):
                if net and not all("asr_net" in r["metrics"] for a in arms.values() for r in a.values()):
                    continue
                out.append(_row("zoo", task, f"{init}, BPA {100 * rate:g}%", ("net " if net else "") + "ASR init - baseline",
                                _paired(arms, lambda s: asr(s["x"], net) - asr(s["b"], net)), +1, "asr",
                                _saturated(arms, net)))
            if all(asr_during(r) is not None for a in arms.values() for r in a.values()):
                out.append(_row("zoo", task, f"{init}, BPA {100 * rate:g}%", "net ASR during training init - baseline",
                                _paired(arms, lambda s: asr_during(s["x"]) - asr_during(s["b"])), +1, "asr"))
    return out


# -----------------------------------------------------------------------------
# the init zoo: does the NTK at initialisation predict the robustness an init shows after training?

# Init-time quantities from `study/ntk_study.py inits` (per layer: q and v weights against A and B), each with the sign of
# its correlation with backdoor ASR that the paper's argument predicts: a LoRA whose kernel is closer to FF's (larger,
# better aligned, more information) should behave more like FF, i.e. learn the backdoor more and the flipped labels
# less (Sec. 3.2-3.3).
ZOO_PREDICTORS = (
    ("1 - alignment with FF's NTK", lambda d: d["misalign"], -1),
    ("kernel scale ‖K_LoRA‖/‖K_FF‖", lambda d: d["norm_ratio"], +1),
    ("IB", lambda d: d["lora"]["ib"], +1),
    ("H_1", lambda d: d["lora"]["h1"], +1),
)
SIGN_TEXT = {1: "+", -1: "-", 0: "none"}  # a predicted sign, as the tables print it


def zoo_targets(upa, bpa_rates, during_rates=()):
    """The robustness measures, each a dict: label, sign (relative to ASR's under the paper's argument; clean CACC
    has none), what it measures (kind, rate, net) and the (condition, what) of its paired row from _zoo. The rates in
    during_rates add the exploratory net ASR during training (asr_during), last."""
    out = [dict(label="clean CACC", sign=0, kind="cacc", paired=("", "clean CACC init - baseline"))]
    if upa is not None:
        out.append(dict(label="UPA drop", sign=-1, kind="drop", rate=upa, paired=(f", UPA {upa:g}", "UPA drop init - baseline")))
    for rate in bpa_rates:
        for net in (False, True):
            what = ("net " if net else "") + "ASR"
            out.append(dict(label=f"{what} {100 * rate:g}%", sign=+1, kind="asr", rate=rate, net=net,
                            paired=(f", BPA {100 * rate:g}%", f"{what} init - baseline")))
    for rate in during_rates:
        out.append(dict(label=f"net ASR during training {100 * rate:g}% (exploratory)", sign=+1, kind="during", rate=rate,
                        paired=(f", BPA {100 * rate:g}%", "net ASR during training init - baseline")))
    return out


def zoo_group(runs, task="sst2"):
    """(runs, arms, zoo) of the zoo grid: the runs of its context on the seeds the other inits ran, {init or 'ff': the
    arm's config values} (the baseline first, FF last) and the non-baseline LoRA runs; ([], {}, []) where no other
    init has run. The baseline and FF have more seeds (F1/F2's 5); only the zoo's seeds enter, so every init's mean is
    over the same seeds, which share their data order."""
    runs = [r for r in runs if r["config"]["task"] == task]
    zoo = [r for r in runs if r["config"]["mode"] == "lora" and r["config"]["init"] != "kaiming_uniform"]
    if not zoo:
        return [], {}, []
    main, seeds = _main_context(zoo), {r["config"]["seed"] for r in zoo}
    group = [r for r in runs if context(r["config"]) == main and r["config"]["seed"] in seeds]
    base = {k: v for k, v in BASELINE.items() if k != "init"}
    inits = sorted({r["config"]["init"] for r in group if r["config"]["mode"] == "lora"}, key=lambda i: (i != "kaiming_uniform", i))
    return group, {**{i: dict(base, init=i) for i in inits}, "ff": dict(mode="ff")}, zoo


def zoo_measurements(runs, task="sst2"):
    """({init or 'ff': {target label: [per-seed value]}}, targets) of the rank-8 inits in the zoo grid's context,
    with FF of that context as the reference; ({}, []) without at least 3 inits. Every BPA rate the zoo ran is a
    target, highest first; where its runs record curves, so is the net ASR during training (exploratory)."""
    group, arms, zoo = zoo_group(runs, task)
    if not zoo:
        return {}, []
    during = {r["config"]["poison_rate"] for r in zoo if r["config"]["attack"] == "bpa" and asr_during(r) is not None}
    targets = zoo_targets(max(_rates(zoo, "upa"), default=None), sorted(_rates(zoo, "bpa"), reverse=True),
                          sorted(during, reverse=True))
    out = {name: {t["label"]: _robustness(group, want, t) for t in targets} for name, want in arms.items()}
    out = {k: v for k, v in out.items() if v["clean CACC"]}
    return (out, targets) if len(set(out) - {"ff"}) >= 3 else ({}, [])


def _robustness(group, want, target):
    """Per-seed values of one target for the runs of one arm."""
    clean = pick(group, **want, attack="none")
    if target["kind"] == "cacc":
        return [acc(r) for _, r in sorted(clean.items())]
    if target["kind"] == "drop":
        flipped = pick(group, **want, attack="upa", poison_rate=target["rate"])
        return [acc(clean[s]) - acc(flipped[s]) for s in sorted(set(clean) & set(flipped))]
    backdoor = pick(group, **want, attack="bpa", poison_rate=target["rate"])
    if target["kind"] == "during":
        return [v for _, r in sorted(backdoor.items()) if (v := asr_during(r)) is not None]
    return [asr(r, target["net"]) for _, r in sorted(backdoor.items()) if not target["net"] or "asr_net" in r["metrics"]]


def zoo_predictors(theory_rows):
    """{init: {predictor: [per-draw value]}} from study/ntk_study.py inits' rows (its 'layers' comparison)."""
    out = defaultdict(lambda: defaultdict(list))
    for row in theory_rows:
        for label, get, _ in ZOO_PREDICTORS:
            out[row["init"]][label].append(get(row["sets"]["layers"]))
    return out


def zoo_correlations(measured, targets, predictors):
    """One row per (target, predictor): Spearman's rho over the inits that have both (n), its exact permutation
    p-value, a 95% bootstrap interval over seeds and draws, and the sign the paper's argument predicts."""
    rows = []
    for t in targets:
        for label, _, sign in ZOO_PREDICTORS:
            inits = [i for i in measured if i != "ff" and i in predictors and measured[i][t["label"]]]
            if len(inits) < 3:
                continue
            xs, ys = [predictors[i][label] for i in inits], [measured[i][t["label"]] for i in inits]
            x, y = [sum(v) / len(v) for v in xs], [sum(v) / len(v) for v in ys]
            rows.append(dict(target=t["label"], predictor=label, n=len(inits), rho=stats.spearman(x, y),
                             p=stats.spearman_p(x, y), ci=stats.spearman_interval(xs, ys),
                             predicted=sign * t["sign"], seeds=min(len(v) for v in ys),
                             exploratory=t["kind"] == "during"))
    return rows


def zoo_markdown(measured, targets, correlations, rows):
    """The zoo's per-init table (mean ± sd over seeds, and each init minus the baseline as a paired effect) and the
    correlations of the init-time NTK quantities with it, one row each."""
    return zoo_table(measured, targets, rows) + "\n\n" + zoo_correlation_table(correlations)


def zoo_summary(measured, targets, correlations, rows):
    """What REPORT.md quotes: the per-init table, and the correlations as one verdict per (target, predictor)."""
    return zoo_table(measured, targets, rows) + "\n\n" + zoo_verdict_matrix(correlations)


def zoo_verdict(c):
    """The rule fixed before any zoo run (REPORT.md): p < 0.05 in the predicted direction 'predicts', against it
    'opposite'; otherwise 'no evidence either way' (at 7 inits only |rho| >= 0.79 reaches p < 0.05). A target with
    no predicted sign (clean CACC) is only 'related' or not; one where every init has one value has no ranks."""
    if math.isnan(c["rho"]):
        return "all inits equal"
    if c["p"] >= 0.05:
        return "no evidence either way"
    if c["predicted"] == 0:
        return "related"
    return "predicts" if c["rho"] * c["predicted"] > 0 else "opposite"


def zoo_table(measured, targets, rows):
    """One row per init: each target's mean ± sd (n) and, where paired runs exist, the init minus the baseline."""
    paired = {(r["condition"], r["what"]): r for r in rows if r["finding"] == "zoo"}
    head = ["init"] + [f"{t['label']} (%)" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init, values in measured.items():
        cells = [init + (" (baseline)" if init == "kaiming_uniform" else " (reference)" if init == "ff" else "")]
        for t in targets:
            v = values[t["label"]]
            e = paired.get((init + t["paired"][0], t["paired"][1]))
            cells.append((f"{stats.spread_text(*stats.mean_std(v), len(v))} (n={len(v)})" if v else "-")
                         + ("; " + stats.interval_text(e) if e else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zoo_correlation_table(correlations):
    lines = ["| robustness | init-time quantity | predicted sign | rho | n inits | fewest seeds | exact p | "
             "95% bootstrap interval |", "|---|---|---|---|---|---|---|---|"]
    for c in correlations:
        sign = SIGN_TEXT[c["predicted"]]
        head = f"| {c['target']} | {c['predictor']} | {sign} |"
        if math.isnan(c["rho"]):  # every init at one value (e.g. ASR at its 100% ceiling): no ranks to correlate
            lines.append(f"{head} - (all inits equal) | {c['n']} | {c['seeds']} | - | - |")
            continue
        lines.append(f"{head} {c['rho']:+.2f} | {c['n']} | {c['seeds']} | {c['p']:.3f} | "
                     f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] |")
    return "\n".join(lines)


def zoo_verdict_matrix(correlations):
    """One row per target, one column per init-time quantity: rho, its exact p, the sign the paper predicts and
    zoo_verdict's word."""
    if not correlations:
        return ""
    cells = {(c["target"], c["predictor"]): c for c in correlations}
    predictors = [label for label, _, _ in ZOO_PREDICTORS]
    lines = ["| robustness | " + " | ".join(predictors) + " |", "|---|" + "---|" * len(predictors)]
    for target in dict.fromkeys(c["target"] for c in correlations):
        row = [target]
        for c in (cells.get((target, label)) for label in predictors):
            if c is None:
                row.append("-")
            elif math.isnan(c["rho"]):
                row.append(zoo_verdict(c))
            else:
                row.append(f"{c['rho']:+.2f} (p {c['p']:.2f}; paper: {SIGN_TEXT[c['predicted']]}): {zoo_verdict(c)}")
        lines.append("| " + " | ".join(row) + " |")
    n = sorted({c["n"] for c in correlations})
    lines += ["", f"Spearman's rho across {'/'.join(map(str, n))} inits, exact two-sided p; 'paper' is the sign "
              "its argument predicts; its bootstrap interval and seed counts are in zoo.md, next to results.jsonl. "
              + zoo_multiplicity(correlations)]
    return "\n".join(lines)


def zoo_multiplicity(correlations):
    """How many pre-registered cells pass p < 0.05 against chance's share, and how many survive Holm's correction
    over that family (the rule itself is per cell; this says what a family of cells can yield by chance)."""
    family = [c["p"] for c in correlations if not c["exploratory"] and not math.isnan(c["p"])]
    if not family:
        return ""
    held = sum(p < 0.05 for p in family)
    adjusted = stats.holm(family)
    kept = sum(p < 0.05 for p in adjusted)
    return (f"{held} of the {len(family)} pre-registered cells {'has' if held == 1 else 'have'} p < 0.05, where "
            f"chance alone gives about {0.05 * len(family):.1f}; after Holm's correction over those {len(family)}, "
            f"{kept} {'remains' if kept == 1 else 'remain'} (smallest adjusted p {min(adjusted):.2f}).")


def draw_zoo(measured, targets, predictors, path):
    """Each robustness measure against each init-time quantity, one point per init (error bars: sd over seeds and
    draws), FF's value as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    inits = [i for i in measured if i != "ff" and i in predictors]
    fig, axes = plt.subplots(len(targets), len(ZOO_PREDICTORS), figsize=(3.3 * len(ZOO_PREDICTORS),
                             2.6 * len(targets)), squeeze=False)
    for target, row in zip((t["label"] for t in targets), axes):
        for (label, _, _), ax in zip(ZOO_PREDICTORS, row):
            for k, init in enumerate(inits):
                x, y = predictors[init][label], measured[init][target]
                if not y:
                    continue
                (mx, sx), (my, sy) = stats.mean_std(x), stats.mean_std(y)
                ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", color=f"C{k}", label=init, capsize=2)
            if measured.get("ff", {}).get(target):
                ax.axhline(stats.mean_std(measured["ff"][target])[0], color="k", ls="--", lw=0.8, label="FF")
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(textwrap.fill(f"{target} (%)", 24), fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("init zoo: robustness after training against the NTK at initialisation (mean ± sd)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.99))  # leave the title its own strip
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the saturation follow-ups (results/REPORT.md, stated before the runs they judge): a backdoor whose every run, FF
# and LoRA r8 at both of the paper's rates, sits at the ceiling (raw ASR >= CEILING) or, for Tab. E.1's attacks, at
# the floor (net ASR < FLOOR: raw ASR counts the clean model's own false positives, 7-16% on SST-2, so a backdoor
# that does nothing never reads below 10% raw) gets one more rate, labelled follow-up; judged on seeds 0-2 alone,
# once all four arms have them, so that seeds 3-4 cannot undo a decision

FLOOR = 10.0
FOLLOW_UP_RATE = {"ceiling": 0.0005, "floor": 0.015}
# MRPC and RTE (4-17 poisoned rows): a floor too, since so few rows may teach neither mode (fixed 2026-12-05)
FOLLOW_UP_RULES = {**{("bpa", task): ("ceiling",) for task in sweep.PAIR_TASKS},
                   **{("bpa", task): ("ceiling", "floor") for task in sweep.SMALL_TASKS},
                   **{(attack, "sst2"): ("ceiling", "floor") for attack in sweep.PROTOCOLS["conv"]["e1"]}}
FOLLOW_UP_SEEDS = (0, 1, 2)
PAPER_RATES = sweep.PROTOCOLS["conv"]["bpa_rates"]  # the paper's lowest and highest BPA rates


def follow_ups(runs):
    """(task, backdoor, 'ceiling' or 'floor', the rate to add) for each rule these runs trigger, at each task's step
    budget (the grid's, not the three-epoch runs')."""
    out = []
    for group in _groups(at_budget(runs)):
        task = group[0]["config"]["task"]
        for (attack, t), kinds in FOLLOW_UP_RULES.items():
            if t != task:
                continue
            arms = [pick(group, **arm, attack=attack, poison_rate=rate) for rate in PAPER_RATES
                    for arm in (dict(mode="ff"), BASELINE)]
            judged = [a[s] for a in arms for s in FOLLOW_UP_SEEDS if s in a]
            if len(judged) < len(arms) * len(FOLLOW_UP_SEEDS):
                continue
            at = {"ceiling": all(asr(r) >= CEILING for r in judged),
                  "floor": all(asr(r, net=True) < FLOOR for r in judged)}  # an undefined (nan) net ASR is not below
            out += [(task, BACKDOORS[attack], kind, FOLLOW_UP_RATE[kind]) for kind in kinds if at[kind]]
    return out


def follow_ups_apply(runs):
    """Whether any of these runs is a cell a follow-up rule judges (so the report says what the rules found)."""
    return any((r["config"]["attack"], r["config"]["task"]) in FOLLOW_UP_RULES and
               any(_same(r["config"]["poison_rate"], rate) for rate in PAPER_RATES) for r in runs)


def follow_ups_markdown(found):
    if not found:
        return ("Saturation follow-ups the stated rules call for: none so far (each is judged on seeds 0-2 of FF "
                "and LoRA r8 at both BPA rates, once they are in).")
    return "Saturation follow-ups the stated rules call for (judged on seeds 0-2):\n\n" + "\n".join(
        f"- {task}, {name}: every run {'at >= %g%% ASR' % CEILING if kind == 'ceiling' else 'below %g%% net ASR' % FLOOR}"
        f" at both rates: add {100 * rate:g}%, labelled follow-up" for task, name, kind, rate in found)


# -----------------------------------------------------------------------------
# output

SATURATED = f" (saturated: every run >= {CEILING:g}% ASR)"
NO_INTERVAL = "no interval yet (under 2 paired seeds)"  # a cell whose contrast has fewer than 2 seeds: none run, or 1


def saturated_text(e, short=False):
    """The SATURATED label (short: ' (saturated)', for the tables of one cell per task) of an effect whose paired runs
    are all at the ceiling; '' otherwise."""
    return ("" if not e.get("saturated") else " (saturated)" if short else SATURATED)


def seeds_for_reference(r):
    """For an inconclusive row, the seeds the reference effect (the paper's, else 2 x delta) would need at the
    measured noise, e.g. '12 (for 30)'; '' otherwise."""
    if r["verdict"] != "inconclusive":
        return ""
    return f"{r['seeds_needed'] or '> 1000'} (for {r['ref']:g})"


def markdown(rows):
    head = "| finding | task | condition | effect (points) | mean | 95% CI | n | verdict | seeds for the reference effect |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        need = seeds_for_reference(r) or "-"
        verdict = r["verdict"] if r["finding"] != "zoo" else {"replicated": "higher", "opposite": "lower"}.get(r["verdict"], r["verdict"])
        verdict += saturated_text(r)
        lines.append(f"| {r['finding']} | {r['task']} | {r['condition']} | {r['what']} | {r['mean']:+.2f} | "
                     f"[{r['lo']:+.2f}, {r['hi']:+.2f}] | {r['n']} | {verdict} | {need} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# across tasks: each F1/F2 cell on every task side by side (issue 23)

TASKS = ("sst2", "cola", "qnli", "qqp", "mrpc", "rte")  # the paper's six (Sec. 4.1), in the order `conv` ran them
ACROSS = (("F1", "UPA 0.3", "extra accuracy drop of LoRA", "F1: LoRA's extra accuracy drop, UPA 0.3"),
          ("F2", "BPA 0.15%", "ASR FF - LoRA", "F2: ASR FF - LoRA, BPA 0.15%"),
          ("F2", "BPA 0.15%", "net ASR FF - LoRA", "F2: net ASR FF - LoRA, BPA 0.15%"),
          ("F2", "BPA 0.45%", "ASR FF - LoRA", "F2: ASR FF - LoRA, BPA 0.45%"),
          ("F2", "BPA 0.45%", "net ASR FF - LoRA", "F2: net ASR FF - LoRA, BPA 0.45%"))


def across_tasks(rows, beside=None):
    """{title: {label: effects row}} for the F1/F2 cells of ACROSS: a label per task that has the cell, then, from
    `beside` ({model name: that model's effects rows, e.g. {"MPNet": ...}}), 'task (model)' for each of its cells."""
    sources = [(t, t, rows) for t in TASKS] + [(f"{t} ({m})", t, rs) for m, rs in (beside or {}).items() for t in TASKS]
    key, out = lambda r: (r["finding"], r["task"], r["condition"], r["what"]), {}
    for finding, cond, what, title in ACROSS:
        cells = {label: next((r for r in rs if key(r) == (finding, task, cond, what)), None) for label, task, rs in sources}
        out[title] = {label: r for label, r in cells.items() if r}
    return out


def across_labels(table):
    """The rows of the across-tasks table and forest plot: every task of TASKS (one not run yet says so), then the
    other models' tasks that have a cell."""
    return list(TASKS) + list(dict.fromkeys(label for cells in table.values() for label in cells if label not in TASKS))


def across_markdown(rows, beside=None):
    table = across_tasks(rows, beside)
    labels = across_labels(table)
    lines = ["| finding | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for title, cells in table.items():
        text = [stats.effect_text(c) + saturated_text(c, short=True) if c else NO_INTERVAL
                for c in (cells.get(label) for label in labels)]
        lines.append(f"| {title} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def draw_forest(rows, path, beside=None):
    """One panel per F1/F2 cell, one row per task (and other model's task, from `beside` as in across_tasks): the
    paired effect and its 95% interval, + = the paper's direction (shaded), the no-effect margin dotted. False when
    fewer than two rows have any cell."""
    table = across_tasks(rows, beside)
    labels = across_labels(table)
    if len({label for cells in table.values() for label in cells}) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 1.2 + 0.33 * len(labels)), sharey=True)
    for ax, (title, cells) in zip(axes, table.items()):
        delta = DELTA["acc" if title.startswith("F1") else "asr"]
        for y, label in enumerate(labels):
            c = cells.get(label)
            if c:
                ax.errorbar([c["mean"]], [y], xerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]], fmt="o",
                            color="k", capsize=3)
                ax.annotate(f"n={c['n']}", (c["hi"], y), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize=7)
            else:  # said on the plot, not left as a blank row
                ax.annotate("no interval yet", (0, y), xytext=(4, 0), textcoords="offset points", va="center",
                            fontsize=7, color="gray")
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, -delta * 2), max(hi, delta * 2))
        ax.axvspan(0, ax.get_xlim()[1], color="tab:green", alpha=0.08)
        ax.axvline(0, color="k", lw=0.8)
        for x in (-delta, delta):
            ax.axvline(x, color="gray", lw=0.8, ls=":")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(textwrap.fill(title, 24), fontsize=8)
        ax.set_xlabel("points", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"F1 and F2 across tasks{' and models' if beside else ''} under conv: paired effect, 95% interval "
                 "(shaded: the paper's direction; dotted: the no-effect margin)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


ARMS = {"ff": dict(mode="ff"), "lora": BASELINE}  # the two arms of F1/F2


def curves(runs, task, attack, rate, arm):
    """One dict per evaluation point of one arm (its config values: ARMS[mode], or a zoo init's) over its seeds:
    samples, poisoned (mean poisoned samples seen), n (seeds), and the mean and std of acc, asr and asr_net (points;
    nan where absent)."""
    arm = pick([r for r in runs if r["config"]["task"] == task and r.get("curve")], **arm, attack=attack,
               **({"poison_rate": rate} if attack != "none" else {}))
    points = defaultdict(list)
    for curve in on_one_grid([r["curve"] for r in arm.values()]):
        for p in curve:
            points[p["samples"]].append(p)
    out = []
    for samples, ps in sorted(points.items()):
        if len(ps) < len(arm):  # a point that not every seed has (a run still going) would bias the mean
            continue
        point = dict(samples=samples, poisoned=sum(p["poisoned_seen"] for p in ps) / len(ps), n=len(ps))
        for metric in ("acc", "asr", "asr_net"):
            # net ASR is undefined (null) at a point where the model gets no triggered-set negative right
            v = [100 * p[metric] for p in ps if metric in p and not math.isnan(num(p[metric]))]
            point[metric], point[metric + "_sd"] = stats.mean_std(v) if v else (math.nan, math.nan)
        out.append(point)
    return out


def on_one_grid(curves):
    """The curves as they are when they share their evaluation points; else each one linearly interpolated at the
    points of the coarsest (fewest points) within its own range, so that seeds evaluated on different grids (issue 51's
    1/32 grid beside the 1/16 one) still average point by point. The values at a curve's own points are its own."""
    grids = [[p["samples"] for p in c] for c in curves]
    if len({tuple(g) for g in grids}) < 2:
        return curves
    coarse = min(grids, key=len)
    return [[_interpolated(c, x) for x in coarse if c[0]["samples"] <= x <= c[-1]["samples"]] for c in curves]


def _interpolated(curve, x):
    """The curve point at x samples: its own where it has one, else between its neighbours (an undefined value
    stays undefined)."""
    i = next(k for k, p in enumerate(curve) if p["samples"] >= x)
    if curve[i]["samples"] == x:
        return curve[i]
    a, b = curve[i - 1], curve[i]
    w = (x - a["samples"]) / (b["samples"] - a["samples"])
    mix = lambda u, v: None if u is None or v is None else u + w * (v - u)
    return {"samples": x, **{k: mix(a.get(k), b.get(k)) for k in ("poisoned_seen", "acc", "asr", "asr_net")
                             if k in a and k in b}}


def draw_curves(runs, task, path, steps=None):
    """CACC against samples seen, and ASR (raw, and net of false positives) against samples seen and against poisoned
    samples seen, per attack and rate: FF vs LoRA, mean ± std over seeds. The grid's runs, or those of one length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in runs if r["config"]["task"] == task and len(r.get("curve", ())) > 1
            and steps in (None, r["config"]["steps"])]
    if not runs:
        return False
    main = _main_context(runs)
    runs = [r for r in runs if context(r["config"]) == main]
    conds = sorted({(r["config"]["attack"], r["config"]["poison_rate"]) for r in runs
                    if r["config"]["attack"] in ("upa", "bpa")})
    if not conds:
        return False
    fig, axes = plt.subplots(len(conds), 3, figsize=(13, 3.2 * len(conds)), squeeze=False)
    for row, (attack, rate) in zip(axes, conds):
        for mode, color in (("ff", "tab:red"), ("lora", "tab:blue")):
            for cond, ls in (((attack, rate), "-"), (("none", 0.0), ":")):
                pts = curves(runs, task, cond[0], cond[1], ARMS[mode])
                if not pts:
                    continue
                x = [p["samples"] / 1000 for p in pts]
                label = f"{mode} {'clean' if cond[0] == 'none' else attack} (n={pts[-1]['n']})"
                _band(row[0], x, pts, "acc", color, ls, label)
                if attack == "bpa" and cond[0] == "bpa":
                    for metric, style in (("asr", "-"), ("asr_net", "--")):
                        name = f"{mode} {'net ' if metric == 'asr_net' else ''}ASR"
                        _band(row[1], x, pts, metric, color, style, name)
                        _band(row[2], [p["poisoned"] for p in pts], pts, metric, color, style, name)
        row[0].set_ylabel(f"{attack} {rate:g}: CACC (%)")
        row[1].set_ylabel("ASR (%)")
        row[2].set_ylabel("ASR (%)")
        row[0].set_xlabel("samples seen (thousands)")
        row[1].set_xlabel("samples seen (thousands)")
        row[2].set_xlabel("poisoned samples seen")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
        if attack != "bpa":
            row[1].set_visible(False)
            row[2].set_visible(False)
        else:
            row[1].legend(fontsize=7)
    fig.suptitle(f"{task}: curves over training, mean ± std over seeds (intermediate points: fixed dev subset; "
                 f"last point: whole dev set; dashed: ASR net of false positives)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_zoo_curves(runs, path, task="sst2"):
    """The zoo over training: per condition, CACC (clean, UPA) or net ASR (BPA) against samples seen, one line per
    init and FF (dashed, black), mean over seeds; False where the zoo has not run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    group, arms, zoo = zoo_group([r for r in runs if len(r.get("curve", ())) > 1], task)
    if not zoo:
        return False
    conds = [("none", 0.0)] + [(a, rate) for a in ("upa", "bpa") for rate in _rates(zoo, a)]
    fig, axes = plt.subplots(1, len(conds), figsize=(max(4.2 * len(conds), 6), 3.8), squeeze=False)
    for ax, (attack, rate) in zip(axes[0], conds):
        metric = "asr_net" if attack == "bpa" else "acc"
        for k, (name, arm) in enumerate(arms.items()):
            pts = curves(group, task, attack, rate, arm)
            if pts:
                ax.plot([p["samples"] / 1000 for p in pts], [p[metric] for p in pts], "--" if name == "ff" else "-",
                        color="k" if name == "ff" else f"C{k}", marker=".", label=f"{name} (n={pts[-1]['n']})")
        ax.set_title("clean" if attack == "none" else f"{attack.upper()} {100 * rate:g}%", fontsize=9)
        ax.set_ylabel("net ASR (%)" if metric == "asr_net" else "CACC (%)")
        ax.set_xlabel("samples seen (thousands)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{task}: the init zoo over training, mean over seeds\n(intermediate points: fixed dev subset; "
                 "last point: whole dev set)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _band(ax, x, pts, metric, color, ls, label):
    m, s = [p[metric] for p in pts], [p[metric + "_sd"] for p in pts]
    ax.plot(x, m, ls, color=color, marker=".", label=label)
    ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.15)
