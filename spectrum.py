"""
Beyond the paper: measure the link it only argues. For trained clean LoRA runs across ranks and A-init variances,
compute the Fisher spectrum of the trainable parameters (ntk.fisher_spectrum) on clean training samples and on
their poisoned counterparts (UPA: labels flipped; BPA: trigger inserted, label set to the target), summarise it as
information bits (Eq. 9) and Renyi entropies (Eq. 10), and correlate those with the robustness the sweeps measured
at the same rank/variance/seed: the accuracy drop under UPA and the ASR under BPA (Spearman, with n).

    python spectrum.py --protocol cpu            # measure what is missing, then write results/cpu/spectrum.md
"""
import argparse
import json
import os
from collections import defaultdict


ROOT = os.path.dirname(os.path.abspath(__file__))
ALPHAS = (0.5, 1.0, 2.0)
SUMMARIES = ["ib"] + [f"h{a:g}" for a in ALPHAS]


def summarise(eigs):
    import ntk
    return {"ib": ntk.information_bits(eigs), **{f"h{a:g}": ntk.renyi_entropy(eigs, a) for a in ALPHAS}}


def measure(run_dir, samples, seed=0):
    """IB and H_alpha of the trained run's LoRA-parameter Fisher on clean, label-flipped and triggered samples."""
    import attacks
    import data
    import evaluate
    import ntk
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="cpu")
    p.add_argument("--samples", type=int, default=32, help="training samples per spectrum")
    args = p.parse_args(argv)
    import evaluate
    import sweep
    res_dir = os.path.join(ROOT, "results", args.protocol)
    runs = evaluate.load_results(os.path.join(res_dir, "results.jsonl"))
    spec_path = os.path.join(res_dir, "spectrum.jsonl")
    measured = {}
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            for line in f:
                r = json.loads(line)
                if r["samples"] != args.samples:  # spectra over different sample counts are not comparable
                    raise SystemExit(f"error: {spec_path} holds spectra over {r['samples']} samples; "
                                     f"pass --samples {r['samples']} or move the file away")
                measured[r["key"]] = r
    clean = [r for r in runs if r["config"]["mode"] == "lora" and r["config"]["attack"] == "none"
             and r["config"]["init"] == "kaiming_uniform"]
    from tqdm import tqdm
    for r in tqdm([r for r in clean if sweep.run_key(r["config"]) not in measured], desc="spectra", unit="run"):
        if not os.path.isfile(os.path.join(r["out"], "adapter.safetensors")):
            tqdm.write(f"{r['out']}: weights not on this machine; skipped")
            continue
        line = {"key": sweep.run_key(r["config"]), "config": r["config"], "samples": args.samples,
                "spectra": measure(r["out"], args.samples)}
        with open(spec_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        measured[line["key"]] = line
    proto = sweep.PROTOCOLS[args.protocol]
    report(runs, list(measured.values()), os.path.join(res_dir, "spectrum.md"), proto["upa_rate"],
           (proto["bpa_rate"], proto["bpa_rate2"]))


def report(runs, spectra, path, upa_rate, bpa_rates):
    """Spearman correlations of each spectral summary with UPA accuracy drop and BPA ASR (at each of bpa_rates), over
    matched runs, and over cells (rank/variance settings: summary and robustness averaged over their seeds, so a cell
    counts once)."""
    import evaluate
    key = lambda c: json.dumps(c, sort_keys=True)
    drop = {key(a["config"]): a["metrics"]["clean"]["acc"] - b["metrics"]["clean"]["acc"]
            for a, b in evaluate._pairs(runs, "upa") if b["config"]["poison_rate"] == upa_rate}
    targets = {f"UPA {upa_rate:g} acc drop": drop}
    for rate in bpa_rates:
        targets[f"BPA {rate:g} ASR"] = {key(a["config"]): b["metrics"]["asr"]
                                        for a, b in evaluate._pairs(runs, "bpa") if b["config"]["poison_rate"] == rate}

    def rho(pts):
        return f"{evaluate.spearman(*zip(*pts)):+.2f} ({len(pts)})" if len(pts) >= 3 else f"- ({len(pts)})"

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
                pts = [(evaluate.setting_key(s["config"]), s["spectra"][data_set][summ], values[key(s["config"])])
                       for s in spectra if key(s["config"]) in values]
                cells += [rho([p[1:] for p in pts]), rho(cell_means(pts))]
            lines.append(f"| {data_set} | {summ} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
