"""
Evaluation: clean accuracy/precision/recall/F1 (CACC) and, for backdoor runs, the attack success rate (ASR).

    python evaluate.py RUN_DIR                       # re-evaluate a saved run from its weights
    python evaluate.py report RESULTS.jsonl --out D  # mean +- std over seeds: Markdown tables + the paper's figures

Definitions (positive class = 1, as in the paper):
    accuracy  = (TP + TN) / N
    precision = TP / (TP + FP)        (0 when nothing is predicted positive)
    recall    = TP / (TP + FN)        (0 when there are no positives)
    F1        = 2 P R / (P + R)       (0 when P + R = 0)
    ASR       = fraction predicted as the target label on the triggered dev samples whose true label is not the
                target (attacks.triggered_dev); the paper instead triggers *all* dev samples and reports the four
                metrics against the true labels (attacks.triggered_all) -- we report both.
"""
import json
import math
import os
import sys
from collections import defaultdict

import torch

BACKDOORS = ("bpa", "clbpa", "ilbpa", "mt", "sbpa")


# -----------------------------------------------------------------------------
# metrics

def classification_metrics(preds, labels):
    """Accuracy, precision, recall, F1 for the positive class 1, from two equal-length int sequences."""
    preds, labels = [int(p) for p in preds], [int(y) for y in labels]
    if len(preds) != len(labels) or not preds:
        raise ValueError(f"need equal, non-zero numbers of predictions and labels (got {len(preds)}, {len(labels)})")
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y != 1 for p, y in zip(preds, labels))
    fn = sum(p != 1 and y == 1 for p, y in zip(preds, labels))
    correct = sum(p == y for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(acc=correct / len(labels), precision=precision, recall=recall, f1=f1, n=len(labels))


@torch.no_grad()
def predict(model, examples, tokenizer, max_len, batch_size=64, device="cpu", autocast_dtype=None):
    """Predicted labels for a list of data.Example, in order. Puts the model in eval mode (no dropout)."""
    import data
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(examples), batch_size):
        batch = data.collate(examples[i:i + batch_size], tokenizer, max_len)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            preds.append(model(**batch).argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(preds).tolist()


def evaluate(model, tokenizer, dev, attack="none", attack_opts=None, max_len=128, paper_view=True, **kw):
    """All metrics of one model: {"clean": {...}} and, for backdoor attacks, "asr" and (with paper_view) "triggered",
    the paper's view: the four metrics on the whole dev set with the trigger applied."""
    import attacks
    clean = predict(model, dev, tokenizer, max_len, **kw)
    out = {"clean": classification_metrics(clean, [e.label for e in dev])}
    if attack in BACKDOORS:
        opts = dict(attack_opts or {})
        target = opts.get("target", 1)
        asr_set = attacks.triggered_dev(attack, dev, **opts)  # the non-target dev rows, in dev order, triggered
        hit = [p == target for p in predict(model, asr_set, tokenizer, max_len, **kw)]
        out["asr"] = sum(hit) / len(asr_set)
        # net of the model's own false positives: only the negatives it gets right without the trigger count
        right = [p != target for p, e in zip(clean, dev) if e.label != target]
        out["asr_net"] = sum(h for h, r in zip(hit, right) if r) / sum(right) if any(right) else float("nan")
        if not paper_view:
            return out
        trig = attacks.triggered_all(attack, dev, **opts)
        out["triggered"] = classification_metrics(predict(model, trig, tokenizer, max_len, **kw),
                                                  [e.label for e in trig])
    return out


def summary_line(metrics):
    """One human line: CACC and, for backdoor runs, ASR."""
    c = metrics["clean"]
    s = f"CACC {c['acc']:.4f} (P {c['precision']:.4f} R {c['recall']:.4f} F1 {c['f1']:.4f}, n={c['n']})"
    if "asr" in metrics:
        s += f"  ASR {metrics['asr']:.4f} (net {metrics['asr_net']:.4f})" if "asr_net" in metrics else f"  ASR {metrics['asr']:.4f}"
    if "triggered" in metrics:
        s += f"  triggered-dev acc {metrics['triggered']['acc']:.4f}"
    return s


# -----------------------------------------------------------------------------
# python evaluate.py RUN_DIR

def load_run(run_dir):
    """(the run's flags as a Namespace, its trained model) rebuilt from config.json and the saved weights."""
    import argparse
    import lora
    import model as M
    import train
    with open(os.path.join(run_dir, "config.json")) as f:
        args = argparse.Namespace(**json.load(f)["run"])
    if args.mode == "lora":
        net, _ = train.build_model(args)
        lora.load_lora(net, os.path.join(run_dir, "adapter.safetensors"))
    else:
        net = M.from_pretrained(os.path.join(run_dir, "model"), verbose=False)
    return args, net


def reevaluate(run_dir):
    """Rebuild a finished run from config.json + its saved weights and evaluate it again on the dev set."""
    import data
    import train
    args, net = load_run(run_dir)
    dev = data.load_split(args.task, "dev", args.data_dir, cap=args.dev_cap, seed=args.seed)
    return evaluate(net, data.Tokenizer(args.model), dev, args.attack, train.attack_opts(args), args.max_len)


# -----------------------------------------------------------------------------
# python evaluate.py report RESULTS.jsonl

def load_results(path):
    """Runs from a results JSONL; a run that appears twice (same full config) counts once (the last line)."""
    runs = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
                runs[json.dumps(r["config"], sort_keys=True)] = r
    return list(runs.values())


def flat_metrics(r):
    m = r["metrics"]
    out = {f"clean_{k}": v for k, v in m["clean"].items() if k != "n"}
    if "asr" in m:
        out["asr"] = m["asr"]
        out.update({f"trig_{k}": v for k, v in m["triggered"].items() if k != "n"})
    return out


def setting_key(config):
    """A run's setting: its config without the seed (json), shared by the runs that repeat it over seeds."""
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def group_runs(runs):
    """Group runs whose configs differ only in the seed: {setting_key: [flat metrics, ...]}."""
    groups = defaultdict(list)
    for r in runs:
        groups[setting_key(r["config"])].append(flat_metrics(r))
    return groups


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


TABLE_KEYS = ["task", "mode", "rank", "init", "init_scale", "attack", "poison_rate"]
TABLE_METRICS = ["clean_acc", "clean_precision", "clean_recall", "clean_f1", "asr", "trig_acc"]


def markdown_table(groups):
    head = TABLE_KEYS + ["seeds"] + TABLE_METRICS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=lambda k: [str(json.loads(k).get(c)) for c in TABLE_KEYS]):
        cfg, ms = json.loads(key), groups[key]
        lora_only = ("rank", "init", "init_scale")  # meaningless for full fine-tuning
        cells = [_fmt(cfg.get(c)) if not (c in lora_only and cfg["mode"] == "ff") else "-" for c in TABLE_KEYS]
        cells.append(str(len(ms)))
        for m in TABLE_METRICS:
            vals = [x[m] for x in ms if m in x]
            cells.append("%.2f ± %.2f" % tuple(100 * v for v in mean_std(vals)) if vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# what each figure of the paper plots: x axis, the runs it uses, the series (bands), and one panel per metric
FIGURES = {
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
TABLES = {
    "tabE1": dict(x="attack", attacks=("clbpa", "ilbpa", "mt", "sbpa"), series="mode", lora={"rank": 8, "init": "kaiming_uniform"},
                  panels=["asr", "clean_acc", "clean_precision", "clean_recall", "clean_f1"], title="Extra backdoors (Table E.1)"),
    **{f"tabE2 {init}": dict(x="init_scale", attacks=("none", "bpa"), series="attack", lora={"rank": 8, "init": init}, modes=("lora",),
                             panels=["clean_acc", "asr"], xs=(0.333, 1.0, 2.0), title=f"A-init type {init} x variance scale k (Table E.2)")
       for init in ("gaussian", "kaiming_uniform")},  # xavier_normal = gaussian here (sweep.py, tabE2)
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
        if spec["series"] == "attack":  # rank/variance sweeps: one band per (attack, rate)
            series = "clean" if series == "none" else f"{series} {cfg['poison_rate']:g}"
        for panel in spec["panels"]:
            vals = [m[panel] for m in ms if panel in m]
            if vals:
                out[panel][series].append((cfg[spec["x"]], *mean_std(vals), len(vals)))
    # a series is a sweep over x: points that only share a rank/variance with another grid (e.g. fig1's rank-8
    # runs at other rates) have fewer than 3 x values there and are left out
    keep = 3 if spec["series"] == "attack" else 1
    kept = {p: {s: sorted(pts) for s, pts in series.items() if len({x for x, *_ in pts}) >= keep} for p, series in out.items()}
    return {p: series for p, series in kept.items() if series}


def figure_table(data_, spec):
    """One figure's or table's numbers as Markdown: a row per x value, a column per (metric, series), in % ("mean ±
    std (n seeds)"); what REPORT.md quotes."""
    cols = [(p, s) for p in spec["panels"] if p in data_ for s in sorted(data_[p], key=lambda s: (s != "clean", s))]
    cell = lambda m, sd, n: "%.1f ± %.1f (%d)" % (100 * m, 100 * sd, n) if n > 1 else "%.1f (1)" % (100 * m)
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


def spearman(x, y):
    """Spearman's rank correlation (average ranks for ties) = Pearson correlation of the ranks; nan if constant."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[v.argsort(kind="mergesort")] = np.arange(1, len(v) + 1)
        for value in np.unique(v):  # ties share the mean of their ranks
            r[v == value] = r[v == value].mean()
        return r
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"spearman needs two equal-length samples of at least 3 (got {len(x)}, {len(y)})")
    rx, ry = ranks(x), ranks(y)
    return float("nan") if rx.std() == 0 or ry.std() == 0 else float(np.corrcoef(rx, ry)[0, 1])


def _pairs(runs, attack):
    """(clean run, attacked run) pairs whose configs differ only in attack and rate (same seed, same everything)."""
    strip = lambda c: json.dumps({k: v for k, v in c.items() if k not in ("attack", "poison_rate")}, sort_keys=True)
    clean = {strip(r["config"]): r for r in runs if r["config"]["attack"] == "none"}
    return [(clean[strip(r["config"])], r) for r in runs
            if r["config"]["attack"] == attack and strip(r["config"]) in clean]


def _default_lora(c):
    return c["mode"] == "ff" or (c["rank"] == 8 and c["init"] == "kaiming_uniform" and abs(c["init_scale"] - 1 / 3) < 1e-6)


def findings(runs):
    """The measured effects behind the paper's findings F1-F4, as Markdown (mean ± sample std over seeds, n)."""
    ms = lambda v: "%+.2f ± %.2f (n=%d)" % (*(100 * x for x in mean_std(v)), len(v)) if v else "no runs"
    out = ["F1 (UPA hurts LoRA more): accuracy drop clean -> UPA, LoRA minus FF, in points, paired by seed"]
    drops = defaultdict(dict)
    for clean, bad in _pairs(runs, "upa"):
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
        if c["attack"] in BACKDOORS and _default_lora(c):
            asr[(c["attack"], c["poison_rate"], c["seed"])][c["mode"]] = r["metrics"]["asr"]
    for attack, rate in sorted({k[:2] for k in asr}, key=lambda k: (BACKDOORS.index(k[0]), k[1])):
        d = [v["ff"] - v["lora"] for k, v in asr.items() if k[:2] == (attack, rate) and len(v) == 2]
        out.append(f"- {attack} rate {rate:g}: {ms(d)}")
    for name, key, keep in (("F3 (rank)", "rank", lambda c: c["init"] == "kaiming_uniform" and abs(c["init_scale"] - 1 / 3) < 1e-6),
                            ("F4 (A-init variance k)", "init_scale", lambda c: c["init"] == "kaiming_uniform" and c["rank"] == 8)):
        lora = [r for r in runs if r["config"]["mode"] == "lora" and keep(r["config"])]
        upa = [(b["config"]["poison_rate"], b["config"]["seed"], b["config"][key],
                a["metrics"]["clean"]["acc"] - b["metrics"]["clean"]["acc"]) for a, b in _pairs(lora, "upa")]
        bpa = [(r["config"]["poison_rate"], r["config"]["seed"], r["config"][key], r["metrics"]["asr"])
               for r in lora if r["config"]["attack"] == "bpa"]
        for what, pts in (("UPA accuracy drop", upa), ("BPA ASR", bpa)):
            for rate in sorted({p[0] for p in pts}):  # one correlation per poisoning rate, where the sweep varied `key`
                xy = [p[2:] for p in pts if p[0] == rate]
                if len({x for x, _ in xy}) >= 3:
                    # within one seed only the swept value changes (same data order and poison; in the k sweep, the same A up to scale)
                    per_seed = {sd: [p[2:] for p in pts if p[:2] == (rate, sd)] for sd in sorted({p[1] for p in pts})}
                    within = ", ".join(f"seed {sd} {spearman(*zip(*v)):+.2f}" for sd, v in per_seed.items()
                                       if len({x for x, _ in v}) >= 3)
                    out.append(f"{name}: Spearman of {key} with {what} at rate {rate:g}: "
                               f"{spearman(*zip(*xy)):+.2f} (n={len(xy)} runs, {len({x for x, _ in xy})} values); "
                               f"within seeds: {within}")
    return "\n".join(out)


def report(results, out_dir):
    runs = load_results(results)
    groups = group_runs(runs)
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(groups)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    found = findings(runs)
    with open(os.path.join(out_dir, "findings.md"), "w") as f:
        f.write(found + "\n")
    print(found)
    tables = []
    for name, spec in {**FIGURES, **TABLES}.items():
        d = figure_data(groups, spec)
        if d:
            tables.append(figure_table(d, spec))
            if name in FIGURES:
                draw(name, d, spec, os.path.join(out_dir, f"{name}.png"))
                print(f"wrote {os.path.join(out_dir, name + '.png')}")
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write("# The paper's figures and tables as numbers: mean ± sample std in % (seeds)\n\n" + "\n\n".join(tables) + "\n")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a run folder, or 'report'")
    p.add_argument("results", nargs="?", help="with report: the results JSONL")
    p.add_argument("--out", default=None, help="with report: folder for table.md, tables.md, findings.md and figures (default: beside the JSONL)")
    args = p.parse_args(argv)
    try:
        if args.target == "report":
            if not args.results or not os.path.isfile(args.results):
                raise ValueError(f"report needs an existing results JSONL (got {args.results!r})")
            report(args.results, args.out or os.path.dirname(os.path.abspath(args.results)))
        else:
            if not os.path.isfile(os.path.join(args.target, "config.json")):
                raise ValueError(f"{args.target}: not a run folder (no config.json)")
            m = reevaluate(args.target)
            print(summary_line(m))
            saved = os.path.join(args.target, "metrics.json")
            if os.path.isfile(saved):
                with open(saved) as f:
                    same = json.load(f)["final"] == m
                print("matches metrics.json" if same else "DIFFERS from metrics.json (different weights or data?)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
