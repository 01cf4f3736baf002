"""
How much poison (results/REPORT.md, "How much poison", issue 51): on SST-2, how many poisoned samples each mode sees
before its backdoor works, what a user who keeps the checkpoint best on clean rows gets, and whether a 34-row backdoor
(BPA 0.05%) is learned in three epochs. From the runs of one results JSONL.

    res = dose(runs)          # None until a BPA run of one of RATES is in
    markdown(res)             # results/conv/dose.md
    verdict_rows(res)         # the verdicts table's rows
    draw(runs, path)          # results/conv/dose-sst2.png

Pre-registered on 2026-12-05, before any of the 14 runs it added:
- per run, the poisoned samples (and samples) seen at the first curve point with net ASR >= 50% and >= 80%;
- per rate, the ratio LoRA / FF of poisoned samples seen at the 50% crossing, paired by seed, as its natural log: mean,
  95% t-interval, the four verdict kinds with a no-effect margin of log 1.25. A LoRA run that never reaches 50% counts
  its poisoned samples at the end, and an FF run that reaches it at its first point counts that point: both make the
  seed's log-ratio a lower bound. An FF run that never reaches 50%, or a LoRA run at its first point, gives no ratio;
- the checkpoint a user keeps: of the intermediate evaluations, the best on the clean selection rows (--select-dev,
  rows apart from the curve's), its net ASR on the curve's rows, FF - LoRA paired (delta 5 points);
- BPA 0.05%: each mode's net ASR at the end below 50% in every seed ("not learned") or not, and F2 at the end.
"""
import math

from study import delay, effects, stats

RATES = (0.0005, 0.0015, 0.0045)  # 0.05% and 0.15% over three epochs; 0.45% from the grid's 2,500-step runs
THREE_EPOCHS = (0.0005, 0.0015)
LOW = 0.0005  # the 34-row backdoor
MARGIN = math.log(1.25)  # no effect: the ratio within 0.8-1.25
REFERENCE = math.log(2.0)  # the ratio an inconclusive cell's seeds-needed is for
LEARNED = 50.0  # net ASR (%) at the end from which a run has learned the backdoor
# the seeds whose runs had been seen when the rule was written (2026-12-05): at 0.45% the grid's, at 0.15% the `3ep`
# runs; a ratio that rests on them applies the rule after the fact (post hoc), and its cell says how many it holds
SEEN = {0.0015: (0, 1, 2), 0.0045: (0, 1, 2, 3, 4)}
MODES = delay.MODES
NAMES = {"ff": "FF", "lora": "LoRA r8"}


def pools(runs):
    """{rate: the runs its arms come from}: the three-epoch runs for 0.05% and 0.15%, SST-2's grid budget for 0.45%."""
    longer, _ = delay.long_runs(runs)
    budget = [r for r in effects.at_budget(runs) if r["config"]["task"] == "sst2"]
    return {rate: longer if rate in THREE_EPOCHS else budget for rate in RATES}


def arms(pool, rate):
    """{mode: {seed: run}}: the pool's BPA runs at `rate` (rows drawn from all rows), FF and LoRA r8."""
    return {m: effects.pick(pool, **effects.ARMS[m], attack="bpa", poison_rate=rate, poison_pool="any") for m in MODES}


def seed_ratio(ff, lora, threshold=50):
    """(log of LoRA's / FF's poisoned samples seen at the first point with net ASR >= threshold, how it stands):
    'exact', 'bounded' (a lower bound), or why there is no ratio (the log is then None)."""
    f, lo = delay.first_crossing(ff["curve"], threshold), delay.first_crossing(lora["curve"], threshold)
    if f is None:
        return None, "FF never reaches it"
    if lo == 0:
        return None, "LoRA reaches it at its first point"
    p_ff, p_lora = ff["curve"][f]["poisoned_seen"], lora["curve"][-1 if lo is None else lo]["poisoned_seen"]
    if not p_ff or not p_lora:
        return None, "no poisoned sample seen"
    return math.log(p_lora / p_ff), "bounded" if lo is None or f == 0 else "exact"


