"""
Run the paper's experiment grids as resumable sweeps of train.py.

    python -m study.sweep fig1 --protocol cpu          # run what is missing from results/cpu/results.jsonl
    python -m study.sweep all --protocol cpu           # every grid, cheapest points first
    python -m study.sweep fig4 --protocol paper --print  # one torchrun command per pending run (Slurm arrays etc.)
    python -m study.sweep all --protocol conv --jobs 2 --estimate  # the pending runs' cost, from the finished runs' speed
    python -m study.sweep all --protocol conv --jobs 2 --until 15:45  # start only the runs estimated to end by then
    python -m study.sweep 3ep --protocol conv --jobs 2 --only bpa  # only the runs whose FOLDER/NAME matches
    python -m study.sweep fig3                         # the Eq. 18 heatmap (no training)

A run is known by runspec.run_key (its configuration, with machine-specific paths reduced to names): one whose line
is already in the results JSONL is skipped, so a sweep can be stopped at any point and continued later, and JSONL
files from several machines merge by concatenation. An interrupted run is resumed from its checkpoint. Only one
sweep at a time may run in a runs folder, and each run folder is one trainer's own (train.py's lock).
"""
import collections
import datetime
import os
import re
import signal
import subprocess
import sys
import time

import cli
import ledger
import runspec
from study import ROOT
from tools import get_mpnet


# Protocols. `paper`: Sec. 4.1 of the paper (BERT-large, batch 8, 10,000 steps, 5 seeds, its learning rates).
# `cpu`: what a 2-core machine affords with the embedded MiniLM (see results/REPORT.md for how it was chosen).
# run order of the converged protocol, each stage with its number of seeds: a partial sweep already answers the
# headline question (F1/F2 with 5 seeds), then F3, F4, the second task and the init zoo (issue 12) with 3
# The two "-low" stages are a follow-up, added on 2026-11-29 after F1/F2's first two seeds showed BPA 0.45% saturating
# both FF and LoRA r8 (ASR 99.8-100%): the rank, variance and init grids' BPA condition again at 0.15%, reported
# beside the pre-registered 0.45% cells, never instead of them.
# The zoo and its follow-up share one stage (2026-11-30, before any zoo run), so they run one seed at a time and a
# partial zoo sweep holds every condition of its first seeds.
# Added 2026-12-01, before any of their runs (results/REPORT.md): the sentence-pair tasks (issue 23), their
# calibration (rule 3), then F1/F2 on both tasks one seed at a time, seeds 0-2 first and seeds 3-4 last; between
# them SST-2 over three epochs (`3ep`, delay or limit) and Tab. E.1's four backdoors (`e1`), issue 24. A stage
# listed twice runs only the seeds its first listing did not. Last, `follow`: the saturation follow-ups that
# effects.follow_ups finds, once they are entered in PROTOCOLS['conv']['follow_ups'] (empty until a rule fires).
CONV_STAGES = ((("calib",), 1), (("cola-calib",), 1), (("f12",), 5), (("f3",), 3), (("f4",), 3), (("cola",), 3),
               (("f34-low",), 3), (("zoo", "zoo-low"), 3), (("pair-calib",), 1), (("pairs-f1",), 3), (("pairs",), 3),
               (("3ep",), 3), (("e1",), 5), (("pairs",), 5), (("follow",), 5),
               (("3ep-follow",), 5), (("small-calib",), 1), (("small",), 3), (("3ep-low",), 5), (("small",), 5))
