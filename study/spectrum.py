"""
Beyond the paper: measure the link it only argues. For trained clean LoRA runs across ranks and A-init variances,
compute the Fisher spectrum of the trainable parameters (ntk.fisher_spectrum) on clean training samples and on
their poisoned counterparts (UPA: labels flipped; BPA: trigger inserted, label set to the target), summarise it as
information bits (Eq. 9) and Renyi entropies (Eq. 10), and correlate those with the robustness the sweeps measured
at the same rank/variance/seed: the accuracy drop under UPA and the ASR under BPA (Spearman, with n).

    python -m study.spectrum --protocol cpu            # measure what is missing, then write results/cpu/spectrum.md

It appends to results/<protocol>/spectrum.jsonl (one line per measured run, known by runspec.run_key) and rewrites
results/<protocol>/spectrum.md.
"""
import os
from collections import defaultdict

import attacks
import cli
import data
import evaluate
import ledger
import ntk
import runspec
from study import ROOT, stats, sweep
from study import report as R

ALPHAS = (0.5, 1.0, 2.0)
SUMMARIES = ["ib"] + [f"h{a:g}" for a in ALPHAS]


def summarise(eigs):
    return {"ib": ntk.information_bits(eigs), **{f"h{a:g}": ntk.renyi_entropy(eigs, a) for a in ALPHAS}}


def measure(run_dir, samples, seed=0):
    """IB and H_alpha of the trained run's LoRA-parameter Fisher on clean, label-flipped and triggered samples."""
    args, net = evaluate.load_run(run_dir)
    tok = data.Tokenizer(args.model)
    clean = data.load_split(args.task, "train", args.data_dir, cap=samples, seed=seed + 12345)  # not the run's order
    sets = {"clean": clean,
            "upa": attacks.poison("upa", clean, 1.0, seed=seed)[0],
            "bpa": attacks.poison("bpa", clean, 1.0, seed=seed, any_label=True)[0]}
    out = {}
    for name, examples in sets.items():
        batch = data.collate(examples, tok, args.max_len)
        eigs = ntk.fisher_spectrum(net, batch, params="lora", kind="empirical")
        out[name] = summarise(eigs)
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--protocol", default="cpu", choices=sorted(sweep.PROTOCOLS),
                   help="whose results/<protocol>/results.jsonl runs to measure")
    p.add_argument("--samples", type=int, default=32, help="training samples per spectrum")
    args = p.parse_args(argv)
    with cli.usage_errors():
        runs, measured, paths, rates = inputs(args)
    todo = [r for r in runs if clean_kaiming_lora(r) and runspec.run_key(r["config"]) not in measured]
    for r in (bar := cli.progress(todo, desc="spectra", unit="run")):
        if not os.path.isfile(os.path.join(r["out"], "adapter.safetensors")):
            bar.write(f"{r['out']}: weights not on this machine; skipped")
            continue
        line = {"key": runspec.run_key(r["config"]), "config": r["config"], "samples": args.samples,
                "spectra": measure(r["out"], args.samples)}
        ledger.append(paths["spectra"], line)
        measured[line["key"]] = line
    report(runs, list(measured.values()), paths["md"], *rates)


def inputs(args):
    """(runs, spectra measured so far by run_key, output paths, (UPA rate, BPA rates)), or a UsageError."""
    proto = sweep.PROTOCOLS[args.protocol]
    if not all(k in proto for k in ("upa_rate", "bpa_rate", "bpa_rate2")):
        raise cli.UsageError(f"--protocol {args.protocol} has no rank/variance sweeps at one UPA and two BPA rates; "
                             "the spectrum study reads the cpu or paper protocol's")
    if args.samples < 2:
        raise cli.UsageError(f"--samples must be >= 2 (one sample's spectrum is one eigenvalue), got {args.samples}")
    res_dir = os.path.join(ROOT, "results", args.protocol)
    results = os.path.join(res_dir, "results.jsonl")
    if not os.path.isfile(results):
        raise cli.UsageError(f"--protocol {args.protocol}: no results at {results} yet; "
                             f"run python -m study.sweep all --protocol {args.protocol} first")
    paths = {"spectra": os.path.join(res_dir, "spectrum.jsonl"), "md": os.path.join(res_dir, "spectrum.md")}
    cli.check_file_path(paths["spectra"], "spectra file")
    cli.check_file_path(paths["md"], "spectrum table")
    measured = {}
    for r in ledger.read(paths["spectra"]) if os.path.isfile(paths["spectra"]) else []:
        if r["samples"] != args.samples:  # spectra over different sample counts are not comparable
            raise cli.UsageError(f"{paths['spectra']} holds spectra over {r['samples']} samples; "
                                 f"pass --samples {r['samples']} or move the file away")
        measured[runspec.run_key(r["config"])] = r  # the key the line was stored under may predate newer flags
    return ledger.runs(results), measured, paths, (proto["upa_rate"], (proto["bpa_rate"], proto["bpa_rate2"]))


def clean_kaiming_lora(r):
    c = r["config"]
    return c["mode"] == "lora" and c["attack"] == "none" and c["init"] == "kaiming_uniform"


def report(runs, spectra, path, upa_rate, bpa_rates):
    """Spearman correlations of each spectral summary with UPA accuracy drop and BPA ASR (at each of bpa_rates), over
    matched runs, and over cells (rank/variance settings: summary and robustness averaged over their seeds, so a cell
    counts once)."""
    key = runspec.run_key
    drop = {key(a["config"]): a["metrics"]["clean"]["acc"] - b["metrics"]["clean"]["acc"]
            for a, b in R.pairs(runs, "upa") if b["config"]["poison_rate"] == upa_rate}
    targets = {f"UPA {upa_rate:g} acc drop": drop}
    for rate in bpa_rates:
        targets[f"BPA {rate:g} ASR"] = {key(a["config"]): b["metrics"]["asr"]
                                        for a, b in R.pairs(runs, "bpa") if b["config"]["poison_rate"] == rate}

    def rho(pts):
        return f"{stats.spearman(*zip(*pts)):+.2f} ({len(pts)})" if len(pts) >= 3 else f"- ({len(pts)})"

    def cell_means(pts):  # (setting, x, y) -> one (mean x, mean y) per setting
        cells = defaultdict(list)
        for cell, x, y in pts:
            cells[cell].append((x, y))
        return [tuple(sum(v) / len(v) for v in zip(*xy)) for xy in cells.values()]

    head = ["spectrum of", "summary"] + [f"vs {t}: {over} rho (n)" for t in targets for over in ("runs", "cells")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for data_set in ("clean", "upa", "bpa"):
        for summ in SUMMARIES:
            cells = []
            for values in targets.values():
                pts = [(runspec.setting_key(s["config"]), s["spectra"][data_set][summ], values[key(s["config"])])
                       for s in spectra if key(s["config"]) in values]
                cells += [rho([p[1:] for p in pts]), rho(cell_means(pts))]
            lines.append(f"| {data_set} | {summ} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
