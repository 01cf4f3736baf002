"""
The defences experiment (issue 26) on the converged protocol's BPA runs (the `f12` grid of study/sweep.py): every
detector and filter of defences.py on each run, one results line per (run, defence), then training again on each
filtered training set. Pre-registration: results/REPORT.md, "Defences x LoRA/FF".

    python -m study.defend all --jobs 2       # everything below in order, resumable: the one background command
    python -m study.defend plan               # the source runs, whether each is finished, train.py lines for the rest
    python -m study.defend sources --jobs 2   # train the source runs not at hand; check they reproduce results/conv
    python -m study.defend detect             # STRIP, RAP, DAN: BPA 0.15% and 0.45%, FF and LoRA r8, seeds 0-4
    python -m study.defend filter             # spectral, AC, BKI: BPA 0.45%, seeds 0-2; writes the drop files
    python -m study.defend retrain --jobs 2   # train.py --drop-rows on each filtered set (--print: the commands)
    python -m study.defend effects            # the paired contrasts with their verdicts, and the other measures: defences.md
    python -m study.defend figure             # ASR before and after each defence, FF and LoRA: defences.png

A (run, defence) already in the results file is skipped, so every stage can be stopped and continued; each line
records its defence's settings (defences.SETTINGS), and a line measured under other settings stops the stage with
an error rather than pass for a current one. A filter's drop file is named by its run, its filter and a digest of
the rows it drops, so a retraining is keyed on exactly the rows it left out. The source
runs are the sweep's own folders (runs/conv/f12/...): `sources` trains those not finished (`plan` prints their
train.py lines), recording into runs/conv/defend-sources.jsonl so that results/conv/results.jsonl is left alone. The
same flags give the same run, so each source run's results line must equal its committed one in results/conv:
`sources` compares them and says so (a mismatch is reported, not hidden; the defences still run on the new run).
Training (sources, retrain) runs `--jobs` at a time, through the sweep's runner; detect and filter run in this
process, on all the machine's threads. One process at a time in a runs folder (the sweep's lock).
"""
import hashlib
import json
import os
import sys

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


def measure(stage, runs, names, results, drops, data_dir):
    """Every defence on every finished source run not yet in the results file, one ledger line each."""
    seen = measured(results)
    for folder, _ in runs:
        if not finished(folder):
            print(f"skipped (not finished; `python -m study.defend sources` trains it): {folder}", file=sys.stderr)
            continue
        key = runspec.run_key(_config(folder))
        for name in names:
            if (key, name) in seen:
                continue
            result = defences.run_defence(folder, name, data_dir=data_dir)
            if "dropped" in result:
                dropped = result.pop("dropped")
                result["drop_rows"] = drop_file(drops, folder, name, dropped)
                defences.write_json(result["drop_rows"], {"run": folder, "defence": name, "dropped": dropped})
            ledger.append(results, result)  # strict JSON: the ledger refuses a NaN
            print(f"{stage}: {folder}: " + defences.summary(result["metrics"]))


def _config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["run"]


def retrain_plan(runs, results, retrained):
    """(folder name under the runs folder, train.py flags) of each filtered retraining not yet in `retrained`: the
    source run's flags plus --drop-rows with the drop file its filter's results line names."""
    done = {runspec.run_key(r["config"]) for r in sweep.finished_runs(retrained)}
    lines = measured(results)
    plan = []
    for folder, flags in runs:
        if not finished(folder):
            continue
        key = runspec.run_key(_config(folder))
        for name in defences.FILTERS:
            line = lines.get((key, name))
            if line is None:
                continue
            retrain = flags + ["--drop-rows", line["drop_rows"]]
            if runspec.run_key(sweep.resolve(retrain)) not in done:
                plan.append((os.path.join("defend", os.path.splitext(os.path.basename(line["drop_rows"]))[0]), retrain))
    return plan


def sources_file(runs_dir):
    return os.path.join(runs_dir, "defend-sources.jsonl")


