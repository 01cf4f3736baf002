"""
The defences experiment (issue 26) on the converged protocol's BPA runs (the `f12` grid of study/sweep.py): every
detector and filter of defences.py on each run, one results line per (run, defence), then training again on each
filtered training set. Pre-registration: results/REPORT.md, "Defences x LoRA/FF".

    python -m study.defend all --jobs 2       # everything below, resumable: the one background command
    python -m study.defend all --jobs 2 --until 18:00  # start only what is estimated to end by 18:00
    python -m study.defend plan               # the source runs that owe a defence, train.py lines for those not at hand
    python -m study.defend sources --jobs 2   # train them; check they reproduce results/conv
    python -m study.defend detect             # STRIP, RAP, DAN: BPA 0.15% and 0.45%, FF and LoRA r8, seeds 0-4;
                                              # each input's score in results/conv/scores/
    python -m study.defend filter             # spectral, AC, BKI: BPA 0.45%, seeds 0-2; writes the drop files
    python -m study.defend retrain --jobs 2   # train.py --drop-rows on each filtered set (--print: the commands)
    python -m study.defend effects            # the paired contrasts with their verdicts, and the other measures: defences.md
    python -m study.defend figure             # ASR before and after each defence, FF and LoRA: defences.png

A (run, defence) already in the results file is skipped, so every stage can be stopped and continued; each line
records its defence's settings (defences.SETTINGS) and the seconds it took, and a line measured under other settings
stops the stage with an error rather than pass for a current one. A filter's drop file is named by its run, its
filter and a digest of the rows it drops, so a retraining is keyed on exactly the rows it left out, and needs only
that file, not the source run's folder. The source runs are the sweep's own folders (runs/conv/f12/...): `sources`
trains those that owe a defence and are not at hand (`plan` prints their train.py lines), recording into
results/conv/defences-sources.jsonl so that results/conv/results.jsonl is left alone. The same flags give the same
run, so each source run's results line must equal its committed one in results/conv: `sources` and `all` compare
them and say so (a mismatch is reported, not hidden; the defences still run on the new run). `all` trains and
measures a --jobs-sized chunk of source runs at a time, so that what a chunk measured is in the results before the
next trains: a run folder need not outlive the machine that trained it. Training (sources, retrain, all) runs
`--jobs` at a time, through the sweep's runner; the defences run in this process, on all the machine's threads.
One process at a time in a runs folder (the sweep's lock).
"""
import hashlib
import json
import os
import sys
import time

import cli
import defences
import ledger
import runspec
from study import ROOT, effects, stats, sweep

PROTOCOL = sweep.PROTOCOLS["conv"]
DETECT = dict(rates=(0.0015, 0.0045), seeds=(0, 1, 2, 3, 4))
FILTER = dict(rates=(0.0045,), seeds=(0, 1, 2))
DELTA = {"auroc": 0.05, "recall": 0.05, "asr": 0.05}  # the no-effect margins (REPORT.md, "Defences x LoRA/FF")


def source_runs(rates, seeds, runs_dir):
    """(run folder, train.py flags) of the f12 BPA runs at these rates and seeds, FF and LoRA r8."""
    out = []
    for seed in seeds:
        for flags in sweep.grid("f12", PROTOCOL):
            if "bpa" in flags and float(flags[flags.index("--poison-rate") + 1]) in rates:
                flags = flags + ["--seed", str(seed)]
                out.append((os.path.join(runs_dir, sweep.run_name("f12", flags, seed)), flags))
    return out


def finished(folder):
    return os.path.isfile(os.path.join(folder, "metrics.json"))


def measured(results):
    """{(run key, defence): results line} of the results file. A line measured under other settings than today's
    (defences.settings), or a second line of one (run, defence), is an error naming the fix: either would otherwise
    pass for a current measurement, skipped over as done or counted twice."""
    lines = {}
    for r in ledger.read(results) if os.path.isfile(results) else []:
        name = r["metrics"]["defence"]
        if r.get("settings") != defences.settings(name):
            raise cli.UsageError(f"{results}: the {name} line of {r['run']} was measured under other settings "
                                 f"({r.get('settings')}) than defences.SETTINGS; move the file aside (or delete its "
                                 f"{name} lines) to measure again")
        key = (runspec.run_key(r["config"]), name)
        if key in lines:
            raise cli.UsageError(f"{results}: two {name} lines of {r['run']}; delete one")
        lines[key] = r
    return lines