def ratio_cell(arm, threshold=50, seen=()):
    """The paired log-ratio over seeds: its effect (None under 2 seeds), verdict, each seed's (log, status), and how
    many of the seeds with a ratio are in `seen` (ran before the rule: post hoc)."""
    seeds = sorted(set(arm["ff"]) & set(arm["lora"]))
    per_seed = {s: seed_ratio(arm["ff"][s], arm["lora"][s], threshold) for s in seeds}
    logs = [v for v, _ in per_seed.values() if v is not None]
    bounded = sum(status == "bounded" for _, status in per_seed.values())
    post_hoc = sum(v is not None and s in seen for s, (v, _) in per_seed.items())
    if len(logs) < 2:
        return dict(effect=None, verdict=effects.NO_INTERVAL, per_seed=per_seed, bounded=bounded, need=None,
                    post_hoc=post_hoc)
    e = stats.effect(logs, paper_sign=+1, delta=MARGIN)
    verdict = e["verdict"]
    if bounded and verdict in ("no effect", "opposite"):  # lower bounds can only pull the interval down
        verdict = "inconclusive (bounded)"
    need = stats.seeds_needed(REFERENCE, e["sd"]) if verdict.startswith("inconclusive") and e["sd"] > 0 else None
    return dict(effect=e, verdict=verdict, per_seed=per_seed, bounded=bounded, need=need, post_hoc=post_hoc)


def kept(run):
    """The intermediate evaluation with the best clean accuracy on the selection rows (the earliest of equals), or None
    for a run without them. The final point is no candidate: its whole-dev ASR rows include the selection rows."""
    points = [p for p in run["curve"][:-1] if "sel_acc" in p]
    return max(points, key=lambda p: p["sel_acc"]) if points else None


def kept_cell(arm):
    """Net ASR FF - LoRA at the kept checkpoints, paired by seed (seeds with both kept and both nets defined)."""
    points = {m: {s: kept(r) for s, r in arm[m].items()} for m in MODES}
    seeds = [s for s in sorted(set(points["ff"]) & set(points["lora"]))
             if points["ff"][s] and points["lora"][s] and None not in (points["ff"][s]["asr_net"],
                                                                       points["lora"][s]["asr_net"])]
    diffs = [100 * (points["ff"][s]["asr_net"] - points["lora"][s]["asr_net"]) for s in seeds]
    return dict(points=points, seeds=seeds,
                effect=_asr_effect(diffs, [100 * points[m][s]["asr_net"] for m in MODES for s in seeds]))


def _asr_effect(diffs, paired_runs):
    """An ASR contrast by the `conv` rule (delta 5 points), with the seeds F2's 30 points would need if inconclusive;
    paired_runs: the ASR (points) of every run it pairs, for the saturated label (effects.at_ceiling)."""
    if len(diffs) < 2:
        return None
    e = stats.effect(diffs, paper_sign=+1, delta=effects.DELTA["asr"])
    e["saturated"] = effects.at_ceiling(paired_runs)
    ref = effects.PAPER_EFFECT["F2"]
    e["need"] = stats.seeds_needed(ref, e["sd"]) if e["verdict"] == "inconclusive" and e["sd"] > 0 else None
    return e


def learned(arm_of_mode):
    """'not learned' (net ASR at the end < LEARNED in every seed), 'learned' (>= in every seed), else 'k of n seeds'."""
    nets = [effects.asr(r, net=True) for r in arm_of_mode.values()]
    if not nets:
        return "-"
    k = sum(v >= LEARNED for v in nets if not math.isnan(v))
    return "not learned" if k == 0 else "learned" if k == len(nets) else f"learned in {k} of {len(nets)} seeds"


def dose(runs):
    """{rate: every registered quantity} for the rates with runs, and the delay contrast over every seed in
    ('delay_all', the follow-up beside the n = 3 verdict); None when no rate has runs."""
    out = {}
    for rate, pool in pools(runs).items():
        arm = arms(pool, rate)
        if not (arm["ff"] or arm["lora"]):
            continue
        nets = {m: {s: effects.asr(r, net=True) for s, r in arm[m].items()} for m in MODES}
        paired = [s for s in sorted(set(nets["ff"]) & set(nets["lora"]))
                  if not math.isnan(nets["ff"][s] - nets["lora"][s])]
        end = [nets["ff"][s] - nets["lora"][s] for s in paired]
        out[rate] = dict(arm=arm, crossing={m: {t: delay.crossings(arm[m], t) for t in delay.THRESHOLDS} for m in MODES},
                         ratio={t: ratio_cell(arm, t, SEEN.get(rate, ())) for t in delay.THRESHOLDS},
                         kept=kept_cell(arm), nets=nets,
                         end=_asr_effect(end, [nets[m][s] for m in MODES for s in paired]),
                         learned={m: learned(arm[m]) for m in MODES})
    if not out:
        return None
    every = delay.delay_or_limit(runs, seeds=None)
    e = every and every["contrasts"][("end", "net ASR")]
    more = e and e["n"] > len(delay.REGISTERED_SEEDS)  # only once seeds past the registered ones are in
    out["delay_all"] = dict(e, verdict=delay.verdict(e)) if more else None
    return out


