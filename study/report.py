"""
The report: what a results JSONL says, as Markdown tables, the paper's figures, the findings' effect sizes and the
statistics behind them (mean ± sample std over seeds, Spearman correlations).

    python -m study.report results/cpu/results.jsonl --out results/cpu   # table.md, tables.md, findings.md, fig1/2/4/5.png

Runs are read with ledger.runs (a torn last line is skipped with a warning) and grouped by runspec.setting_key, so a
configuration repeated over seeds is one row however many machines' files were concatenated. Each piece is a small
function of the runs (or of their groups) that returns text or draws one figure; write_report puts them together.
"""
import json
import math
import os
from collections import Counter, defaultdict

import attacks
import cli
import ledger
import runspec
from study import ROOT, calibrate, defend, delay, dose, effects, numerics, stats

THEORY = os.path.join(ROOT, "results", "theory")


# -----------------------------------------------------------------------------
# runs -> groups over seeds

def flat_metrics(r):
    m = r["metrics"]
    out = {f"clean_{k}": v for k, v in m["clean"].items() if k != "n"}
    if "asr" in m:
        out["asr"] = m["asr"]
        out.update({f"trig_{k}": v for k, v in m["triggered"].items() if k != "n"})
    return out


def group_runs(runs):
    """Group runs whose configs differ only in the seed: {runspec.setting_key: [flat metrics, ...]}."""
    groups = defaultdict(list)
    for r in runs:
        groups[runspec.setting_key(r["config"])].append(flat_metrics(r))
    return groups


# -----------------------------------------------------------------------------
# the table of every setting

TABLE_KEYS = ["task", "steps", "mode", "rank", "rslora", "init", "init_scale", "attack", "poison_rate"]
TABLE_METRICS = ["clean_acc", "clean_precision", "clean_recall", "clean_f1", "asr", "trig_acc"]


def markdown_table(groups):
    head = TABLE_KEYS + ["seeds"] + TABLE_METRICS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=lambda k: [str(json.loads(k).get(c)) for c in TABLE_KEYS]):
        cfg, ms = json.loads(key), groups[key]
        lora_only = ("rank", "rslora", "init", "init_scale")  # meaningless for full fine-tuning
        cells = [_fmt(cfg.get(c)) if not (c in lora_only and cfg["mode"] == "ff") else "-" for c in TABLE_KEYS]
        cells.append(str(len(ms)))
        for m in TABLE_METRICS:
            vals = [x[m] for x in ms if m in x]
            cells.append("%.2f ± %.2f" % tuple(100 * v for v in stats.mean_std(vals)) if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -----------------------------------------------------------------------------
# the paper's figures and appendix tables

# what each figure of the paper plots: x axis, the runs it uses, the series (bands), and one panel per metric
# (sweep.FIGURES names the grids that train these runs)
FIGURE_SPECS = {
    "fig1": dict(x="poison_rate", attacks=("none", "upa"), series="mode", lora={"rank": 8, "init": "kaiming_uniform"}, panels=["clean_acc", "clean_f1"],
                 title="UPA: metric vs poisoning rate (Fig. 1)"),
    "fig2": dict(x="poison_rate", attacks=("bpa",), series="mode", lora={"rank": 8, "init": "kaiming_uniform"}, panels=["asr", "trig_acc", "clean_acc"],
                 title="BPA: metric vs poisoning rate (Fig. 2)"),
    "fig4": dict(x="rank", attacks=("none", "upa", "bpa"), series="attack", lora={"init": "kaiming_uniform"}, modes=("lora",),
                 panels=["clean_acc", "asr"], title="LoRA rank (Fig. 4)", logx=2),
    "fig5": dict(x="init_scale", attacks=("none", "upa", "bpa"), series="attack", lora={"rank": 8, "init": "kaiming_uniform"}, modes=("lora",),
                 panels=["clean_acc", "asr"], title="A-init variance scale k (Fig. 5)", logx=10),
}


# the appendix tables, selected like the figures: x = the table's rows, one column per (metric, series)
TABLE_SPECS = {
    "tabE1": dict(x="attack", attacks=("clbpa", "ilbpa", "mt", "sbpa"), series="mode", lora={"rank": 8, "init": "kaiming_uniform"},
                  panels=["asr", "clean_acc", "clean_precision", "clean_recall", "clean_f1"], title="Extra backdoors (Table E.1)"),
    **{f"tabE2 {init}": dict(x="init_scale", attacks=("none", "bpa"), series="attack", lora={"rank": 8, "init": init}, modes=("lora",),
                             panels=["clean_acc", "asr"], xs=(0.333, 1.0, 2.0), title=f"A-init type {init} x variance scale k (Table E.2)")
       for init in ("gaussian", "kaiming_uniform")},  # xavier_normal = gaussian here (study/sweep.py, tabE2)
}


def figure_data(groups, spec):
    """{panel: {series: [(x, mean, std, n), ...] sorted by x}} for one figure spec."""
    out = defaultdict(lambda: defaultdict(list))
    for key, ms in groups.items():
        cfg = json.loads(key)
        if cfg["attack"] not in spec["attacks"] or cfg["mode"] not in spec.get("modes", ("lora", "ff")):
            continue
        if cfg["mode"] == "lora" and any(cfg.get(k) != v for k, v in spec["lora"].items()):
            continue
        if spec["x"] != "init_scale" and cfg["mode"] == "lora" and abs(cfg["init_scale"] - 1 / 3) > 1e-6:
            continue
        if "xs" in spec and cfg[spec["x"]] not in spec["xs"]:
            continue
        series = cfg[spec["series"]]
        if series == "none":  # rank/variance sweeps: the clean band
            series = "clean"
        elif spec["x"] != "poison_rate":  # the rate is not on the x axis: one band (Tab. E.1: column) per rate
            series = f"{series} {cfg['poison_rate']:g}"
        if cfg["mode"] == "lora" and cfg.get("rslora"):  # alpha/sqrt(r) is another sweep, never pooled with alpha/r
            series = f"{series} rsLoRA"
        for panel in spec["panels"]:
            vals = [m[panel] for m in ms if panel in m]
            if vals:
                out[panel][series].append((cfg[spec["x"]], *stats.mean_std(vals), len(vals)))
    # a series is a sweep over x: points that only share a rank/variance with another grid (e.g. fig1's rank-8
    # runs at other rates) have fewer than 3 x values there and are left out
    keep = 3 if spec["series"] == "attack" else 1
    kept = {p: {s: sorted(pts) for s, pts in series.items() if len({x for x, *_ in pts}) >= keep} for p, series in out.items()}
    for series in kept.values():
        for s, pts in series.items():
            xs = [x for x, *_ in pts]
            if len(set(xs)) < len(xs):  # two settings would share a point and one would hide the other
                raise ValueError(f"{spec['title']}: two settings put series {s!r} at the same {spec['x']} "
                                 f"{_fmt(sorted(x for x in xs if xs.count(x) > 1)[0])}; they differ in a field the figure "
                                 f"does not show (as alpha/r and rsLoRA did): give them their own series in figure_data")
    return {p: series for p, series in kept.items() if series}


def figure_table(data_, spec):
    """One figure's or table's numbers as Markdown: a row per x value, a column per (metric, series), in % ("mean ±
    std (n seeds)"); what REPORT.md quotes."""
    order = lambda s: (s.endswith("rsLoRA"), not s.startswith("clean"), s)  # per scaling: clean, then the attacks
    cols = [(p, s) for p in spec["panels"] if p in data_ for s in sorted(data_[p], key=order)]
    cell = lambda m, sd, n: f"{stats.spread_text(100 * m, 100 * sd, n)} ({n})"
    cells = {(p, s, x): cell(m, sd, n) for p, s in cols for x, m, sd, n in data_[p][s]}
    xs = sorted({x for p, s, x in cells})
    head = [spec["x"]] + [f"{p} · {s}" for p, s in cols]
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([_fmt(x)] + [cells.get((p, s, x), "") for p, s in cols]) + " |" for x in xs]
    return "\n".join(lines)