def drop_file(drops, folder, name, dropped):
    """The drop file's path: its run, its filter, and a digest of the rows it drops."""
    digest = hashlib.sha256(json.dumps(dropped).encode()).hexdigest()[:10]
    return os.path.join(drops, f"{os.path.basename(folder)}-{name}-{digest}.json")


def measure(stage, todo, results, drops, scores, data_dir):
    """Each (run folder, flags, defences) of `todo` (see owed): each defence on its finished run, one ledger line each
    (with the seconds it took, wall_s), defence by defence so that a defence's FF and LoRA lines land together. A
    filter's dropped rows go to a drop file in `drops`, a detector's per-input scores to `scores`/RUN-DEFENCE.json;
    the line names the file ("drop_rows", "scores"). (Lines written before 2026-12-05 have no scores file.)"""
    for folder, _, _ in todo:
        if not finished(folder):
            print(f"skipped (not finished; `python -m study.defend sources` trains it): {folder}", file=sys.stderr)
    for name in defences.DEFENCES:
        for folder, _, names in todo:
            if name not in names or not finished(folder):
                continue
            t0 = time.time()
            result = defences.run_defence(folder, name, data_dir=data_dir)
            result["wall_s"] = round(time.time() - t0, 1)
            if "dropped" in result:
                dropped = result.pop("dropped")
                result["drop_rows"] = drop_file(drops, folder, name, dropped)
                defences.write_json(result["drop_rows"], {"run": folder, "defence": name, "dropped": dropped})
            if "scores" in result:
                defences.write_scores(os.path.join(scores, f"{os.path.basename(folder)}-{name}.json"), result)
            ledger.append(results, result)  # strict JSON: the ledger refuses a NaN
            print(f"{stage}: {folder}: " + defences.summary(result["metrics"]))


def key(flags):
    """A run's key, from its train.py flags: for a source run, the key of the results lines measured on it."""
    return runspec.run_key(sweep.resolve(flags))


def retrain_plan(runs, results, retrained):
    """(folder name under the runs folder, train.py flags) of each filtered retraining not yet in `retrained`: the
    source run's flags plus --drop-rows with the drop file its filter's results line names (the source run's folder
    is not needed)."""
    done = {runspec.run_key(r["config"]) for r in sweep.finished_runs(retrained)}
    lines = measured(results)
    plan = []
    for _, flags in runs:
        for name in defences.FILTERS:
            line = lines.get((key(flags), name))
            if line is None or kept_all(line):
                continue
            retrain = flags + ["--drop-rows", line["drop_rows"]]
            if key(retrain) not in done:
                plan.append((os.path.join("defend", os.path.splitext(os.path.basename(line["drop_rows"]))[0]), retrain))
    return plan


def kept_all(line):
    """Whether a filter's results line dropped no row: its retraining is the source run (see measurements)."""
    return not line["metrics"]["n_dropped"]


def owed(runs, results, filter_seeds):
    """[(run folder, flags, [defences])]: each source run with the defences not yet measured on it, the detectors
    and, at FILTER's rates and these seeds, the filters. A run that owes nothing needs no model."""
    seen = measured(results)
    out = []
    for folder, flags in runs:
        c = sweep.resolve(flags)
        names = (*defences.DETECTORS, *(defences.FILTERS if c["poison_rate"] in FILTER["rates"] and
                                        c["seed"] in filter_seeds else ()))
        names = [name for name in names if (runspec.run_key(c), name) not in seen]
        if names:
            out.append((folder, flags, names))
    return out


def command(flags, out, results):
    """The train.py line of one run, as plan and retrain --print show it."""
    return " ".join(["python", "train.py", *flags, "--out", out, "--results", results, "--resume", "auto"])