# Added 2026-12-05, before any of their runs (results/REPORT.md, "How much poison" and "MRPC and RTE"): SST-2 over three
# epochs at BPA 0.15%, seeds 3-4 (`3ep-follow`: seeds 0-2 are the `3ep` runs, the same runs by run_key, so they are
# skipped), then the two small tasks' calibration and seeds 0-2, then BPA 0.05% over three epochs (`3ep-low`), then the
# small tasks' seeds 3-4.
PAIR_TASKS = ("qnli", "qqp")
SMALL_TASKS = ("mrpc", "rte")  # the paper's two smallest tasks: whole dev set at every evaluation
PROTOCOLS = {
    "paper": dict(model=None, tasks=("sst2", "cola", "qnli", "qqp"), seeds=(0, 1, 2, 3, 4),
                  common=["--batch-size", "8", "--steps", "10000", "--max-len", "512", "--train-cap", "17500"],
                  lr={"lora": "3e-5", "ff": "3e-6"}, ranks=(4, 8, 16, 32, 64, 128, 256, 512),
                  upa_rates=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3), bpa_rates=(0.0015, 0.0025, 0.0035, 0.0045),
                  upa_rate=0.2, bpa_rate=0.0015, bpa_rate2=0.0045),
    "cpu": dict(model=None, tasks=("sst2",), seeds=(0, 1, 2),
                common=["--batch-size", "16", "--steps", "300", "--max-len", "64", "--eval-every", "0"],
                lr={"lora": "5e-4", "ff": "3e-5"}, ranks=(4, 8, 16, 32, 64, 128, 256, 384),
                upa_rates=(0.0, 0.1, 0.2, 0.3, 0.4), bpa_rates=(0.0, 0.005, 0.01, 0.02, 0.05),
                upa_rate=0.3, bpa_rate=0.01, bpa_rate2=0.02),
    # `conv`: the converged-regime protocol (results/REPORT.md, "The converged protocol"). Constant learning rate
    # after warm-up, so every prefix of a run is itself a run of the protocol and a curve shows every shorter budget.
    # Its learning rates and step budget are fixed by the written rule from the clean `calib` runs alone.
    "conv": dict(kind="conv", model=None, tasks=("sst2",), seeds=(0, 1, 2, 3, 4),
                 common=["--batch-size", "16", "--schedule", "constant", "--warmup", "100", "--ckpt-every", "500"],
                 # max length per task: the 95th percentile of the training set's [CLS] a [SEP] b [SEP] lengths, rounded
                 # up to a multiple of 32 (fixed 2026-12-01 for the pair tasks; SST-2 and CoLA keep the 64 they ran at).
                 # QNLI: p95 81 -> 96, truncating 238 of 12,997 rows (1.8%); QQP: p95 55 -> 64, 363 of 17,500 (2.1%)
                 # MRPC: p95 74 -> 96, truncating 5 of 3,668 (0.1%); RTE: p95 157 -> 160, 108 of 2,490 (4.3%) (2026-12-05)
                 max_len={"sst2": 64, "cola": 64, "qnli": 96, "qqp": 64, "mrpc": 96, "rte": 160},
                 # the pair tasks' dev sets are large (QNLI 5,463, QQP 15,517 rows): intermediate evaluations use a
                 # fixed seeded subset (calibration: 1,000 rows; grid: 512); the final point uses the whole dev set,
                 # except QQP's, which would cost about 20% of a run and uses a 5,000-row subset seeded by the run's seed
                 pair_curve_dev={"calib": 1000, "grid": 512}, final_dev_cap={"qqp": 5000},
                 calib=dict(tasks=("sst2",), steps=5000, eval_every=250,
                            lr={"lora": ("2e-4", "5e-4", "1e-3"), "ff": ("1e-5", "2e-5", "5e-5")}),
                 # fixed by the rule from the calib runs (results/conv/calib-sst2.md, applied 2026-11-29 before any
                 # attacked run); CoLA's budget from its own calibration (rule 3, results/conv/calib-cola.md), as
                 # QNLI's and QQP's (calib-qnli.md, calib-qqp.md, applied 2026-12-01 before any attacked run of them)
                 lr={"lora": "5e-4", "ff": "2e-5"}, steps={"sst2": 2500, "cola": 2750, "qnli": 2500, "qqp": 2000},
                 upa_rate=0.3, bpa_rates=(0.0015, 0.0045), bpa_rate=0.0045,  # the paper's lowest/highest BPA rates
                 ranks=(4, 64, 384), scales=(0.0001, 2.0),  # F3/F4 contrasts; rank 8 and k = 1/3 come from f12
                 rs_alpha="5.656854",  # rsLoRA alpha/sqrt(r) with alpha = 2 sqrt(8): rank 8's scale stays 16/8 = 2
                 zoo=("gaussian", "pissa", "mica", "olora", "orthogonal", "dora"),
                 curve_points=8, curve_dev=256, stages=CONV_STAGES,
                 # three epochs of SST-2's 67,349 rows at batch 16, evaluated every 1/16 of the run (issue 24)
                 # (issue 24); the dose runs (issue 51) every 1/32, with clean accuracy on the 616 dev rows outside
                 # the curve's 256 too (--select-dev: the rows a user would pick a checkpoint by)
                 epochs3=dict(steps=12628, curve_points=16, dose_points=32, select_dev=616),
                 e1=("clbpa", "ilbpa", "mt", "sbpa"),  # Tab. E.1's backdoors, each from its own pool of rows
                 # (task, attack, rate) of each saturation follow-up that effects.follow_ups reports (results/REPORT.md
                 # states the rules), entered here by hand once it does, as the budgets above: FF and LoRA r8, 5 seeds.
                 # QNLI BPA 0.05%: entered 2026-12-02, when seed 2's FF 0.45% run put all twelve of seeds 0-2's BPA
                 # runs at >= 90% ASR (the ceiling rule), before any run at 0.05%
                 follow_ups=(("qnli", "bpa", 0.0005),),
                 dose_rate=0.0005),  # SST-2 over three epochs (issue 51): 34 of 67,349 rows
}
# `conv-bf16`: the numerics check of bf16 autocast (results/REPORT.md, "bf16 against fp32"): F1/F2's clean, UPA 0.3
# and BPA 0.15% cells of `conv` again with --dtype bf16, in a results file of their own
PROTOCOLS["conv-bf16"] = dict(PROTOCOLS["conv"], common=PROTOCOLS["conv"]["common"] + ["--dtype", "bf16"],
                              stages=((("bf16",), 5),))
