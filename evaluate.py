"""
Evaluation: clean accuracy/precision/recall/F1 (CACC) and, for backdoor runs, the attack success rate (ASR); and
re-evaluation of a saved run. (The report over many runs is study/report.py.)

    python evaluate.py RUN_DIR      # rebuild a run from config.json + its weights and evaluate it again

Definitions (positive class = 1, as in the paper):
    accuracy  = (TP + TN) / N
    precision = TP / (TP + FP)        (0 when nothing is predicted positive)
    recall    = TP / (TP + FN)        (0 when there are no positives)
    F1        = 2 P R / (P + R)       (0 when P + R = 0)
    ASR       = fraction predicted as the target label on the triggered dev samples whose true label is not the
                target (attacks.triggered_dev); the paper instead triggers *all* dev samples and reports the four
                metrics against the true labels (attacks.triggered_all) -- we report both.
"""
import argparse
import json
import os
import sys

import torch

import attacks
import cli
import data
import lora
import model as M
import runspec


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
    clean = predict(model, dev, tokenizer, max_len, **kw)
    out = {"clean": classification_metrics(clean, [e.label for e in dev])}
    if attack in attacks.BACKDOORS:
        opts = dict(attack_opts or {})
        target = opts.get("target", 1)
        asr_set = attacks.triggered_dev(attack, dev, **opts)  # the non-target dev rows, in dev order, triggered
        hit = [p == target for p in predict(model, asr_set, tokenizer, max_len, **kw)]
        out["asr"] = sum(hit) / len(asr_set)
        # net of the model's own false positives: only the negatives it gets right without the trigger count
        right = [p != target for p, e in zip(clean, dev) if e.label != target]
        out["asr_net"] = sum(h for h, r in zip(hit, right) if r) / sum(right) if any(right) else None  # undefined
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
        net = metrics.get("asr_net", "absent")
        s += f"  ASR {metrics['asr']:.4f}" + ("" if net == "absent" else " (net undefined)" if net is None
                                              else f" (net {net:.4f})")
    if "triggered" in metrics:
        s += f"  triggered-dev acc {metrics['triggered']['acc']:.4f}"
    return s


# -----------------------------------------------------------------------------
# python evaluate.py RUN_DIR

def read_config(run_dir):
    """The run's flags from its config.json, flags it predates at their defaults (what the run used)."""
    cli.check_input_folder(run_dir, "run folder", "pass a run folder (train.py's --out)")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise cli.UsageError(f"{run_dir}: not a run folder (no config.json)")
    run = cli.read_json(path, "a run's config.json").get("run")
    if not isinstance(run, dict):
        raise cli.UsageError(f"{path}: not a run's config.json (no \"run\" section)")
    return argparse.Namespace(**runspec.complete(run))


def load_run(run_dir):
    """(the run's flags as a Namespace, its trained model) rebuilt from config.json and the saved weights."""
    args = read_config(run_dir)
    if args.mode == "lora":
        net, _ = runspec.build_model(args)
        lora.load_lora(net, os.path.join(run_dir, "adapter.safetensors"))
    else:
        net = M.from_pretrained(os.path.join(run_dir, "model"), verbose=False)
    return args, net


def reevaluate(run_dir):
    """Rebuild a finished run from config.json + its saved weights and evaluate it again on the dev set."""
    args, net = load_run(run_dir)
    dev = data.load_split(args.task, "dev", args.data_dir, cap=args.dev_cap, seed=args.seed)
    return evaluate(net, data.Tokenizer(args.model), dev, args.attack, runspec.attack_opts(args), args.max_len)


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("run_dir", help="a run folder (train.py's --out)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"] and not os.path.isdir("report"):
        cli.fail("the report has its own command now: python -m study.report RESULTS.jsonl [--out DIR]")
    args = p.parse_args(argv)
    with cli.usage_errors():
        m = reevaluate(args.run_dir)
    print(summary_line(m))
    saved = os.path.join(args.run_dir, "metrics.json")
    if os.path.isfile(saved):
        with cli.usage_errors():
            final = cli.read_json(saved, "a finished run's metrics.json").get("final")
        same = json.dumps(final, sort_keys=True) == json.dumps(m, sort_keys=True)  # as JSON text, as it was written
        print("matches metrics.json" if same else "DIFFERS from metrics.json (different weights or data?)")


if __name__ == "__main__":
    main()