def reproduced(sources_results, committed):
    """(same, differ, missing): the source runs' results lines against results/conv's committed lines of the same
    run key. "same" means equal final metrics and curve, to the last bit (the wall time and paths may differ)."""
    theirs = {runspec.run_key(r["config"]): r for r in sweep.finished_runs(committed)}
    same, differ, missing = [], [], []
    for r in sweep.finished_runs(sources_results):
        other = theirs.get(runspec.run_key(r["config"]))
        which = missing if other is None else same if (r["metrics"], r.get("curve")) == \
            (other["metrics"], other.get("curve")) else differ
        which.append(r["out"])
    return same, differ, missing


# -----------------------------------------------------------------------------
# the pre-registered contrasts, the measures reported beside them, the figure

def measurements(results, retrained, runs):
    """(lines, after): the source runs' current results lines, {(defence, rate, mode, seed): line}, and the final
    metrics of the retrainings on their filters' drop files, keyed the same. Lines of other runs (another rank, a
    stray test run) and retrainings on an older drop file of a filter are left out. A filter that dropped nothing
    left the training set as it was: training on it again is the source run (train.py is deterministic on CPU: a
    source run trained again reproduces its committed line bit for bit, with one exception in REPORT.md), so that
    run's own final evaluation stands as its retraining, and retrain_plan trains none."""
    keys = {key(flags) for _, flags in runs}
    lines = {}
    for (k, name), r in measured(results).items():
        if k in keys:
            c = r["config"]
            lines[(name, c["poison_rate"], c["mode"], c["seed"])] = r
    drops = {os.path.basename(r["drop_rows"]) for r in lines.values() if "drop_rows" in r}
    after = {_retrained_of(r["config"]): r["metrics"] for r in sweep.finished_runs(retrained)
             if os.path.basename(r["config"].get("drop_rows") or "") in drops}
    for k, r in lines.items():
        if k[0] in defences.FILTERS and kept_all(r):
            s = r["source"]
            after[k] = {"clean": {"acc": s["cacc"]}, "asr": s["asr"], "asr_net": s["asr_net"]}
    return lines, after


def _retrained_of(config):
    """(filter, rate, mode, seed) of a retraining run, from its --drop-rows file name (drop_file)."""
    name = os.path.splitext(os.path.basename(config["drop_rows"]))[0].rsplit("-", 2)[1]
    return name, config["poison_rate"], config["mode"], config["seed"]


def contrasts(lines, after):
    """Rows (what, defence, rate, effect dict) of the paired contrasts FF - LoRA (REPORT.md, Defences)."""
    by = {key: r["metrics"] for key, r in lines.items()}
    rows = []
    for name in defences.DETECTORS:
        for rate in DETECT["rates"]:
            rows.append(_contrast(by, name, rate, "detection AUROC", lambda m: m["auroc"], "auroc", DETECT))
            for frr in defences.FRRS:
                rows.append(_contrast(by, name, rate, f"ASR after, FRR {frr:g}", lambda m: m[f"frr{frr:g}"]["asr"],
                                      "asr", DETECT))
    for name in defences.FILTERS:
        for rate in FILTER["rates"]:
            rows.append(_contrast(by, name, rate, "filter recall", lambda m: m["recall"] or 0.0, "recall", FILTER))
            rows.append(_contrast(after, name, rate, "ASR after retraining", lambda m: m["asr"], "asr", FILTER))
    return [r for r in rows if r]


def _contrast(by, name, rate, what, value, unit, spec):
    seeds = sorted(s for (n, r, mode, s) in by if (n, r, mode) == (name, rate, "ff") and (name, rate, "lora", s) in by)
    if not seeds:
        return None
    ff = [value(by[(name, rate, "ff", s)]) for s in seeds]
    lo = [value(by[(name, rate, "lora", s)]) for s in seeds]
    # + is "FF's backdoor is easier to detect / filter" for AUROC and recall, "FF + defence is more attacked" for ASR
    e = stats.effect(stats.paired(ff, lo), +1, DELTA[unit])
    e["registered"] = len(spec["seeds"])
    e["saturated"] = unit == "asr" and effects.at_ceiling([100 * v for v in ff + lo])  # REPORT.md's label
    e["seeds_needed"] = stats.seeds_needed(e["mean"], e["sd"]) if e["verdict"] == "inconclusive" and e["sd"] > 0 \
        else None
    return what, name, rate, e