# `conv-mpnet`: the second model (issue 50; results/REPORT.md, "A second model"), in a results file of its own: the
# calibration by the `conv` rule as written, then F1/F2's cells on SST-2, the clean and BPA 0.15% cells of seeds 0-2
# first (F2 at 0.15% is the question), then UPA 0.3 and BPA 0.45% of seeds 0-2, then seeds 3-4. Its rates and budget
# are fixed by the rule from its own calibration runs (None until then: only `calib` is ready). --model defaults to
# the folder `python -m tools.get_mpnet` leaves.
PROTOCOLS["conv-mpnet"] = dict(PROTOCOLS["conv"], model=get_mpnet.installed_folder(), lr=None, steps=None,
                               follow_ups=(), stages=((("calib",), 1), (("f12-low",), 3), (("f12",), 3),
                                                      (("f12-low",), 5), (("f12",), 5)),
                               # until runs of its own have finished, its runs are priced by conv's times the cost of
                               # an MPNet step over a MiniLM step, by mode (`python -m bench.step --versus`, measured
                               # 2026-12-05: results/REPORT.md, "A second model"), so --until can start the first ones
                               priced_by=("conv", {"ff": 6.74, "lora": 6.38}))
SCALES = (0.0001, 0.001, 0.1, 0.333, 0.667, 1.0, 1.5, 2.0)  # A-init variance scales k (Sec. 4.4.2)


def attack_flags(attack, rate):
    return [] if attack == "none" or rate == 0 else ["--attack", attack, "--poison-rate", str(rate)]


def grid(figure, p):
    """Runs of one figure as lists of train.py flags (without --seed/--out/--results), cheapest first."""
    runs = []
    if figure == "calib":  # clean runs only, long, evaluated on the whole dev set: what fixes lr and steps
        c = p["calib"]
        return [p["common"] + task_flags(task, p) + ["--mode", mode, "--lr", lr, "--steps", str(c["steps"]),
                                                      "--eval-every", str(c["eval_every"])]
                + (["--rank", "8", "--alpha", "16"] if mode == "lora" else [])
                for task in c["tasks"] for i in range(len(c["lr"]["lora"])) for mode in ("lora", "ff")
                for lr in (c["lr"][mode][(i + 1) % len(c["lr"][mode])],)]  # the middle rate of each mode first
    if p.get("kind") == "conv":
        return conv_grid(figure, p)
    for task in p["tasks"]:
        base = p["common"] + ["--task", task]
        lora = base + ["--mode", "lora", "--rank", "8", "--alpha", "16", "--lr", p["lr"]["lora"]]
        ff = base + ["--mode", "ff", "--lr", p["lr"]["ff"]]
        if figure == "fig1":
            runs += [m + attack_flags("upa", r) for r in p["upa_rates"] for m in (lora, ff)]
        elif figure == "fig2":
            runs += [m + attack_flags("bpa", r) for r in p["bpa_rates"] for m in (lora, ff)]
        elif figure in ("fig4", "fig5", "fig4b", "fig5b"):
            values = p["ranks"] if figure.startswith("fig4") else SCALES
            # fig4b/fig5b: the BPA condition again at bpa_rate2, where LoRA's ASR is neither at its clean baseline
            # nor saturated (a follow-up added after bpa_rate left it at baseline; see results/REPORT.md)
            conds = (("none", 0), ("upa", p["upa_rate"]), ("bpa", p["bpa_rate"])) if figure in ("fig4", "fig5") \
                else (("bpa", p["bpa_rate2"]),)
            for cond in conds:
                for v in values:
                    flags = ["--rank", str(v)] if figure.startswith("fig4") else ["--rank", "8", "--init-scale", str(v)]
                    runs.append(base + ["--mode", "lora", "--alpha", "16", "--lr", p["lr"]["lora"]] + flags +
                                attack_flags(*cond))
        elif figure == "tabE1":
            runs += [m + attack_flags(a, p["bpa_rate"]) for a in ("clbpa", "ilbpa", "mt", "sbpa") for m in (lora, ff)]
        elif figure == "tabE2":
            # the paper's third init, xavier_normal, is left out: with Var(A) = k / n_in for every init (lora.py) it
            # draws exactly gaussian's A, so its runs repeat gaussian's bit for bit (seed 0 ran both: identical)
            runs += [lora + ["--init", i, "--init-scale", str(k)] + attack_flags(*cond)
                     for cond in (("none", 0), ("bpa", p["bpa_rate"]))
                     for i in ("gaussian", "kaiming_uniform") for k in (0.333, 1.0, 2.0)]
        else:
            raise SystemExit(f"error: unknown figure {figure!r}; choose from {', '.join(FIGURES)}")
    return runs