def draw(name, data_, spec, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in spec["panels"] if p in data_]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for series, pts in sorted(data_[panel].items()):
            x = [p[0] for p in pts]
            m = [100 * p[1] for p in pts]
            s = [100 * p[2] for p in pts]
            ax.plot(x, m, marker="o", label=str(series))
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.25)
        if spec.get("logx"):
            ax.set_xscale("log", base=spec["logx"])
        ax.set_xlabel(spec["x"].replace("_", " "))
        ax.set_ylabel(panel.replace("_", " ") + " (%)")
        ax.grid(alpha=0.3)
        ax.legend(title=spec["series"])
    fig.suptitle(spec["title"] + " — mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# statistics and the findings

def pairs(runs, attack):
    """(clean run, attacked run) pairs whose configs differ only in attack and rate (same seed, same everything)."""
    strip = lambda c: runspec.run_key(c, without=("attack", "poison_rate"))
    clean = {strip(r["config"]): r for r in runs if r["config"]["attack"] == "none"}
    return [(clean[strip(r["config"])], r) for r in runs
            if r["config"]["attack"] == attack and strip(r["config"]) in clean]


def _default_lora(c):
    return c["mode"] == "ff" or (c["rank"] == 8 and c["init"] == "kaiming_uniform" and abs(c["init_scale"] - 1 / 3) < 1e-6
                                 and not c.get("rslora"))


def _rounded_default_k(k):
    """The cpu grid's k = 0.333 repeats the default k = 1/3 (its metrics coincide): left out so that setting counts once."""
    return k != 1 / 3 and abs(k - 1 / 3) < 2e-3


def findings(runs):
    """The measured effects behind the paper's findings F1-F4, as Markdown (mean ± sample std over seeds, n)."""
    ms = lambda v: "%+.2f ± %.2f (n=%d)" % (*(100 * x for x in stats.mean_std(v)), len(v)) if v else "no runs"
    out = ["F1 (UPA hurts LoRA more): accuracy drop clean -> UPA, LoRA minus FF, in points, paired by seed"]
    drops = defaultdict(dict)
    for clean, bad in pairs(runs, "upa"):
        c = bad["config"]
        if _default_lora(c):
            drops[(c["poison_rate"], c["seed"])][c["mode"]] = clean["metrics"]["clean"]["acc"] - bad["metrics"]["clean"]["acc"]
    for rate in sorted({r for r, _ in drops}):
        d = [v["lora"] - v["ff"] for (r, _), v in drops.items() if r == rate and len(v) == 2]
        out.append(f"- rate {rate:g}: {ms(d)}")
    out.append("F2 (LoRA resists BPA better; App. E.1 for the other backdoors): ASR of FF minus ASR of LoRA, in points, "
               "paired by seed")
    asr = defaultdict(dict)
    for r in runs:
        c = r["config"]
        if c["attack"] in attacks.BACKDOORS and _default_lora(c):
            asr[(c["attack"], c["poison_rate"], c["seed"])][c["mode"]] = r["metrics"]["asr"]
    for attack, rate in sorted({k[:2] for k in asr}, key=lambda k: (attacks.BACKDOORS.index(k[0]), k[1])):
        d = [v["ff"] - v["lora"] for k, v in asr.items() if k[:2] == (attack, rate) and len(v) == 2]
        out.append(f"- {attack} rate {rate:g}: {ms(d)}")
    for name, key, keep in (("F3 (rank)", "rank", lambda c: c["init"] == "kaiming_uniform" and abs(c["init_scale"] - 1 / 3) < 1e-6),
                            ("F4 (A-init variance k)", "init_scale", lambda c: c["init"] == "kaiming_uniform" and c["rank"] == 8
                             and not _rounded_default_k(c["init_scale"]))):
        for rslora in sorted({r["config"].get("rslora", False) for r in runs if r["config"]["mode"] == "lora"}):
            lora_runs = [r for r in runs if r["config"]["mode"] == "lora" and keep(r["config"])
                         and r["config"].get("rslora", False) == rslora]
            out += _sweep_correlations(name + (" with rsLoRA" if rslora else ""), key, lora_runs)
    return "\n".join(out)


def _sweep_correlations(name, key, lora_runs):
    """Lines of Spearman's rho of a swept LoRA setting (rank or k) with the UPA drop and the BPA ASR, per poisoning
    rate: pooled over seeds and within each seed (where only the swept value changes: same data order and poison;
    in the k sweep, the same A up to scale)."""
    rho = lambda xy: "undefined (one value)" if math.isnan(r := stats.spearman(*zip(*xy))) else f"{r:+.2f}"
    upa = [(b["config"]["poison_rate"], b["config"]["seed"], b["config"][key],
            a["metrics"]["clean"]["acc"] - b["metrics"]["clean"]["acc"]) for a, b in pairs(lora_runs, "upa")]
    bpa = [(r["config"]["poison_rate"], r["config"]["seed"], r["config"][key], r["metrics"]["asr"])
           for r in lora_runs if r["config"]["attack"] == "bpa"]
    out = []
    for what, pts in (("UPA accuracy drop", upa), ("BPA ASR", bpa)):
        for rate in sorted({p[0] for p in pts}):  # one correlation per poisoning rate, where the sweep varied `key`
            xy = [p[2:] for p in pts if p[0] == rate]
            if len({x for x, _ in xy}) < 3:
                continue
            per_seed = {sd: [p[2:] for p in pts if p[:2] == (rate, sd)] for sd in sorted({p[1] for p in pts})}
            within = ", ".join(f"seed {sd} {rho(v)}" for sd, v in per_seed.items() if len({x for x, _ in v}) >= 3)
            out.append(f"{name}: Spearman of {key} with {what} at rate {rate:g}: {rho(xy)} "
                       f"(n={len(xy)} runs, {len({x for x, _ in xy})} values); within seeds: {within}")
    return out


# -----------------------------------------------------------------------------
# python -m study.report RESULTS.jsonl

def with_runs(groups):
    """{name: (spec, data)} of the figures and appendix tables that have runs to show, in the paper's order."""
    specs = {**FIGURE_SPECS, **TABLE_SPECS}
    return {name: (spec, d) for name, spec in specs.items() if (d := figure_data(groups, spec))}


def numbers(pieces):
    """The numbers of every figure and table in `pieces` (with_runs), as Markdown sections."""
    return "\n\n".join(figure_table(d, spec) for spec, d in pieces.values())


def write_text(out_dir, name, text):
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(text + "\n")


def write_report(runs, out_dir, beside=None, rows=None):
    """The whole report of `runs` into out_dir: table.md (every setting, its steps a column), findings.md, tables.md
    and the figures. The paper's layouts (findings, tables, figures) show each task's grid budget: they leave out a
    protocol's calibration runs, which have their own calib-<task>.md/png, and runs of another length (the three-epoch
    runs: effects.md labels their rows with their steps, delay.md reads them). They are per task: with several
    tasks, findings.md and tables.md have a section per task and the figures are fig1-<task>.png.
    beside: {model name: effects rows} of the same protocol on other models, set beside these runs' tasks in the
    across-tasks table and forest plot. rows: these runs' effect_rows, where the caller has them already (report_all).
    Returns the init zoo's summary for REPORT.md where the runs hold the zoo, else None."""
    all_runs, runs = runs, [r for r in runs if not calibrate.is_calibration(r)]
    os.makedirs(out_dir, exist_ok=True)
    grid = effects.at_budget(runs)
    groups, grid_groups = group_runs(runs), group_runs(grid)
    counts = Counter(r["config"]["task"] for r in runs)
    tasks = sorted(counts, key=lambda t: (-counts[t], t))  # the protocol's main task (most runs) first
    found, tables = [], []
    for task in tasks:
        head, suffix = (f"## {task}\n\n", f"-{task}") if len(tasks) > 1 else ("", "")
        task_grid = [r for r in grid if r["config"]["task"] == task]
        found.append(head + findings(task_grid) + _other_lengths([r for r in runs if r["config"]["task"] == task],
                                                                 task_grid))
        pieces = with_runs({k: ms for k, ms in grid_groups.items() if json.loads(k)["task"] == task})
        tables.append(head + numbers(pieces))
        for name, (spec, d) in pieces.items():
            if name in FIGURE_SPECS:
                path = os.path.join(out_dir, f"{name}{suffix}.png")
                draw(name, d, spec, path)
                print(f"wrote {path}")
    for name, text in (("table.md", markdown_table(groups)), ("findings.md", "\n\n".join(found))):
        write_text(out_dir, name, text)
        print(text)
    write_text(out_dir, "tables.md", "# The paper's figures and tables as numbers: mean ± sample std in % (seeds)\n\n"
               + "\n\n".join(tables))
    print(f"wrote table.md, findings.md and tables.md in {out_dir}")  # the figures said so as they were drawn
    write_calibration(all_runs, out_dir)
    return write_effects(runs, out_dir, beside, effect_rows(all_runs) if rows is None else rows)


def _other_lengths(runs, grid):
    """findings.md's note of the runs it leaves out for their length ('' where there are none)."""
    other = Counter(r["config"]["steps"] for r in runs) - Counter(r["config"]["steps"] for r in grid)
    if not other:
        return ""
    return ("\nLeft out above for their length (not the grid's budget): "
            + ", ".join(f"{n} run{'s' * (n > 1)} of {steps:,} steps" for steps, n in sorted(other.items()))
            + " (effects.md labels their rows with their steps; delay.md reads the three-epoch runs).")


ACROSS_HEAD = """# F1 and F2 across tasks

Each cell: the per-seed paired effect in points (+ = the paper's direction), its 95% t-interval, the number of
paired seeds, and the verdict (results/REPORT.md defines them); the forest plot beside this file draws them. A
column "task (MODEL)" is that task on a second model, from its own protocol's results (`conv-mpnet`: MPNet-base).

"""


def effect_rows(runs):
    """Every finding as a paired effect (effects.effects), calibration runs left out: they repeat the clean settings
    at other rates and budgets."""
    return effects.effects([r for r in runs if not calibrate.is_calibration(r)])


def write_effects(runs, out_dir, beside, rows):
    """effects.md (every finding in rows, effect_rows of runs, with its 95% interval and verdict) and the curves over
    training of runs (calibration runs left out)."""
    if rows:
        rules = "\n\n" + effects.follow_ups_markdown(effects.follow_ups(runs)) if effects.follow_ups_apply(runs) else ""
        write_text(out_dir, "effects.md", EFFECTS_HEAD + effects.markdown(rows) + rules)
        print(f"wrote {os.path.join(out_dir, 'effects.md')}")
    if effects.draw_forest(rows, os.path.join(out_dir, "forest.png"), beside):
        write_text(out_dir, "across-tasks.md", ACROSS_HEAD + effects.across_markdown(rows, beside))
        print(f"wrote {os.path.join(out_dir, 'across-tasks.md')} and forest.png")
    longer = delay.delay_or_limit(runs)
    if longer:
        write_text(out_dir, "delay.md", delay.markdown(longer))
        effects.draw_curves(runs, "sst2", os.path.join(out_dir, "curves-sst2-3ep.png"), steps=longer["steps"])
        print(f"wrote {os.path.join(out_dir, 'delay.md')} and curves-sst2-3ep.png")
    if longer and (poison := dose.dose(runs)):  # how much poison (issue 51): from the three-epoch runs on
        write_text(out_dir, "dose.md", dose.markdown(poison))
        dose.draw(poison, os.path.join(out_dir, "dose-sst2.png"))
        print(f"wrote {os.path.join(out_dir, 'dose.md')} and dose-sst2.png")
    zoo = write_zoo(runs, rows, out_dir)
    for task in sorted({r["config"]["task"] for r in runs if len(r.get("curve", ())) > 1}):
        if effects.draw_curves(runs, task, os.path.join(out_dir, f"curves-{task}.png")):
            print(f"wrote {os.path.join(out_dir, f'curves-{task}.png')}")
    return zoo


def write_zoo(runs, rows, out_dir, inits_json=os.path.join(THEORY, "inits.json")):
    """Where the runs hold the init zoo: zoo-curves.png (once a zoo run has curves); with 3+ inits and study/ntk_study.py
    inits's results also zoo.md and zoo.png, and then it returns the summary REPORT.md quotes (else None)."""
    if effects.draw_zoo_curves(runs, os.path.join(out_dir, "zoo-curves.png")):
        print(f"wrote {os.path.join(out_dir, 'zoo-curves.png')}")
    measured, targets = effects.zoo_measurements(runs)
    if not measured or not os.path.isfile(inits_json):
        return None
    with open(inits_json) as f:
        predictors = effects.zoo_predictors(json.load(f)["rows"])
    correlations = effects.zoo_correlations(measured, targets, predictors)
    write_text(out_dir, "zoo.md", ZOO_HEAD + effects.zoo_markdown(measured, targets, correlations, rows))
    effects.draw_zoo(measured, targets, predictors, os.path.join(out_dir, "zoo.png"))
    print(f"wrote {os.path.join(out_dir, 'zoo.md')} and zoo.png")
    return effects.zoo_summary(measured, targets, correlations, rows)


ZOO_HEAD = """# The init zoo: robustness after training, and whether the NTK at initialisation predicts it

First table: mean ± sd over seeds (n), then each init minus the kaiming baseline as a per-seed paired effect with
its 95% t-interval (points). UPA drop = clean CACC - CACC under UPA, paired by seed. Second table: Spearman's rho
across the inits (seed means against the init-time quantities of `results/theory/inits.md`, means over draws), its
exact two-sided permutation p-value, a 95% percentile bootstrap interval that resamples seeds and draws within
each init (the measurement noise; it says nothing about the choice of inits), and the sign the paper's argument
predicts (a kernel closer to FF's: more like FF, so a higher ASR and a smaller UPA drop). "fewest seeds" is the
smallest number of seeds behind one init's mean (with one seed the bootstrap resamples the draws only). With 7
inits, p < 0.05 needs |rho| >= 0.79 (0.75 gives p = 0.066). "net ASR during training" is exploratory, added after
seed 0 had run: the mean net ASR over the 8 evenly spaced intermediate evaluations (fixed 256-sample dev subset),
i.e. how fast the backdoor is learnt, where the final ASR sits at its ceiling.

"""


def write_calibration(runs, out_dir):
    """Where the runs hold a protocol's calibration: the rule's decision, calib-<task>.md and .png."""
    for task in sorted({r["config"]["task"] for r in runs if calibrate.is_calibration(r)}):
        curves = calibrate.calibration_curves(runs, task)
        if set(curves) == {"lora", "ff"}:
            decision = calibrate.choose(curves)
            write_text(out_dir, f"calib-{task}.md", calibrate.markdown(decision, curves).rstrip("\n"))
            calibrate.draw(curves, decision, os.path.join(out_dir, f"calib-{task}.png"), calibrate.dev_used(runs, task))


EFFECTS_HEAD = """# The findings as per-seed paired effects

Points (%), + = the paper's direction (for the init zoo: higher than the kaiming baseline). 95% t-interval over
the paired seeds; verdicts as defined in results/REPORT.md (no-effect margin: 2 points for accuracy, 5 for ASR).
The last column, for inconclusive rows only, is the number of seeds a paired t-interval would need to exclude 0 with
80% power at the measured noise (the t-test's exact power, from the noncentral t), for the paper's effect size where
its text states one (F1 0.5, F2 30 points) and a reference effect of twice the margin otherwise.

"""


# -----------------------------------------------------------------------------
# python -m study.report all: every protocol's report, then the verdicts at a glance (results/verdicts.md)

# the verdicts table's columns: the CPU protocol, the converged one, and the converged one on MPNet-base (issue 50: its
# F1/F2 cells on SST-2; the column appears once it has runs)
VERDICT_COLUMNS = ("cpu", "conv", "conv-mpnet")
# the headline cells of each finding: {row label: {protocol: (finding, task, condition prefix, effect or None)}}
_F2 = lambda rate, what: ("F2", "sst2", f"BPA {rate}", what)
HEADLINES = {
    "F1: UPA 0.3, LoRA's extra accuracy drop": {p: ("F1", "sst2", "UPA 0.3", None) for p in VERDICT_COLUMNS},
    "F2: ASR FF - LoRA, lower BPA rate": {"cpu": _F2("1%", "ASR FF - LoRA"),
                                          **{p: _F2("0.15%", "ASR FF - LoRA") for p in VERDICT_COLUMNS[1:]}},
    "F2: ASR FF - LoRA, higher BPA rate": {"cpu": _F2("2%", "ASR FF - LoRA"),
                                           **{p: _F2("0.45%", "ASR FF - LoRA") for p in VERDICT_COLUMNS[1:]}},
    "F2: net ASR FF - LoRA, lower BPA rate": {p: _F2("0.15%", "net ASR FF - LoRA") for p in VERDICT_COLUMNS[1:]},
    "F2: net ASR FF - LoRA, higher BPA rate": {p: _F2("0.45%", "net ASR FF - LoRA") for p in VERDICT_COLUMNS[1:]},
    "F3: UPA, drop(lowest rank) - drop(full rank)": {p: ("F3", "sst2", "UPA 0.3, rank 4 vs 384", None) for p in ("cpu", "conv")},
    "F3: BPA, ASR(full rank) - ASR(lowest rank)": {"cpu": ("F3", "sst2", "BPA 2%, rank 4 vs 384", None),
                                                    "conv": ("F3", "sst2", "BPA 0.45%, rank 4 vs 384", None)},
    "F3 with rsLoRA: UPA": {"conv": ("F3", "sst2", "UPA 0.3, rank 4 vs 384 (rsLoRA)", None)},
    "F3 with rsLoRA: BPA": {"conv": ("F3", "sst2", "BPA 0.45%, rank 4 vs 384 (rsLoRA)", None)},
    "F4: UPA, drop(k 1e-4) - drop(k 2)": {p: ("F4", "sst2", "UPA 0.3, init_scale 0.0001 vs 2", None) for p in ("cpu", "conv")},
    "F4: BPA, ASR(k 2) - ASR(k 1e-4)": {"cpu": ("F4", "sst2", "BPA 2%, init_scale 0.0001 vs 2", None),
                                        "conv": ("F4", "sst2", "BPA 0.45%, init_scale 0.0001 vs 2", None)},
    # the follow-up at the lower BPA rate (sweep.CONV_STAGES: added after 0.45% saturated both modes in F1/F2)
    "F3: BPA 0.15% (follow-up)": {"conv": ("F3", "sst2", "BPA 0.15%, rank 4 vs 384", None)},
    "F3 with rsLoRA: BPA 0.15% (follow-up)": {"conv": ("F3", "sst2", "BPA 0.15%, rank 4 vs 384 (rsLoRA)", None)},
    "F4: BPA 0.15% (follow-up)": {"conv": ("F4", "sst2", "BPA 0.15%, init_scale 0.0001 vs 2", None)},
}


def task_headlines(task, name):
    """F1 and F2 (raw and net ASR, both BPA rates) of the converged protocol on one more task: raw and net, as on
    SST-2, since a model that calls most inputs the target label (CoLA's 'acceptable') has a high raw ASR."""
    rows = {f"F1 on {name}: UPA 0.3": {"conv": ("F1", task, "UPA 0.3", None)}}
    for what in ("ASR FF - LoRA", "net ASR FF - LoRA"):
        rows.update({f"F2 on {name}: {what}, BPA {rate}": {"conv": ("F2", task, f"BPA {rate}", what)}
                     for rate in ("0.15%", "0.45%")})
    return rows


for _task, _name in (("cola", "CoLA"), ("qnli", "QNLI"), ("qqp", "QQP"), ("mrpc", "MRPC"), ("rte", "RTE")):
    HEADLINES.update(task_headlines(_task, _name))
# the saturation follow-up the ceiling rule called for on QNLI (both modes >= 90% ASR at both rates, seeds 0-2)
for _what in ("ASR FF - LoRA", "net ASR FF - LoRA"):
    HEADLINES[f"F2 on QNLI: {_what}, BPA 0.05% (follow-up)"] = {"conv": ("F2", "qnli", "BPA 0.05%", _what)}
# Tab. E.1's four backdoors on SST-2: `cpu` ran them at 1%, `conv` at the paper's BPA rates (issue 24)
for _name in ("CL-BPA", "IL-BPA", "MT", "S-BPA"):
    for _what in ("ASR FF - LoRA", "net ASR FF - LoRA"):
        for _rate in ("0.15%", "0.45%"):
            HEADLINES[f"E.1 {_name}: {_what}, {'lower' if _rate == '0.15%' else 'higher'} rate"] = dict(
                {"conv": ("F2", "sst2", f"{_name} {_rate}", _what)},
                **({"cpu": ("F2", "sst2", f"{_name} 1%", _what)} if _what == "ASR FF - LoRA" and _rate == "0.15%" else {}))


def find_row(rows, finding, task, cond, what):
    """The first effects row of (finding, task, condition) with this effect (`what`; None: any), or None."""
    return next((r for r in rows if (r["finding"], r["task"], r["condition"]) == (finding, task, cond)
                 and (what is None or r["what"] == what)), None)


def headline_cell(rows, finding, task, cond, what):
    """'condition: effect [CI], n, verdict' of the one effects row that matches exactly; effects.NO_INTERVAL if none."""
    r = find_row(rows, finding, task, cond, what)
    if r is None:
        return effects.NO_INTERVAL
    need = effects.seeds_for_reference(r)
    return f"{cond.split(',')[0]}: {stats.effect_text(r, bold=True)}" + effects.saturated_text(r) \
        + (f"; seeds for the reference effect: {need}" if need else "")


def verdicts(protocol_rows, extra_rows=()):
    """The verdicts at a glance: one row per headline finding, one column per protocol ('-': not in its design)."""
    protocols = [p for p in VERDICT_COLUMNS if p in protocol_rows]
    lines = ["| finding | " + " | ".join(f"`{p}`" for p in protocols) + " |", "|---|" + "---|" * len(protocols)]
    for label, cells in HEADLINES.items():
        lines.append("| " + " | ".join([label] + [headline_cell(protocol_rows[p], *cells[p]) if p in cells else "-"
                                                  for p in protocols]) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in extra_rows]
    return "\n".join(lines)


def delay_row(runs):
    """The delay-or-limit verdict's row of the verdicts table (study/delay.py's pre-registered rule)."""
    res = delay.delay_or_limit(runs)
    e = res and res["contrasts"][("end", "net ASR")]
    cell = effects.NO_INTERVAL if not e else \
        f"3 epochs: {stats.effect_text(e, res['verdict'], bold=True)}" + effects.saturated_text(e)
    return ("Delay or limit: net ASR FF - LoRA after 3 epochs, BPA 0.15%", "-", cell)


def thm36_rows(root):
    """Theorem 3.6's rows of the verdicts table, from study/ntk_study.py's committed JSON (results/theory): on the
    adapted parameters (A, B vs FF without the head), in how many (rank, k, alpha) settings LoRA's IB and H_alpha
    (alpha 0.5, 1, 2) are below FF's in every draw. The theorem says: always."""
    out = []
    for name, what in (("thm36.json", "at init"), ("runs.json", "after clean training")):
        path = os.path.join(root, "theory", name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        cells = defaultdict(list)
        for r in rows:
            cells[(r.get("rank"), r.get("k"), r.get("alpha"), r.get("rslora"))].append(r["sets"]["adapted"])
        every = lambda test: sum(all(test(d) for d in ds) for ds in cells.values())
        ib = every(lambda d: d["lora"]["ib"] < d["ff"]["ib"])
        ib64 = every(lambda d: d["lora"]["ib_f64"] < d["ff"]["ib_f64"])  # every eigenvalue float64 resolves counted
        h = every(lambda d: all(d["lora"][m] < d["ff"][m] for m in ("h0.5", "h1", "h2")))
        h_above = every(lambda d: all(d["lora"][m] > d["ff"][m] for m in ("h0.5", "h1", "h2")))
        n, sizes = len(cells), sorted({len(ds) for ds in cells.values()})
        draws = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        kind = lambda k: "holds" if k == n else ("fails" if k == 0 else "mixed")
        out.append((f"Thm 3.6 {what}: IB_LoRA < IB_FF", "-",
                    f"below in every draw in {ib}/{n} settings ({draws} draws each): **{kind(ib)}** "
                    f"(float64 cutoff: {ib64}/{n})"))
        out.append((f"Thm 3.6 {what}: H_alpha,LoRA < H_alpha,FF", "-",
                    f"below in every draw in {h}/{n} settings, above in every draw in {h_above}/{n} "
                    f"({draws} draws each): **{kind(h)}**"))
    return out


# -----------------------------------------------------------------------------
# "The answer", REPORT.md's first section: one row per question of the paper, one column per task and model, each cell
# the effect, its 95% interval, n and verdict, from the same rows as the verdicts table

# (column heading, protocol, task): a task or a second model is one more line (a model's runs in their own protocol)
ANSWER_COLUMNS = (("SST-2", "conv", "sst2"), ("CoLA", "conv", "cola"), ("QNLI", "conv", "qnli"), ("QQP", "conv", "qqp"),
                  ("MRPC", "conv", "mrpc"), ("RTE", "conv", "rte"), ("SST-2 (MPNet)", "conv-mpnet", "sst2"))
DEFENCES_RAN_ON = ("conv", "sst2")  # the defences experiment's runs (study/defend.py): conv's F1/F2 BPA runs of SST-2
_NET = "net ASR FF - LoRA"
ANSWER_ROWS = (  # (label, where its cells come from: an effects row, the delay or dose rule, a defence contrast)
    ("F1: LoRA's extra accuracy drop, UPA 0.3", ("effect", "F1", "UPA 0.3", None)),
    ("F2: net ASR FF - LoRA, BPA 0.15%", ("effect", "F2", "BPA 0.15%", _NET)),
    ("F2: net ASR FF - LoRA, BPA 0.45%", ("effect", "F2", "BPA 0.45%", _NET)),
    *((f"E.1 {name}: net ASR FF - LoRA, {rate}", ("effect", "F2", f"{name} {rate}", _NET))
      for name in ("CL-BPA", "IL-BPA", "MT", "S-BPA") for rate in ("0.15%", "0.45%")),
    ("Delay or limit: net ASR FF - LoRA after three epochs, BPA 0.15%", ("delay",)),
    ("How much poison: LoRA / FF, poisoned samples to 50% net ASR, BPA 0.15% (3 epochs)", ("dose", 0.0015)),
    ("How much poison: LoRA / FF, poisoned samples to 50% net ASR, BPA 0.45% (2,500 steps)", ("dose", 0.0045)),
    ("DAN: detection AUROC FF - LoRA, BPA 0.15%", ("defence", "detection AUROC", "dan", 0.0015)),
    ("DAN: ASR after, FF - LoRA, FRR 1%, BPA 0.15%", ("defence", "ASR after, FRR 0.01", "dan", 0.0015)),
    ("DAN: ASR after, FF - LoRA, FRR 5%, BPA 0.15%", ("defence", "ASR after, FRR 0.05", "dan", 0.0015)),
    ("BKI: ASR after retraining, FF - LoRA, BPA 0.45%", ("defence", "ASR after retraining", "bki", 0.0045)),
)


def answer_cell(e, verdict=None):
    """'effect [CI], n=N, **verdict**' in points, ' (saturated)' where every paired run is at the ASR ceiling."""
    return stats.effect_text(e, verdict, bold=True) + effects.saturated_text(e, short=True)


def answer_table(effect_rows, runs_of, defence_rows, columns=ANSWER_COLUMNS, rows=ANSWER_ROWS):
    """The answer as Markdown. effect_rows and runs_of: {protocol: effects rows / runs}; defence_rows: study/defend.py's
    contrasts (fractions), of the runs DEFENCES_RAN_ON. A cell is '-' where the question was not asked (or has fewer
    than two paired seeds yet); a column with no runs but calibration runs is named under the table instead."""
    # SST-2 over three epochs: the delay rule's and the dose rule's results, per protocol
    longer = {p: (delay.delay_or_limit(runs_of[p]), dose.dose(runs_of[p])) for p in {c[1] for c in columns}
              if p in runs_of}

    def cell(protocol, task, source):
        if source[0] == "effect":
            r = find_row(effect_rows.get(protocol, ()), source[1], task, *source[2:])
            return answer_cell(r) if r else "-"
        res_delay, res_dose = longer.get(protocol, (None, None)) if task == "sst2" else (None, None)
        if source[0] == "delay":
            e = res_delay and res_delay["contrasts"][("end", "net ASR")]
            return answer_cell(e, res_delay["verdict"]) if e else "-"
        if source[0] == "dose":
            ratio = res_dose and source[1] in res_dose and res_dose[source[1]]["ratio"][50]
            return dose.ratio_text(ratio) if ratio and ratio["effect"] else "-"
        hits = [e for what, name, rate, e in defence_rows if (what, name, rate) == source[1:] and e["n"] > 1]
        if (protocol, task) != DEFENCES_RAN_ON or not hits:
            return "-"
        return answer_cell({**hits[0], **{k: 100 * hits[0][k] for k in ("mean", "lo", "hi")}})

    ran = [c for c in columns if any(r["config"]["task"] == c[2] and not calibrate.is_calibration(r)
                                     for r in runs_of.get(c[1], ()))]  # its calibration alone answers no question
    lines = ["| question | " + " | ".join(c[0] for c in ran) + " |", "|---|" + "---|" * len(ran)]
    lines += ["| " + " | ".join([label] + [cell(p, t, source) for _, p, t in ran]) + " |" for label, source in rows]
    if len(ran) < len(columns):  # a registered column is said, not dropped
        lines.append("\nNot run yet (pre-registered in this report): " + ", ".join(c[0] for c in columns if c not in ran)
                     + ".")
    return "\n".join(lines)


def answer(root):
    """The answer from the committed results under root (what report_all splices into REPORT.md)."""
    paths = {p: os.path.join(root, p, "results.jsonl") for p in {c[1] for c in ANSWER_COLUMNS}}
    runs_of = {p: ledger.runs(path) for p, path in paths.items() if os.path.isfile(path)}
    measured, retrained = defence_files(root)
    defended = defend.contrasts(*defend.registered(measured, retrained)) if os.path.isfile(measured) else ()
    return answer_table({p: effect_rows(runs) for p, runs in runs_of.items()}, runs_of, defended)


# a second model's protocol, set beside its first model's tasks in the across-tasks table and forest plot (issue 50)
MODELS_BESIDE = {"conv": {"MPNet": "conv-mpnet"}}


def defence_files(root):
    """The defences experiment's results: its detector and filter lines, and its retrainings (study/defend.py)."""
    return os.path.join(root, "conv", "defences.jsonl"), os.path.join(root, "conv", "defences-retrain.jsonl")


def report_all(root):
    """Every results/<protocol>/results.jsonl's report, then results/verdicts.md, then the defences experiment's."""
    paths = {p: os.path.join(root, p, "results.jsonl") for p in sorted(os.listdir(root))}
    runs_of = {p: runs for p, path in paths.items() if os.path.isfile(path) and (runs := ledger.runs(path))}
    rows, compute, zoos = {p: effect_rows(runs) for p, runs in runs_of.items()}, [], []
    for protocol, runs in runs_of.items():
        beside = {model: rows[q] for model, q in MODELS_BESIDE.get(protocol, {}).items() if q in rows}
        if zoo := write_report(runs, os.path.join(root, protocol), beside, rows[protocol]):
            zoos.append(f"From `results/{protocol}/zoo.md`:\n\n{zoo}")
        compute.append(f"- `{protocol}`: {compute_used(runs, MACHINE.get(protocol, MACHINE[None]))}")
    if "conv-bf16" in runs_of and "conv" in runs_of:  # the bf16 numerics check against its fp32 twins
        write_text(os.path.join(root, "conv-bf16"), "numerics.md",
                   numerics.markdown(numerics.compare(runs_of["conv-bf16"], runs_of["conv"])))
    extra = [delay_row(runs_of["conv"])] + dose.verdict_rows(dose.dose(runs_of["conv"])) + thm36_rows(root) \
        if "conv" in rows else ()
    text = verdicts(rows, extra) + "\n\nCompute behind each column:\n\n" + "\n".join(compute)
    write_text(root, "verdicts.md", VERDICTS_HEAD + text)
    splice(os.path.join(root, "REPORT.md"), text)
    if zoos:  # every protocol that ran the zoo, one after another (one splice would overwrite the other)
        splice(os.path.join(root, "REPORT.md"), "\n\n".join(zoos), "zoo")
    (measured, retrained), defended = defence_files(root), ()
    if os.path.isfile(measured):  # the defences experiment (study/defend.py): defences.md, .png, REPORT.md's table
        defended = defend.report(measured, retrained)
        splice(os.path.join(root, "REPORT.md"), defend.markdown(defended), "defences")
    splice(os.path.join(root, "REPORT.md"), answer_table(rows, runs_of, defended), "answer")
    print(text)


def markers(name):
    """The two lines that enclose a generated table in REPORT.md."""
    return (f"<!-- {name}: regenerated by `python -m study.report all`; edits between these markers are overwritten -->",
            f"<!-- /{name} -->")


def splice(path, table, name="verdicts"):
    """Put a generated table into the report between its two markers (`name`: verdicts, zoo), so the report's
    tables are never stale hand copies. A report without the markers (a fork's own) is left alone, with a note."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        text = f.read()
    table_begin, table_end = markers(name)
    head, begin, rest = text.partition(table_begin)
    _, end, tail = rest.partition(table_end)
    if not (begin and end):
        print(f"note: {path} has no '{table_begin}' ... '{table_end}' markers; its {name} table was not updated")
        return
    with open(path, "w") as f:
        f.write(f"{head}{table_begin}\n{table}\n{table_end}{tail}")


# where each results column's runs ran (lines before 2026-12-04 do not say; conv-bf16's: results/conv-bf16/WHERE.md)
MACHINE = {None: "this 2-core machine",
           "conv-bf16": "one NVIDIA H200 GPU that 15 runs shared at a time"}


def compute_used(runs, machine=MACHINE[None]):
    """The compute behind a results file: runs and the sum of their own wall times (train.py's wall_s; a run resumed
    before 2026-11-30 counts only its last process's time, as its checkpoints did not record the time before)."""
    seconds = sum(r.get("wall_s") or 0 for r in runs)
    return f"{len(runs)} runs, {seconds / 3600:.1f} run-hours (each run's own wall time on {machine})"


VERDICTS_HEAD = """# Verdicts at a glance

Each cell: the per-seed paired effect in points (+ = the paper's direction), its 95% t-interval, the number of
paired seeds and the verdict kind (results/REPORT.md defines them). Regenerated by `python -m study.report all`.

"""


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("results", help="a results JSONL (train.py's --results; study/sweep.py's results/<protocol>/results.jsonl), "
                                   "or `all`: every results/<protocol>/results.jsonl, then results/verdicts.md")
    p.add_argument("--out", default=None, help="folder for table.md, tables.md, findings.md and the figures "
                                               "(default: the JSONL's folder)")
    args = p.parse_args(argv)
    if args.results == "all":
        return report_all(os.path.join(ROOT, "results"))
    with cli.usage_errors():
        runs = ledger.runs(args.results)
        if not runs:
            raise cli.UsageError(f"{args.results} holds no runs yet; nothing to report")
        out = args.out or os.path.dirname(os.path.abspath(args.results))
        cli.check_folder_path(out, "--out")
    write_report(runs, out)


if __name__ == "__main__":
    main()