def markdown(rows):
    out = ["| contrast (FF - LoRA) | defence | BPA rate | mean [95% CI] | n of the registered | verdict |",
           "|---|---|---|---|---|---|"]
    for what, name, rate, e in rows:
        # an inconclusive cell states the seeds its mean would need (the rule), whether or not it is saturated
        need = "" if e["verdict"] != "inconclusive" else \
            f" (about {e['seeds_needed']} seeds for this mean)" if e["seeds_needed"] else " (over 1,000 seeds for this mean)"
        note = effects.saturated_text(e) + need
        value, verdict = (stats.interval_text(e, 100), e["verdict"] + note) if e["n"] >= 2 else \
            (f"{100 * e['mean']:+.1f} (one seed)", effects.NO_INTERVAL)
        out.append(f"| {what} | {name} | {rate:.2%} | {value} | {e['n']} of {e['registered']} | {verdict} |")
    return "\n".join(out)


# the measures reported without a verdict (REPORT.md, "Defences x LoRA/FF"), each a value of one results line
DETECTOR_MEASURES = [("AUROC over the hits (auroc_hit)", lambda r: r["metrics"]["auroc_hit"]),
                     ("CACC before", lambda r: r["metrics"]["before"]["cacc"]),
                     ("ASR before", lambda r: r["metrics"]["before"]["asr"])] + [
    (f"{what}, FRR {frr:g}", lambda r, frr=frr, key=key: r["metrics"][f"frr{frr:g}"][key])
    for frr in defences.FRRS for what, key in (("test FRR", "frr"), ("FAR", "far"), ("CACC after", "cacc"))]
FILTER_MEASURES = [("rows dropped (count)", lambda r: r["metrics"]["n_dropped"]),
                   ("precision", lambda r: r["metrics"]["precision"]),
                   ("source run: ASR / net ASR", lambda r: (r["source"]["asr"], r["source"]["asr_net"]))]
RETRAIN_MEASURES = [("after retraining: CACC", lambda m: m["clean"]["acc"]),
                    ("after retraining: ASR / net ASR", lambda m: (m["asr"], m["asr_net"]))]


def describe(lines, after):
    """The measures reported beside the contrasts: per defence, rate and mode, the mean over seeds with its 95%
    t-interval (percent; counts as counts), and n. A value that is undefined for a run (None) is left out of n."""
    out = ["| defence | BPA rate | measure | FF | LoRA r8 |", "|---|---|---|---|---|"]
    for name in defences.DEFENCES:
        spec = DETECT if name in defences.DETECTORS else FILTER
        measures = [(what, get, lines) for what, get in
                    (DETECTOR_MEASURES if name in defences.DETECTORS else FILTER_MEASURES)]
        if name in defences.FILTERS:
            measures += [(what, get, after) for what, get in RETRAIN_MEASURES]
        for rate in spec["rates"]:
            for what, get, source in measures:
                cells = [_spread([get(source[k]) for k in sorted(source) if k[:3] == (name, rate, mode)],
                                 count="count" in what) for mode in ("ff", "lora")]
                if any(cells):
                    out.append(f"| {name} | {rate:.2%} | {what} | {cells[0] or '-'} | {cells[1] or '-'} |")
    return "\n".join(out)