def unfinished(runs):
    """The (run folder, train.py flags) of the source runs without their final metrics."""
    return [(folder, flags) for folder, flags in runs if not finished(folder)]


def command(flags, out, results):
    """The train.py line of one run, as plan and retrain --print show it."""
    return " ".join(["python", "train.py", *flags, "--out", out, "--results", results, "--resume", "auto"])


def reproduced(runs_dir, committed):
    """(same, differ, missing): the source runs' results lines against results/conv's committed lines of the same
    run key. "same" means equal final metrics and curve, to the last bit (the wall time and paths may differ)."""
    theirs = {runspec.run_key(r["config"]): r for r in sweep.finished_runs(committed)}
    same, differ, missing = [], [], []
    for r in sweep.finished_runs(sources_file(runs_dir)):
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
    stray test run) and retrainings on an older drop file of a filter are left out."""
    keys = {runspec.run_key(sweep.resolve(flags)) for _, flags in runs}
    lines = {}
    for (key, name), r in measured(results).items():
        if key in keys:
            c = r["config"]
            lines[(name, c["poison_rate"], c["mode"], c["seed"])] = r
    drops = {os.path.basename(r["drop_rows"]) for r in lines.values() if "drop_rows" in r}
    after = {_retrained_of(r["config"]): r["metrics"] for r in sweep.finished_runs(retrained)
             if os.path.basename(r["config"].get("drop_rows") or "") in drops}
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
    e["saturated"] = unit == "asr" and 100 * min(ff + lo) >= effects.CEILING  # REPORT.md's label, as elsewhere
    e["seeds_needed"] = stats.seeds_needed(e["mean"], e["sd"]) if e["verdict"] == "inconclusive" and e["sd"] > 0 \
        else None
    return what, name, rate, e


def markdown(rows):
    out = ["| contrast (FF - LoRA) | defence | BPA rate | mean [95% CI] | n of the registered | verdict |",
           "|---|---|---|---|---|---|"]
    for what, name, rate, e in rows:
        note = effects.SATURATED if e["saturated"] else \
            f" (about {e['seeds_needed']} seeds for this mean)" if e["seeds_needed"] else ""
        out.append(f"| {what} | {name} | {rate:.2%} | {stats.interval_text(e, 100)} | {e['n']} of {e['registered']} | "
                   f"{e['verdict']}{note} |")
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


def figure(lines, after, path):
    """Per defence and BPA rate: ASR before and after the defence, FF and LoRA r8, mean and 95% interval over seeds
    (detectors: on the test third, at FRR 1% and 5%; filters: the source run and its retraining, whole dev set)."""
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
    for ax, ((name, rate), cell) in zip(axes.flat, sorted(bars.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
        for i, ((mode, when), vals) in enumerate(sorted(cell.items(), key=lambda kv: (kv[0][0], kv[0][1] != "before"))):
            e = stats.effect(vals) if len(vals) > 1 else dict(mean=vals[0], lo=vals[0], hi=vals[0])
            ax.bar(i, e["mean"], yerr=[[e["mean"] - e["lo"]], [e["hi"] - e["mean"]]],
                   color="tab:red" if mode == "ff" else "tab:blue", alpha=1.0 if when == "before" else 0.5, capsize=3)
            ax.text(i, 2, f"{mode}\n{when}", ha="center", fontsize=6, rotation=90, va="bottom")
        ax.set_title(f"{name}, BPA {rate:.2%}", fontsize=8)
        ax.set_xticks([])
    for row in axes:
        row[0].set_ylabel("ASR (%), mean and 95% CI")
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
    p.add_argument("--retrain-results", default=os.path.join(ROOT, "results", "conv", "defences-retrain.jsonl"),
                   help="results file of the retraining runs")
    p.add_argument("--seeds", type=int, default=None, help="only the first N seeds of the stage")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: the one each run recorded)")
    p.add_argument("--print", action="store_true", help="retrain: print the train.py commands, run nothing")
    p.add_argument("--jobs", type=int, default=1, help="sources, retrain, all: training runs at a time")
    p.add_argument("--committed", default=os.path.join(ROOT, "results", "conv", "results.jsonl"),
                   help="sources, all: the committed results the source runs must reproduce")
    a = p.parse_args(argv)
    with cli.usage_errors():
        if a.seeds is not None and a.seeds < 1:
            raise cli.UsageError(f"--seeds must be >= 1, got {a.seeds}")
        if a.jobs < 1:
            raise cli.UsageError(f"--jobs must be >= 1, got {a.jobs}")
        for flag, path in (("--results", a.results), ("--retrain-results", a.retrain_results)):
            cli.check_file_path(path, flag)
        cli.check_folder_path(a.drops, "--drops")
        if a.stage in ("sources", "all") and not os.path.isfile(a.committed):
            raise cli.UsageError(f"--committed {a.committed}: no such results file")
        lock = None if a.stage in ("plan", "effects", "figure") or a.print else \
            cli.own_folder(a.runs_dir, "--runs-dir")  # noqa: F841 (held until the end: one process per runs folder)
        measured(a.results)  # a line measured under other settings than today's: one clear error, before any work
    for stage in (("sources", "detect", "filter", "retrain", "effects", "figure") if a.stage == "all" else (a.stage,)):
        run_stage(stage, a)


STAGES = ("all", "plan", "sources", "detect", "filter", "retrain", "effects", "figure")


def run_stage(stage, a):
    spec = FILTER if stage in ("filter", "retrain") else DETECT  # DETECT's runs include FILTER's
    seeds = spec["seeds"][:a.seeds] if a.seeds else spec["seeds"]
    runs = source_runs(spec["rates"], seeds, a.runs_dir)
    if stage == "plan":
        return plan(runs, a.runs_dir)
    if stage == "sources":
        todo = [(os.path.relpath(folder, a.runs_dir), flags) for folder, flags in unfinished(runs)]
        if todo:
            sweep.run_all(todo, a.jobs, a.runs_dir, sources_file(a.runs_dir))
        same, differ, missing = reproduced(a.runs_dir, a.committed)
        print(f"sources: {len(runs)} finished; {len(same)} reproduce their committed results line bit for bit, "
              f"{len(differ)} differ, {len(missing)} have none in {a.committed}"
              + "".join(f"\n  DIFFERS: {d}" for d in differ), file=sys.stderr)
        return
    if stage in ("detect", "filter"):
        names = defences.DETECTORS if stage == "detect" else defences.FILTERS
        return measure(stage, runs, names, a.results, a.drops, a.data_dir)
    if stage in ("effects", "figure"):
        lines, after = measurements(a.results, a.retrain_results, source_runs(DETECT["rates"], DETECT["seeds"],
                                                                               a.runs_dir))
    if stage == "effects":
        text = "## The pre-registered contrasts\n\n" + markdown(contrasts(lines, after)) + \
            "\n\n## Reported beside them, without a verdict\n\n" + describe(lines, after) + "\n"
        path = os.path.join(os.path.dirname(a.results), "defences.md")
        cli.write_file(path, text)
        return print(text + f"\n(written to {path})")
    if stage == "figure":
        path = os.path.join(os.path.dirname(a.results), "defences.png")
        return print(f"wrote {path}" if figure(lines, after, path) else "nothing to draw yet")
    todo = retrain_plan(runs, a.results, a.retrain_results)
    if a.print:
        for name, flags in todo:
            print(command(flags, os.path.join(a.runs_dir, name), a.retrain_results))
    elif todo:
        sweep.run_all(todo, a.jobs, a.runs_dir, a.retrain_results)


def plan(runs, runs_dir):
    """Each source run's state; train.py lines (recording outside the committed results) for the unfinished."""
    todo = unfinished(runs)
    print(f"{len(runs) - len(todo)} of {len(runs)} source runs finished", file=sys.stderr)
    for folder, flags in todo:
        print(command(flags, folder, sources_file(runs_dir)))


if __name__ == "__main__":
    main()
