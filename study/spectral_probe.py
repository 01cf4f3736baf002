"""
Why spectral signatures miss the poisoned rows: a probe beside the defences experiment (REPORT.md, "Defences x
LoRA/FF"; not pre-registered, so it reports measures and no verdict).

Spectral signatures (Tran, Li, Madry, NeurIPS 2018) score each row of a label by its squared projection on the top
singular vector of that label's centred representations (defences.spectral_scores). Within a label, the covariance
of the rows is exactly

    Sigma = (1 - eps) Sigma_clean + eps Sigma_poison + eps (1 - eps) d d^T,      d = mu_poison - mu_clean,

with eps the poisoned share of the label. The poison's mean shift adds variance eps (1 - eps) |d|^2 along d; well
below the clean rows' top eigenvalue, it leaves the top singular vector a clean direction, and the score ranks the
clean rows' own spread, not the poison. The probe measures, on the target label of a finished backdoor run:
    separation  eps (1 - eps) |d|^2 / lambda_1(Sigma_clean): the shift's variance against the clean rows' largest
    auroc_top   AUROC (defences.auroc) of the spectral score, poisoned against clean rows of the label; the
                defence drops the top rows, so 0.5 is chance and below 0.5 means the poison sits near the centre
    auroc_d     the same score on d's direction instead (an oracle that knows the poison's mean): how well any
                one direction could have separated them
    top_dirs    AUROC of the squared projection on each of the top 10 singular vectors

    python -m study.spectral_probe RUN_DIR [RUN_DIR ...]   # one JSON line per run on stdout, appended to --out
"""
import os

import torch

import attacks
import cli
import data
import defences
import evaluate
import ledger
import train
from study import ROOT


def probe(reps, labels, poisoned, target, dirs=10):
    """The measures above for label `target`: reps (N, H), labels (N,), poisoned (row indices)."""
    labels = torch.as_tensor(labels)
    rows = (labels == target).nonzero().squeeze(1)
    x = reps[rows].double()
    bad = torch.isin(rows, torch.as_tensor(poisoned, dtype=torch.long))
    if not bad.any() or bad.all():
        raise ValueError(f"label {target} needs both poisoned and clean rows (it has {int(bad.sum())} poisoned "
                         f"of {len(rows)})")
    centred = x - x.mean(0)
    vh = torch.linalg.svd(centred, full_matrices=False).Vh
    clean, shift = x[~bad], x[bad].mean(0) - x[~bad].mean(0)
    eps = bad.double().mean()
    top_clean = torch.linalg.eigvalsh(torch.cov(clean.T, correction=0))[-1]

    def auroc_on(direction):
        score = (centred @ direction) ** 2
        return defences.auroc(score[~bad], score[bad])

    tops = [auroc_on(v) for v in vh[:dirs]]  # the first is spectral signatures' own score
    return dict(target=target, n_rows=len(rows), n_poisoned=int(bad.sum()),
                separation=float(eps * (1 - eps) * shift.norm() ** 2 / top_clean),
                auroc_top=tops[0], auroc_d=auroc_on(shift / shift.norm()), top_dirs=[round(a, 4) for a in tops])


def probe_run(run_dir, data_dir=None):
    """The probe on a finished run's training set as it was trained (its poisoned rows, the last layer's [CLS])."""
    args, net = evaluate.load_run(run_dir)
    if data_dir:
        args.data_dir = data_dir
    train_set, _, poisoned = train.load_data(args)
    reps = defences.outputs(net, train_set, data.Tokenizer(args.model), args.max_len, defences.LAST,
                            progress="training rows' [CLS]")[1][0]
    out = probe(reps, [e.label for e in train_set], poisoned, args.target_label)
    return dict(run=run_dir, mode=args.mode, poison_rate=args.poison_rate, seed=args.seed, **out)


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("runs", nargs="+", help="finished backdoor run folders")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "conv", "spectral-probe.jsonl"),
                   help="results file the lines are appended to")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: the one each run recorded)")
    a = p.parse_args(argv)
    with cli.usage_errors():  # every run checked before any is probed: no partial output
        cli.check_file_path(a.out, "--out")
        for run in a.runs:
            attack = evaluate.read_config(run).attack
            if attack not in attacks.BACKDOORS:
                raise cli.UsageError(f"{run}: the run has no backdoor (--attack {attack}); the probe needs one")
            if not os.path.isfile(os.path.join(run, "metrics.json")):
                raise cli.UsageError(f"{run}: the run is not finished (no metrics.json); finish it with train.py "
                                     "--resume")
    for run in a.runs:
        line = probe_run(run, a.data_dir)
        ledger.append(a.out, line)
        print(line)


if __name__ == "__main__":
    main()