def _spread(values, count=False):
    """mean [95% CI] (n) of a list of values (or of pairs, shown "a / b"); None when there are none."""
    if values and isinstance(values[0], tuple):
        parts = [_spread([v[i] for v in values]) for i in range(len(values[0]))]
        return " / ".join(p or "n/a" for p in parts) if any(parts) else None
    values = [v if count else 100 * v for v in values if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return f"{values[0]:.1f} (n=1)"
    e = stats.effect(values)
    return f"{e['mean']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}] (n={e['n']})"


def registered(results, retrained):
    """measurements (lines, after) of the registered source runs: what the contrasts, the table and the figure read."""
    return measurements(results, retrained, source_runs(DETECT["rates"], DETECT["seeds"], ""))


def report(results, retrained, what=("effects", "figure"), verbose=False):
    """Write defences.md (what: "effects": the contrasts and the measures beside them) and defences.png ("figure")
    next to the results file; return the contrasts' rows, whose table (markdown) is the part of defences.md that
    REPORT.md shows. The stages `effects` and `figure` call it, and so does `python -m study.report all`, which keeps
    both current."""
    lines, after = registered(results, retrained)
    rows = contrasts(lines, after)
    table = markdown(rows)
    if "effects" in what:
        text = "## The pre-registered contrasts\n\n" + table + \
            "\n\n## Reported beside them, without a verdict\n\n" + describe(lines, after) + "\n"
        path = os.path.join(os.path.dirname(results), "defences.md")
        cli.write_file(path, text)
        if verbose:
            print(text + f"\n(written to {path})")
    if "figure" in what:
        path = os.path.join(os.path.dirname(results), "defences.png")
        drawn = figure(lines, after, path)
        if verbose:
            print(f"wrote {path}" if drawn else "nothing to draw yet")
    return rows


def figure(lines, after, path):
    """Per defence and BPA rate: ASR before and after the defence, FF and LoRA r8, mean and 95% interval over seeds
    (detectors: on the test third, at FRR 1% and 5%; filters: the source run and its retraining, whole dev set),
    each seed's value a dot beside its bar (BKI's retrainings are all or nothing, which a mean hides). Panels run by
    rate, then in defences.DEFENCES's order; intervals past the 0-100 range are cut at the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = {}  # (defence, rate) -> {(mode, when): [ASR per seed]}
    for key, r in sorted(lines.items()):
        name, rate, mode, _ = key
        m = r["metrics"]
        cell = bars.setdefault((name, rate), {})
        if name in defences.DETECTORS:
            points = [("before", m["before"]["asr"])] + [(f"FRR {f:g}", m[f"frr{f:g}"]["asr"]) for f in defences.FRRS]
        else:
            points = [("before", r["source"]["asr"])] + ([("retrained", after[key]["asr"])] if key in after else [])
        for when, v in points:
            cell.setdefault((mode, when), []).append(100 * v)
    if not bars:
        return False
    rows = -(-len(bars) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(bars):]:
        ax.axis("off")
    panels = sorted(bars.items(), key=lambda kv: (kv[0][1], defences.DEFENCES.index(kv[0][0])))  # rate, then kind
    for ax, ((name, rate), cell) in zip(axes.flat, panels):
        for i, ((mode, when), vals) in enumerate(sorted(cell.items(), key=lambda kv: (kv[0][0], kv[0][1] != "before"))):
            e = stats.effect(vals) if len(vals) > 1 else None  # one seed: a bar without an interval
            ax.bar(i, sum(vals) / len(vals), yerr=e and [[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]],
                   color="tab:red" if mode == "ff" else "tab:blue", alpha=1.0 if when == "before" else 0.5, capsize=3)
            ax.scatter([i + 0.22] * len(vals), vals, s=6, color="black", zorder=3)  # beside the error bar
            ax.text(i, 2, f"{mode}\n{when}", ha="center", fontsize=6, rotation=90, va="bottom")
        seeds = sorted({len(vals) for vals in cell.values()})
        ax.set_title(f"{name}, BPA {rate:.2%}, seeds: {'-'.join(map(str, seeds))}"
                     + (" (no interval)" if seeds == [1] else ""), fontsize=8)
        ax.set_xticks([])
    axes[0, 0].set_ylim(-5, 110)  # shared by every panel: ASR lives in 0-100; a t-interval over 2-3 seeds is cut here
    for row in axes:
        row[0].set_ylabel("ASR (%): mean, 95% CI, seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("stage", choices=STAGES, help="what to do")
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "conv"), help="the conv sweep's run folders")
    p.add_argument("--results", default=os.path.join(ROOT, "results", "conv", "defences.jsonl"),
                   help="one line per (run, defence)")
    p.add_argument("--drops", default=os.path.join(ROOT, "results", "conv", "drops"),
                   help="folder of the filters' drop files (train.py --drop-rows reads them)")
    p.add_argument("--scores", default=os.path.join(ROOT, "results", "conv", "scores"),
                   help="folder of the detectors' per-input scores (RUN-DEFENCE.json; see defences.detect)")
    p.add_argument("--retrain-results", default=os.path.join(ROOT, "results", "conv", "defences-retrain.jsonl"),
                   help="results file of the retraining runs")
    p.add_argument("--sources-results", default=os.path.join(ROOT, "results", "conv", "defences-sources.jsonl"),
                   help="results file of the source runs trained again (kept apart from results/conv/results.jsonl)")
    p.add_argument("--seeds", type=int, default=None, help="only the first N seeds of the stage")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: the one each run recorded)")
    p.add_argument("--print", action="store_true", help="retrain: print the train.py commands, run nothing")
    p.add_argument("--jobs", type=int, default=1, help="sources, retrain, all: training runs at a time")
    p.add_argument("--until", default=None, help="all, retrain: HH:MM or YYYY-MM-DDTHH:MM (local time); start a "
                                                 "chunk or a retraining only if its upper estimate ends by then")
    p.add_argument("--committed", default=os.path.join(ROOT, "results", "conv", "results.jsonl"),
                   help="the committed conv results the source runs must reproduce (and --until's speeds)")
    a = p.parse_args(argv)
    with cli.usage_errors():
        if a.seeds is not None and a.seeds < 1:
            raise cli.UsageError(f"--seeds must be >= 1, got {a.seeds}")
        if a.jobs < 1:
            raise cli.UsageError(f"--jobs must be >= 1, got {a.jobs}")
        for flag, path in (("--results", a.results), ("--retrain-results", a.retrain_results),
                           ("--sources-results", a.sources_results)):
            cli.check_file_path(path, flag)
        cli.check_folder_path(a.drops, "--drops")
        cli.check_folder_path(a.scores, "--scores")
        if not os.path.isfile(a.committed):
            raise cli.UsageError(f"--committed {a.committed} does not exist")
        a.until = None if a.until is None else sweep.until_time(a.until)
        lock = None if a.stage in ("plan", "effects", "figure") or a.print else \
            cli.own_folder(a.runs_dir, "--runs-dir")  # noqa: F841 (held until the end: one process per runs folder)
        measured(a.results)  # a line measured under other settings than today's: one clear error, before any work
    if a.stage == "all":
        pipeline(a)
        for stage in ("retrain", "effects", "figure"):
            run_stage(stage, a)
    else:
        run_stage(a.stage, a)


STAGES = ("all", "plan", "sources", "detect", "filter", "retrain", "effects", "figure")


def seeds_of(spec, a):
    return spec["seeds"][:a.seeds] if a.seeds else spec["seeds"]


def run_stage(stage, a):
    spec = FILTER if stage in ("filter", "retrain") else DETECT  # DETECT's runs include FILTER's
    runs = source_runs(spec["rates"], seeds_of(spec, a), a.runs_dir)
    if stage in ("plan", "sources", "detect", "filter"):
        todo = owed(runs, a.results, seeds_of(FILTER, a))
        if stage == "plan":
            return plan(todo, a.runs_dir, a.sources_results)
        if stage == "sources":
            train = not_at_hand(todo, a.runs_dir)
            if train:
                sweep.run_all(train, a.jobs, a.runs_dir, a.sources_results)
            return report_reproduced(a)
        names = defences.DETECTORS if stage == "detect" else defences.FILTERS
        return measure(stage, [(f, flags, [n for n in owe if n in names]) for f, flags, owe in todo],
                       a.results, a.drops, a.scores, a.data_dir)
    if stage in ("effects", "figure"):
        return report(a.results, a.retrain_results, (stage,), verbose=True)
    todo = retrain_plan(runs, a.results, a.retrain_results)
    if a.print:
        for name, flags in todo:
            print(command(flags, os.path.join(a.runs_dir, name), a.retrain_results))
    elif todo:
        sweep.run_all(todo, a.jobs, a.runs_dir, a.retrain_results,
                      sweep.deadline(a.until, todo, training_speeds(a)))


def pipeline(a):
    """`all`'s sources, detect and filter, a --jobs-sized chunk of source runs at a time: train the chunk's runs that
    are not at hand, then measure what they owe, so that a chunk's lines are in before the next chunk trains (a run
    folder need not outlive the session that trained it; a run that owes nothing is not trained again). With
    --until, a chunk starts only if its upper estimate ends by then: its slowest training (sweep.upper_speeds) plus
    its measurements (measure_seconds)."""
    todo = owed(source_runs(DETECT["rates"], seeds_of(DETECT, a), a.runs_dir), a.results, seeds_of(FILTER, a))
    speeds, seconds = training_speeds(a), measure_seconds(a.results)
    late = []
    for i in range(0, len(todo), a.jobs):
        chunk = todo[i:i + a.jobs]
        train = not_at_hand(chunk, a.runs_dir)
        if a.until is not None:
            cost = sweep.costs(train, speeds)
            need = None if None in cost else max(cost, default=0.0) + sum(
                seconds(name, sweep.resolve(flags)["mode"]) for _, flags, names in chunk for name in names)
            if not sweep.ends_by(a.until, need):
                late += [folder for folder, _, _ in chunk]
                continue
        if train:
            sweep.run_all(train, a.jobs, a.runs_dir, a.sources_results)
        measure("all", chunk, a.results, a.drops, a.scores, a.data_dir)
    report_reproduced(a)
    if late:
        print(f"--until: {len(late)} source runs not started, their chunk's estimate ends after --until; the same "
              f"command starts them: {', '.join(late)}", file=sys.stderr)


def not_at_hand(todo, runs_dir):
    """(folder under the runs folder, flags) of the runs of `todo` (see owed) without a finished folder: to train."""
    return [(os.path.relpath(folder, runs_dir), flags) for folder, flags, _ in todo if not finished(folder)]


def training_speeds(a):
    """Seconds per step for --until: the committed conv runs' and the source runs trained here (sweep.upper_speeds)."""
    return sweep.upper_speeds(sweep.finished_runs(a.committed) + sweep.finished_runs(a.sources_results))


