"""
The converged protocol's rule (results/REPORT.md, "The converged protocol"): pick each mode's learning rate and the
step budget from clean calibration curves alone, before any attacked run.

    python -m study.calibrate results/conv/results.jsonl --out results/conv     # calib-sst2.md + calib-sst2.png

A curve is a run's list of evaluations [(step, clean dev accuracy), ...] on the whole dev set (train.py --eval-every).
    a(s)  = mean of the evaluations at s - 250, s, s + 250 (those that exist; at the last step the last two)
    P     = mean of the evaluations from step 3,750 on (the plateau of a 5,000-step run)
1. each mode's learning rate: the one with the highest plateau;
2. the budget: the smallest evaluated step s at which both modes have a(s) >= P - 1 point and
   |a_FF(s) - a_LoRA(s)| <= 1 point (matched fit); if no step has matched fit, the smallest step with the first
   condition alone, and the remaining gap is reported.
"""
import os

import cli
import ledger

TOLERANCE = 0.01     # 1 point of accuracy
PLATEAU_FROM = 3750  # the last quarter of the 5,000-step calibration runs
SPACING = 250        # calibration runs evaluate every 250 steps
CALIB_STEPS = 5000   # 80,000 samples at batch 16: the paper's budget, the cap of the rule


def smoothed(curve, s):
    """a(s): the mean accuracy of the evaluations within one spacing of step s."""
    near = [acc for step, acc in curve if abs(step - s) <= SPACING]
    return sum(near) / len(near)


def plateau(curve):
    tail = [acc for step, acc in curve if step >= PLATEAU_FROM]
    if not tail:
        raise ValueError(f"a calibration curve needs evaluations from step {PLATEAU_FROM} on (it ends at "
                         f"{max(s for s, _ in curve)})")
    return sum(tail) / len(tail)


def choose(curves):
    """curves: {mode: {lr: [(step, acc), ...]}} with modes 'lora' and 'ff'. Returns the rule's decision as a dict:
    lr per mode, plateau per mode, budget (steps), whether matched fit was reached, and a(budget) per mode."""
    if set(curves) != {"lora", "ff"}:
        raise ValueError(f"calibration needs clean curves of both modes, lora and ff (got {sorted(curves)})")
    lr = {m: max(curves[m], key=lambda r: plateau(curves[m][r])) for m in curves}
    best = {m: sorted(curves[m][lr[m]]) for m in curves}
    top = {m: plateau(best[m]) for m in best}
    steps = sorted(set.intersection(*({s for s, _ in best[m]} for m in best)))
    near = lambda s: all(smoothed(best[m], s) >= top[m] - TOLERANCE for m in best)
    matched = lambda s: abs(smoothed(best["ff"], s) - smoothed(best["lora"], s)) <= TOLERANCE
    budget = next((s for s in steps if near(s) and matched(s)), None)
    fit = budget is not None
    if budget is None:
        budget = next((s for s in steps if near(s)), steps[-1])
    return dict(lr=lr, plateau=top, budget=budget, matched=fit, at_budget={m: smoothed(best[m], budget) for m in best},
                plateaus={m: {r: plateau(c) for r, c in curves[m].items()} for m in curves})


def is_calibration(run):
    """A calibration run: clean, CALIB_STEPS long, with a curve (no protocol's grid uses that budget)."""
    c = run["config"]
    return c["attack"] == "none" and c["steps"] == CALIB_STEPS and len(run.get("curve", ())) > 1


def calibration_curves(lines, task="sst2"):
    """{mode: {lr: curve}} from the results JSONL lines of the clean calibration runs (5,000 steps, clean)."""
    out = {}
    for r in lines:
        c = r["config"]
        if c["task"] == task and is_calibration(r):
            out.setdefault(c["mode"], {})[c["lr"]] = [(p["step"], p["acc"]) for p in r["curve"]]
    return out


def dev_used(lines, task):
    """What the calibration curves of a task were evaluated on: the whole dev set, or the pair tasks' fixed subset."""
    sizes = {(r["curve"][0].get("n"), r["curve"][-1].get("n")) for r in lines
             if r["config"]["task"] == task and is_calibration(r)}  # (an evaluation's dev rows, the final one's)
    n = max((first for first, last in sizes if first and last and first < last), default=0)
    return "whole dev set" if not n else f"a fixed {n:,}-row dev subset, the last point the final dev set"


def markdown(decision, curves):
    pct = lambda v: f"{100 * v:.1f}"
    lines = ["# Calibration of the converged protocol (clean runs, seed 0)", "",
             "| mode | lr | plateau (steps >= 3750) | chosen |", "|---|---|---|---|"]
    for m in ("lora", "ff"):
        for lr in sorted(curves[m]):
            lines.append(f"| {m} | {lr:g} | {pct(decision['plateaus'][m][lr])} | {'yes' if lr == decision['lr'][m] else ''} |")
    d = decision
    lines += ["", f"Budget: **{d['budget']} steps** ({16 * d['budget']:,} samples at batch 16); a(budget): "
              f"LoRA {pct(d['at_budget']['lora'])}, FF {pct(d['at_budget']['ff'])} (plateaus {pct(d['plateau']['lora'])}, "
              f"{pct(d['plateau']['ff'])}); matched fit (|a_FF - a_LoRA| <= 1 point): "
              f"{'reached' if d['matched'] else 'NOT reached: the gap is a caveat on every verdict'}."]
    return "\n".join(lines) + "\n"


def draw(curves, decision, path, dev="whole dev set"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, style in (("lora", "-"), ("ff", "--")):
        for lr in sorted(curves[m]):
            pts = sorted(curves[m][lr])
            ax.plot([16 * s for s, _ in pts], [100 * a for _, a in pts], style, marker=".",
                    lw=2.5 if lr == decision["lr"][m] else 1, label=f"{m} lr {lr:g}")
    ax.axvline(16 * decision["budget"], color="k", lw=0.8, ls=":", label="chosen budget")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("clean dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Converged protocol: clean calibration curves (seed 0, {dev})" if dev == "whole dev set" else
                 f"Converged protocol: clean calibration curves (seed 0)\n{dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("results", help="results JSONL holding the calibration runs")
    p.add_argument("--out", default=None, help="folder for calib.md and calib.png (default: beside the JSONL)")
    p.add_argument("--task", default="sst2", help="GLUE task of the calibration runs")
    args = p.parse_args(argv)
    with cli.usage_errors():
        if not os.path.exists(args.results):
            raise cli.UsageError(f"results file {args.results} does not exist; run `python -m study.sweep calib --protocol conv` "
                                 "first")
        lines = ledger.runs(args.results)
        curves = calibration_curves(lines, args.task)
        decision = choose(curves)
        out = args.out or os.path.dirname(os.path.abspath(args.results))
        cli.check_folder_path(out, "--out")
    os.makedirs(out, exist_ok=True)
    text = markdown(decision, curves)
    with open(os.path.join(out, f"calib-{args.task}.md"), "w") as f:
        f.write(text)
    draw(curves, decision, os.path.join(out, f"calib-{args.task}.png"), dev_used(lines, args.task))
    print(text)


if __name__ == "__main__":
    main()