def task_flags(task, p):
    """--task and what goes with it: the max length, and the pair tasks' final dev subset (PROTOCOLS['conv'])."""
    cap = p.get("final_dev_cap", {}).get(task)
    return ["--task", task] + (["--max-len", str(p["max_len"][task])] if "max_len" in p else []) \
        + (["--dev-cap", str(cap)] if cap else [])


def figure_tasks(figure, p):
    """The tasks a converged-protocol figure runs on."""
    if figure == "follow":
        return tuple(sorted({task for task, _, _ in p["follow_ups"]}))
    if figure.startswith("small"):
        return SMALL_TASKS
    return ("cola",) if figure.startswith("cola") else PAIR_TASKS if figure.startswith("pair") else ("sst2",)


def conv_grid(figure, p):
    """The converged protocol's grids (issue 10 item 4, issue 12, issue 23). BPA draws its rows from all rows, as the
    paper's code does; every run records a curve of 8 evaluations on a fixed dev subset (256 rows; 512 on the pair
    tasks), then the whole dev set (QQP: a 5,000-row subset)."""
    if figure in ("cola-calib", "pair-calib", "small-calib"):  # the chosen rates, one long clean run per mode (rule 3)
        curve = ["--curve-dev", str(p["pair_curve_dev"]["calib"])] if figure == "pair-calib" else []
        return [p["common"] + task_flags(task, p) + ["--mode", m, "--lr", p["lr"][m], "--steps",
                                                     str(p["calib"]["steps"]), "--eval-every",
                                                     str(p["calib"]["eval_every"])] + curve
                + (["--rank", "8", "--alpha", "16"] if m == "lora" else [])
                for task in figure_tasks(figure, p) for m in ("lora", "ff")]
    return [flags for task in figure_tasks(figure, p) for flags in conv_task_grid(figure, task, p)]