# -----------------------------------------------------------------------------
# output

def ratio_text(cell):
    """'2.10x [1.40, 3.15], n=5, **replicated**' (geometric mean and interval of the ratio), with the bounded seeds
    and, if inconclusive, the seeds a ratio of 2 would need."""
    e = cell["effect"]
    if e is None:
        return cell["verdict"]
    text = (f"{math.exp(e['mean']):.2f}x [{math.exp(e['lo']):.2f}, {math.exp(e['hi']):.2f}], n={e['n']}, "
            f"**{cell['verdict']}**")
    if cell["bounded"]:
        text += f" ({cell['bounded']} seed{'s' * (cell['bounded'] > 1)} a lower bound)"
    if cell["post_hoc"]:
        text += (" (post hoc: " + ("every seed" if cell["post_hoc"] == e["n"] else f"{cell['post_hoc']} of {e['n']} seeds")
                 + " ran before the rule)")
    if cell["verdict"].startswith("inconclusive"):
        text += f"; seeds for a ratio of 2: {cell['need'] or '> 1000'}"
    return text


def asr_text(e):
    if e is None:
        return effects.NO_INTERVAL
    return stats.effect_text(e, bold=True) + effects.saturated_text(e) + (
        f"; seeds for 30 points: {e['need'] or '> 1000'}" if e["verdict"] == "inconclusive" else "")


def _label(rate):
    return f"BPA {100 * rate:g}%" + (" (3 epochs)" if rate in THREE_EPOCHS else " (2,500 steps)")


def verdict_rows(res):
    """The verdicts table's rows: (finding, '-' for `cpu`, the `conv` cell)."""
    if res is None:
        return []
    rows = [(f"How much poison: poisoned samples to 50% net ASR, LoRA / FF, {_label(rate)}", "-",
             ratio_text(res[rate]["ratio"][50])) for rate in RATES if rate in res]
    rows += [(f"The checkpoint a user keeps: net ASR FF - LoRA, {_label(rate)}", "-",
              asr_text(res[rate]["kept"]["effect"])) for rate in THREE_EPOCHS if rate in res]
    if LOW in res:
        low = res[LOW]
        rows.append((f"F2 over 3 epochs: net ASR FF - LoRA at the end, BPA {100 * LOW:g}%", "-", asr_text(low["end"])))
        rows.append((f"A {100 * LOW:g}% backdoor in 3 epochs (net ASR >= {LEARNED:g}% at the end)", "-",
                     f"FF: **{low['learned']['ff']}**; LoRA r8: **{low['learned']['lora']}**"))
    if res.get("delay_all"):
        e = res["delay_all"]
        rows.append(("Delay or limit, all seeds in (follow-up; the verdict above is on seeds 0-2)", "-",
                     f"3 epochs: {stats.effect_text(e, bold=True)}" + effects.saturated_text(e)))
    return rows