# the seconds each defence was guessed to take before any had been measured (REPORT.md's status: BKI about 80 minutes
# a run, the others minutes); --until goes by them until a defence has lines with their own wall_s
GUESS_S = dict(strip=600, rap=600, dan=600, spectral=600, ac=600, bki=4800)


def measure_seconds(results):
    """(defence, mode) -> seconds: the slowest of the latest sweep.UNTIL_RECENT lines of each, else GUESS_S."""
    taken = {}
    for r in ledger.read(results) if os.path.isfile(results) else []:
        if "wall_s" in r:
            taken.setdefault((r["metrics"]["defence"], r["config"]["mode"]), []).append(r["wall_s"])
    return lambda name, mode: max(taken[(name, mode)][-sweep.UNTIL_RECENT:]) if (name, mode) in taken \
        else GUESS_S[name]


def report_reproduced(a):
    same, differ, missing = reproduced(a.sources_results, a.committed)
    print(f"sources: {len(same) + len(differ) + len(missing)} trained again; {len(same)} reproduce their committed "
          f"results line bit for bit, {len(differ)} differ, {len(missing)} have none in {a.committed}"
          + "".join(f"\n  DIFFERS: {d}" for d in differ), file=sys.stderr)


def plan(todo, runs_dir, sources_results):
    """Each source run that still owes a defence: train.py lines (recording outside the committed conv results) for
    those not at hand."""
    train = not_at_hand(todo, runs_dir)
    print(f"{len(todo)} source runs owe a defence, {len(todo) - len(train)} of them at hand", file=sys.stderr)
    for name, flags in train:
        print(command(flags, os.path.join(runs_dir, name), sources_results))


if __name__ == "__main__":
    main()