def conv_task_grid(figure, task, p):
    steps = (p["steps"] or {}).get(task)
    if steps is None:
        raise SystemExit(f"error: protocol conv has no step budget for {task} yet; apply the rule "
                         f"(`python -m study.calibrate results/conv/results.jsonl --task {task}`) and fill "
                         "PROTOCOLS['conv']['steps']")
    curve_dev = p["pair_curve_dev"]["grid"] if task in PAIR_TASKS else 0 if task in SMALL_TASKS else p["curve_dev"]
    points, select = p["curve_points"], []
    if figure == "3ep":  # three epochs, evaluated every 1/16: the 2,500-step runs are their prefixes
        steps, points = p["epochs3"]["steps"], p["epochs3"]["curve_points"]
    if figure in ("3ep-follow", "3ep-low"):  # the dose runs: every 1/32, and the rows to pick a checkpoint by
        steps, points = p["epochs3"]["steps"], p["epochs3"]["dose_points"]
        select = ["--select-dev", str(p["epochs3"]["select_dev"])]
    base = p["common"] + task_flags(task, p) + ["--steps", str(steps), "--eval-every", str(steps // points),
                                                "--curve-dev", str(curve_dev)] + select
    lora = base + ["--mode", "lora", "--rank", "8", "--alpha", "16", "--lr", p["lr"]["lora"]]
    ff = base + ["--mode", "ff", "--lr", p["lr"]["ff"]]
    bpa = lambda rate: attack_flags("bpa", rate) + ["--poison-pool", "any"]
    conds = [[], attack_flags("upa", p["upa_rate"])] + [bpa(r) for r in p["bpa_rates"]]
    if figure in ("f12", "cola", "pairs", "small"):
        return [m + c for c in conds for m in (lora, ff)]
    if figure == "f12-low":  # F1/F2's clean and BPA 0.15% cells, run first: F2 at 0.15% with half the runs
        return [m + c for c in (conds[0], conds[2]) for m in (lora, ff)]
    if figure == "3ep-follow":  # BPA 0.15%, seeds 3-4 (issue 51)
        return [m + conds[2] for m in (lora, ff)]
    if figure == "3ep-low":  # BPA 0.05%, the dose at a third of the paper's lowest rate (issue 51)
        return [m + bpa(p["dose_rate"]) for m in (lora, ff)]
    if figure == "pairs-f1":  # the pair grid's clean and UPA cells, run first: F1's answer with half the runs
        return [m + c for c in conds[:2] for m in (lora, ff)]
    if figure == "bf16":  # clean, UPA 0.3, BPA 0.15% (the protocol adds --dtype bf16)
        return [m + c for c in conds[:3] for m in (lora, ff)]
    if figure == "3ep":  # clean, BPA 0.15%, UPA 0.3
        return [m + c for c in (conds[0], conds[2], conds[1]) for m in (lora, ff)]
    if figure == "e1":
        return [m + attack_flags(a, r) for r in p["bpa_rates"] for a in p["e1"] for m in (lora, ff)]
    if figure == "follow":  # BPA's rows from all rows as in its grid; Tab. E.1's attacks from their own pools
        return [m + (bpa(r) if a == "bpa" else attack_flags(a, r)) for t, a, r in p["follow_ups"] if t == task
                for m in (lora, ff)]
    sweep_conds = conds[:2] + [bpa(p["bpa_rate"])]  # clean (for the UPA drop), UPA, BPA
    low = [bpa(p["bpa_rates"][0])]  # the follow-up's BPA condition (CONV_STAGES)
    scalings = (["--alpha", "16"], ["--alpha", p["rs_alpha"], "--rslora"])
    # F3: rank with alpha/r, then with rsLoRA's alpha/sqrt(r), which removes the step-size confound
    f3 = lambda cs: [base + ["--mode", "lora", "--lr", p["lr"]["lora"], "--rank", str(r)] + a + c
                     for a in scalings for c in cs for r in p["ranks"]]
    f4 = lambda cs: [lora + ["--init-scale", str(k)] + c for c in cs for k in p["scales"]]
    zoo = lambda cs: [lora + ["--init", i] + c for c in cs for i in p["zoo"]]
    grids = {"f3": f3, "f4": f4, "zoo": zoo, "f34-low": lambda cs: f3(cs) + f4(cs), "zoo-low": zoo}
    if figure in grids:
        return grids[figure](low if figure.endswith("-low") else sweep_conds)
    raise SystemExit(f"error: unknown figure {figure!r} for protocol conv; choose from "
                     f"{', '.join(f for stage, _ in CONV_STAGES for f in stage)}")


FIGURES = ("calib", "fig1", "fig2", "fig4", "fig5", "tabE1", "tabE2", "fig4b", "fig5b")
STAGES = (("calib",), ("fig1", "fig2"), ("fig4", "fig5"), ("tabE1", "tabE2"), ("fig4b", "fig5b"))  # run order: partial sweeps are informative


def ready(figure, p):
    """Whether a figure's runs are fixed: the converged protocol's grids wait for its calibration rule."""
    if p.get("kind") != "conv" or figure == "calib":
        return True
    if p["lr"] is None:
        return False
    return figure.endswith("-calib") or all((p["steps"] or {}).get(t) is not None for t in figure_tasks(figure, p))


def resolve(flags):
    """train.py's own parsing, checks and defaults, so the key here is exactly the config train.py will record."""
    args = runspec.get_parser().parse_args(flags)
    runspec.validate(args, 1)
    return runspec.run_config(args)


def finished_runs(results):
    return ledger.runs(results) if os.path.isfile(results) else []


def run_name(figure, flags, seed):
    """A readable folder name from the flags that vary across grids."""
    f = {}
    for i, tok in enumerate(flags):
        if tok.startswith("--") and i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            f[tok[2:]] = flags[i + 1]
    parts = [f.get("task"), f.get("mode")] + ([f"lr{f['lr']}"] if figure == "calib" else [])
    if f.get("mode") == "lora":
        parts += [f"r{f.get('rank')}" + ("rs" if "--rslora" in flags else ""), f.get("init", "ku")[:2],
                  f"k{f.get('init-scale', '0.333')}"]
    parts += [f"{f['attack']}{f['poison-rate']}" if "attack" in f else "clean", f"s{seed}"]
    return os.path.join(FOLDERS.get(figure, figure), "-".join(parts))


FOLDERS = {"pairs-f1": "pairs", "3ep-follow": "3ep", "3ep-low": "3ep", "f12-low": "f12"}  # a figure that is part of another keeps its runs in the other's folder


def main(argv=None):
    ap = cli.Parser(description=__doc__)
    ap.add_argument("figure", help=f"one of {', '.join(FIGURES)} (each protocol has its own), fig3, or all")
    ap.add_argument("--protocol", default="cpu", choices=sorted(PROTOCOLS), help="which protocol's grids and settings")
    ap.add_argument("--model", default=None, help="BERT or MPNet folder (default: the protocol's; the paper protocol "
                                                  "needs bert-large-uncased, conv-mpnet takes python -m tools.get_mpnet's)")
    ap.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    ap.add_argument("--seeds", type=int, default=None, help="use only the first N seeds of the protocol")
    ap.add_argument("--results", default=None, help="results JSONL (default: results/<protocol>/results.jsonl)")
    ap.add_argument("--runs-dir", default=None, help="run folders (default: runs/<protocol>)")
    ap.add_argument("--print", action="store_true", help="print the pending runs as torchrun commands and exit")
    ap.add_argument("--estimate", action="store_true", help="print the pending runs' estimated cost (from the "
                                                            "finished runs' seconds per step) and exit")
    ap.add_argument("--only", default=None, help="a regular expression: plan only the runs whose FOLDER/NAME it "
                                                 "finds (re.search), e.g. '3ep/.*bpa' for the runs one question needs")
    ap.add_argument("--limit", type=int, default=None, help="run at most N pending runs, then stop")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (threads are split between them)")
    ap.add_argument("--until", default=None, help="HH:MM or YYYY-MM-DDTHH:MM (local time): start a run only if "
                                                  "its upper estimate (UNTIL_RECENT) says it ends by then")
    args = ap.parse_args(argv)
    if args.figure == "fig3":
        out = os.path.join(ROOT, "results", args.protocol)
        code = subprocess.run([sys.executable, os.path.join(ROOT, "ntk.py"), "fig3", "--out", out]).returncode
        if code:
            sys.exit(code)
        return
    with cli.usage_errors():  # every check, and every planned run's flags, before a run starts
        p, stages, figures, results, runs_dir, until, only = check_args(args)
        # one sweep at a time in a runs folder: a second (say, a restarted one) would start the same runs
        planning = args.print or args.estimate
        lock = None if planning else cli.own_folder(runs_dir, "--runs-dir")  # noqa: F841 (held until the end)
        seeds = p["seeds"][:args.seeds] if args.seeds else p["seeds"]
        extra = [f for flag, value in (("--model", args.model or p["model"]), ("--data-dir", args.data_dir)) if value
                 for f in (flag, value)]
        finished = finished_runs(results)
        done, pending, seen = {runspec.run_key(r["config"]) for r in finished}, [], set()
        order = [(stage, seed) for stage, n in stages for seed in seeds[:n]]
        # headline figures first, one seed at a time
        for stage, seed in order:
            for figure in [f for f in stage if f in figures]:
                for flags in grid(figure, p):
                    flags = flags + extra + ["--seed", str(seed)]
                    key = runspec.run_key(resolve(flags))
                    if key not in done and key not in seen:  # grids share points (e.g. the clean LoRA run)
                        seen.add(key)
                        pending.append((run_name(figure, flags, seed), flags))
        pending = [(name, flags) for name, flags in pending if only.search(name)]
    print(f"{args.figure} ({args.protocol}): {len(pending)} runs pending"
          + (f" matching --only {args.only!r}" if args.only else "") + f", {len(done)} in {results}", file=sys.stderr)
    if args.estimate:
        if "priced_by" in p:
            print(f"runs of a kind with no finished run in {results} are priced by {p['priced_by'][0]}'s, times "
                  + " and ".join(f"{v} ({k})" for k, v in p["priced_by"][1].items()))
        print("\n".join(estimate(pending, finished, args.jobs, protocol_speeds(speeds, finished, p))))
        return
    if args.print:
        for name, flags in pending:
            out = os.path.join(runs_dir, name)
            print(" ".join(["torchrun", "--nproc_per_node", "1", "train.py", *flags, "--out", out, "--results", results,
                            "--resume", "auto"]))
        return
    pending = pending[:args.limit]
    if pending:
        run_all(pending, args.jobs, runs_dir, results, deadline(until, pending, protocol_speeds(upper_speeds, finished, p)))


def check_args(args):
    """The sweep's own flags: (protocol, its stages, figures to plan, results file, runs folder, --until as epoch
    seconds or None, --only compiled), or a UsageError."""
    p = PROTOCOLS[args.protocol]
    if args.protocol == "paper" and not args.model:
        raise cli.UsageError("--protocol paper needs --model /path/to/bert-large-uncased")
    for flag, value in (("--jobs", args.jobs), ("--limit", args.limit), ("--seeds", args.seeds)):
        if value is not None and value < 1:
            raise cli.UsageError(f"{flag} must be >= 1, got {value}")
    if args.seeds is not None and args.seeds > len(p["seeds"]):
        raise cli.UsageError(f"--seeds {args.seeds}: protocol {args.protocol} has {len(p['seeds'])} seeds")
    stages = p.get("stages") or tuple((stage, None) for stage in STAGES)  # (figures, how many seeds; None: all)
    known = list(dict.fromkeys(f for stage, _ in stages for f in stage if f != "calib" or "calib" in p))  # once each
    if args.figure not in ("all", *known):
        raise cli.UsageError(f"unknown figure {args.figure!r} for protocol {args.protocol}; choose from "
                             f"{', '.join(known)}, fig3 or all")
    if args.figure != "all" and not ready(args.figure, p):
        raise cli.UsageError(f"{args.figure} of protocol {args.protocol} is not ready: the protocol's rule has not "
                             "fixed its rates/budget yet (python -m study.calibrate results/conv/results.jsonl)")
    figures = [f for f in known if ready(f, p)] if args.figure == "all" else [args.figure]
    if args.figure == "all" and len(figures) < len(known):
        print(f"not ready yet (the protocol's rule has not fixed their rates/budget): "
              f"{', '.join(f for f in known if f not in figures)}", file=sys.stderr)
    results = args.results or os.path.join(ROOT, "results", args.protocol, "results.jsonl")
    runs_dir = args.runs_dir or os.path.join(ROOT, "runs", args.protocol)
    cli.check_file_path(results, "--results")
    cli.check_folder_path(runs_dir, "--runs-dir")
    until = None if args.until is None else until_time(args.until)
    try:
        only = re.compile(args.only or "")
    except re.error as e:
        raise cli.UsageError(f"--only {args.only!r} is not a regular expression ({e}); e.g. --only '3ep/.*bpa'")
    return p, stages, figures, results, runs_dir, until, only


def until_time(text, now=None):
    """--until as epoch seconds: HH:MM is its next occurrence (today, or tomorrow if it has passed), an ISO date and
    time is itself and must lie ahead."""
    now = now or datetime.datetime.now()
    try:
        if "T" in text:
            when = datetime.datetime.fromisoformat(text)
            now = now.astimezone(when.tzinfo) if when.tzinfo else now  # a time with its zone: compare as such
        else:
            when = datetime.datetime.combine(now.date(), datetime.time.fromisoformat(text))
            when += datetime.timedelta(days=1) if when <= now else datetime.timedelta(0)
    except ValueError:
        raise cli.UsageError(f"--until {text!r}: give a local time as HH:MM or YYYY-MM-DDTHH:MM") from None
    if when <= now:
        raise cli.UsageError(f"--until {text}: that time has passed")
    return when.timestamp()


def speed_keys(c):
    """What a run's seconds per step depend on, most specific first: task and mode, and for LoRA rank and init."""
    return ([(c["task"], "lora", c["rank"], c["init"])] if c["mode"] == "lora" else []) + [(c["task"], c["mode"])]


def _timings(finished):
    """{speed key: [(wall_s, steps) of each finished run of that key, in file order]}. wall_s is the run's training
    time, measured as the sweep ran it (`jobs` side by side); the final evaluation is not in it."""
    out = {}
    for r in finished:
        c = runspec.complete(r["config"])
        if r.get("wall_s"):
            for key in speed_keys(c):
                out.setdefault(key, []).append((r["wall_s"], c["steps"]))
    return out


def speeds(finished):
    """{speed key: seconds per step}, pooled over the key's finished runs."""
    return {key: sum(w for w, _ in v) / sum(n for _, n in v) for key, v in _timings(finished).items()}


# --until goes by an upper estimate, the slowest of a key's latest finished runs, so that it follows the machine's
# present load (SST-2's FF runs: 0.27 s a step pooled; its first three-epoch run took 0.37)
UNTIL_RECENT = 5


def upper_speeds(finished):
    """{speed key: seconds per step}: the slowest of the key's UNTIL_RECENT latest finished runs."""
    return {key: max(w / n for w, n in v[-UNTIL_RECENT:]) for key, v in _timings(finished).items()}


def protocol_speeds(speeds_of, finished, p):
    """speeds_of(finished) (speeds or upper_speeds), and where the protocol is `priced_by` another (a new model's),
    for each key none of its own finished runs has: the other protocol's seconds per step times the mode's ratio."""
    own = speeds_of(finished)
    if "priced_by" not in p:
        return own
    other, ratio = p["priced_by"]
    theirs = speeds_of(finished_runs(os.path.join(ROOT, "results", other, "results.jsonl")))
    return {**{key: s * ratio[key[1]] for key, s in theirs.items()}, **own}  # key[1]: the mode, in every speed key


def costs(pending, per_key):
    """Each pending run's estimated seconds: its steps times its most specific key's seconds per step (None when no
    finished run has its key). A run resumed from a checkpoint is costed whole."""
    out = []
    for _, flags in pending:
        c = resolve(flags)
        known = [per_key[k] for k in speed_keys(c) if k in per_key]
        out.append(c["steps"] * known[0] if known else None)
    return out


def estimate(pending, finished, jobs, per_key):
    """The pending runs' cost, per figure (costs with per_key: protocol_speeds' seconds per step), then the
    total and its wall-clock hours at `jobs` runs at a time. Runs with no finished run to go by are counted apart."""
    groups = []  # consecutive pending runs of one figure folder, in run order: [(folder, [cost or None])]
    for (name, _), cost in zip(pending, costs(pending, per_key)):
        folder = name.split(os.sep)[0]
        if not groups or groups[-1][0] != folder:
            groups.append((folder, []))
        groups[-1][1].append(cost)
    lines = [f"estimated from {len(finished)} finished runs' seconds per step (task, mode; LoRA also rank and init), "
             f"in run order, with when each part would be in at --jobs {jobs}:"]
    total = 0.0
    for figure, group in groups:
        known = [c for c in group if c is not None]
        total += sum(known)
        lines.append(f"  {figure:<12} {len(group):>4} runs {sum(known):>10,.0f} run-s, in after about "
                     f"{total / jobs / 3600:.1f} h" + (f" ({len(group) - len(known)} with no finished run to go by)"
                                                      if len(known) < len(group) else ""))
    lines.append(f"  {'total':<12} {len(pending):>4} runs {total:>10,.0f} run-s: about "
                 f"{total / jobs / 3600:.1f} h of wall time at --jobs {jobs}")
    return lines


def run_all(pending, jobs, runs_dir, results, deadline=None):
    """Run train.py for each pending (name, flags), `jobs` at a time, threads split between them; a log per run.
    SIGTERM or SIGINT to the sweep goes on to the running runs, which checkpoint and stop (train.py); none starts
    after it, and the sweep exits 128 + the signal's number once they have. A run that fails (a divergence, a kill)
    leaves no results line; the next invocation resumes it from its checkpoint.
    deadline: None, or (epoch seconds, {name: estimated seconds or None}): a run starts only if its estimate ends by
    then, in run order, later (shorter) runs filling in behind one that would not; a run with no estimate does not
    start (see deadline). The runs left are counted per folder at the end, and the sweep exits 0: the next
    invocation starts them."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    procs, failed, stopping, late = {}, [], [], []

    def forward(signum, frame):
        stopping.append(signum)
        for proc, _, _ in procs.values():
            proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = cli.progress(total=len(pending), desc="sweep", unit="run")
    todo = list(pending)
    while (todo and not stopping) or procs:
        while todo and not stopping and len(procs) < jobs:
            name, flags = todo.pop(0)
            if deadline and not _fits(deadline, name):
                late.append(name)
                bar.update(1)
                continue
            out = os.path.join(runs_dir, name)
            resume = ["--resume"] if os.path.isfile(os.path.join(out, "ckpt.pt")) else ["--overwrite"]
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", out, "--results", results, *resume]
            log = os.path.join(runs_dir, "logs", name + ".log")  # a file, not a pipe nobody reads, which would fill
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                                env=dict(os.environ, OMP_NUM_THREADS=threads)), time.time(), log)
        time.sleep(0.5)
        for name, (proc, t0, log) in list(procs.items()):
            if proc.poll() is None:
                continue
            del procs[name]
            with open(log) as f:
                tail = (f.read().strip().splitlines() or [""])[-1]
            bar.write(f"{name}: {tail if proc.returncode == 0 else 'FAILED (' + log + '): ' + tail} "
                      f"({time.time() - t0:.0f}s)")
            bar.update(1)
            if proc.returncode:
                failed.append(name)
    for s, handler in old.items():
        signal.signal(s, handler)
    bar.close()
    if late:
        per_folder = collections.Counter(name.split(os.sep)[0] for name in late)
        print(f"--until: {len(late)} runs not started, their estimate ends after "
              f"{datetime.datetime.fromtimestamp(deadline[0]):%Y-%m-%d %H:%M} or is unknown (no finished run of "
              f"their kind); the same command starts them. Per folder: "
              f"{', '.join(f'{folder} {n}' for folder, n in per_folder.items())}", file=sys.stderr)
    if stopping:
        print(f"error: the sweep stopped on {signal.Signals(stopping[0]).name}: the running runs checkpointed, "
              f"{len(todo)} not started; run the same command again to continue", file=sys.stderr)
        sys.exit(128 + stopping[0])
    if failed:
        print(f"error: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def deadline(until, pending, per_key):
    """run_all's deadline: None without --until, else (until, {name: estimated seconds by these speeds, or None})."""
    return None if until is None else (until, dict(zip([name for name, _ in pending], costs(pending, per_key))))


def ends_by(until, seconds):
    """Whether work estimated at `seconds` (None: unknown), started now, ends by `until` (epoch seconds)."""
    return seconds is not None and time.time() + seconds <= until


def _fits(deadline, name):
    return ends_by(deadline[0], deadline[1].get(name))


if __name__ == "__main__":
    main()