def markdown(res):
    lines = ["# How much poison: SST-2, BPA, FF against LoRA r8 (results/REPORT.md, \"How much poison\")", "",
             "Poisoned samples seen (samples seen, in thousands) at the first curve point with net ASR at or above "
             "each threshold; '-' = not reached. The ratio LoRA / FF at 50% is the geometric mean over seeds with "
             "its 95% interval (the registered rule: a LoRA run that never reaches 50% counts its poisoned samples "
             "at the end, a lower bound).", ""]
    for rate in RATES:
        if rate not in res:
            continue
        r = res[rate]
        lines += [f"## {_label(rate)}", "", "| seed | " + " | ".join(f"{NAMES[m]} {t}%" for m in MODES for t in delay.THRESHOLDS)
                  + " | LoRA / FF at 50% | net ASR at the end, FF / LoRA |", "|---|" + "---|" * (2 * len(delay.THRESHOLDS) + 2)]
        for s in sorted(set(r["arm"]["ff"]) | set(r["arm"]["lora"])):
            cells = []
            for m in MODES:
                for t in delay.THRESHOLDS:
                    c = r["crossing"][m][t].get(s)
                    cells.append("-" if c is None else f"{c[1]} ({c[0] / 1000:.1f}k)")
            log, status = r["ratio"][50]["per_seed"].get(s, (None, "unpaired"))
            ratio = status if log is None else f"{math.exp(log):.2f}" + (" (lower bound)" if status == "bounded" else "")
            nets = " / ".join("-" if s not in r["nets"][m] or math.isnan(r["nets"][m][s]) else f"{r['nets'][m][s]:.1f}"
                              for m in MODES)
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {ratio} | {nets} |")
        lines += ["", f"- LoRA / FF at 50%: {ratio_text(r['ratio'][50])}",
                  f"- LoRA / FF at 80% (descriptive): {ratio_text(r['ratio'][80]).replace('**', '')}",
                  f"- net ASR FF - LoRA at the end: {asr_text(r['end'])}"]
        if rate in THREE_EPOCHS:
            k = r["kept"]
            points = [f"s{s}: " + ", ".join(_kept_text(m, k["points"][m][s]) for m in MODES) for s in k["seeds"]]
            lines.append(f"- the checkpoint a user keeps (best clean accuracy on the selection rows), net ASR FF - "
                         f"LoRA: {asr_text(k['effect'])}" + ("; " + "; ".join(points) if points else
                                                             " (no run with selection rows yet)"))
        if rate == LOW:
            lines.append(f"- learned in 3 epochs (net ASR >= {LEARNED:g}% at the end): FF {r['learned']['ff']}, "
                         f"LoRA r8 {r['learned']['lora']}")
        lines.append("")
    if res.get("delay_all"):
        e = res["delay_all"]
        lines.append(f"Delay or limit over every seed in (follow-up; the registered verdict is on seeds 0-2): net ASR "
                     f"FF - LoRA at the end {stats.effect_text(e)}{effects.saturated_text(e)} by the delay rule.")
    return "\n".join(lines).rstrip()


def _kept_text(mode, p):
    return (f"{NAMES[mode]} step {p['step']:,} ({100 * p['sel_acc']:.1f}% on {p['sel_n']} rows, net ASR "
            f"{100 * p['asr_net']:.1f})")


def draw(res, path):
    """Net ASR against poisoned samples seen (left) and clean accuracy against samples seen (right), FF and LoRA, one
    colour per rate: each seed a thin line, the mean over seeds thick (each seed's curve interpolated onto a common
    axis, where every seed has points). False when there is nothing to draw."""
    if not res:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = dict(zip(RATES, ("tab:green", "tab:purple", "tab:orange")))
    for rate in RATES:
        if rate not in res:
            continue
        for mode, ls in (("ff", "-"), ("lora", "--")):
            runs = list(res[rate]["arm"][mode].values())
            if not runs:
                continue
            label = f"{NAMES[mode]} {_label(rate)} (n={len(runs)})"
            for ax, x_of, y_of in ((left, lambda p: p["poisoned_seen"], lambda p: p.get("asr_net")),
                                   (right, lambda p: p["samples"] / 1000, lambda p: p["acc"])):
                curves = [[(x_of(p), 100 * y_of(p)) for p in r["curve"] if y_of(p) is not None] for r in runs]
                for c in curves:
                    ax.plot(*zip(*c), color=colors[rate], ls=ls, lw=0.6, alpha=0.35)
                grid = np.linspace(max(c[0][0] for c in curves), min(c[-1][0] for c in curves), 200)
                mean = np.mean([np.interp(grid, *zip(*c)) for c in curves], axis=0)
                ax.plot(grid, mean, color=colors[rate], ls=ls, lw=2.2, label=label)
    left.set(xlabel="poisoned samples seen", ylabel="net ASR (%)", title="net ASR against the poison seen")
    right.set(xlabel="samples seen (thousands)", ylabel="clean accuracy (%)", title="clean accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("SST-2, BPA: FF (solid) and LoRA r8 (dashed); thin: each seed, thick: the mean over seeds. "
                 "Intermediate points on the fixed 256-row dev subset, the last on the whole dev set", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
