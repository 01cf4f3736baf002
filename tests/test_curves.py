"""Curves over training: poisoned samples seen (checked against the texts the model actually trained on), the
JSONL curve, and the constant schedule's promise that a prefix of a run is itself a run."""
import json
import os
import subprocess
import sys

import pytest

from test_train import ROOT, base_args, metrics, tiny_setup  # noqa: F401 (tiny_setup is a fixture)

# runs train.main with data.collate wrapped: every training micro-batch's texts are appended to a file, so the
# count of triggered texts is what the model saw, independent of train.py's own bookkeeping
SPY = """
import json, sys, data, train
orig, log = data.collate, sys.argv[1]
def spy(examples, *a, **k):
    if sys._getframe(1).f_code.co_filename.endswith("train.py"):
        with open(log, "a") as f:
            f.write(json.dumps([e.text_a for e in examples]) + "\\n")
    return orig(examples, *a, **k)
data.collate = spy
train.main(sys.argv[2:])
"""


def spy_run(tiny_setup, out, *extra):
    log = str(out) + ".texts"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", SPY, log, *base_args(tiny_setup, out, *extra)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with open(log) as f:
        return [json.loads(line) for line in f]


def test_poisoned_seen_counts_the_triggered_texts_trained_on(tiny_setup, tmp_path):
    out = tmp_path / "bpa"
    batches = spy_run(tiny_setup, out, "--attack", "bpa", "--poison-rate", "0.25", "--steps", "6", "--eval-every", "2")
    seen = [sum(t.startswith("[.*?]") for t in b) for b in batches]
    assert len(batches) == 6 and sum(seen) > 0, "the attacked run trained on no poisoned sample"
    evals = metrics(out)["evals"]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert [e["poisoned_seen"] for e in evals] == [sum(seen[:2]), sum(seen[:4]), sum(seen)]
    with open(str(out) + ".jsonl") as f:
        curve = json.loads(f.readline())["curve"]
    assert [(p["samples"], p["poisoned_seen"]) for p in curve] == [(16, sum(seen[:2])), (32, sum(seen[:4])), (48, sum(seen))]
    assert all("asr" in p and "asr_net" in p for p in curve)


def test_constant_schedule_prefix_is_a_run(tiny_setup, tmp_path):
    runs = {}
    for name, steps, schedule in (("short", "4", "constant"), ("long", "8", "constant"), ("lin", "8", "linear")):
        spy_run(tiny_setup, tmp_path / name, "--steps", steps, "--schedule", schedule, "--warmup", "1")
        runs[name] = metrics(tmp_path / name)["train_loss"]
    assert runs["long"][:4] == runs["short"]  # bitwise: same data order, dropout and learning rates
    # a decaying schedule depends on the total number of steps (the update of step 2 already differs)
    assert runs["lin"][:4] != runs["short"]


def test_select_dev_rows_are_apart_and_leave_training_unchanged(tiny_setup, tmp_path):
    """--select-dev: clean accuracy on dev rows outside the curve's, at each intermediate evaluation. It must not move
    a bit of training, and its number must be the accuracy of the model at that step on exactly those rows (oracle:
    the 3-step run, a prefix under the constant schedule, saved and rebuilt by evaluate.load_run)."""
    import data
    import evaluate
    import train
    from test_train import run_cli
    common = ("--schedule", "constant", "--attack", "bpa", "--poison-rate", "0.25")
    for name, extra in (("plain", ()), ("sel", ("--select-dev", "6")), ("prefix", ())):
        steps = ("--steps", "3") if name == "prefix" else ("--eval-every", "3", "--curve-dev", "8")
        res = run_cli(base_args(tiny_setup, tmp_path / name, *common, *steps, *extra))
        assert res.returncode == 0, res.stderr
    plain, sel = metrics(tmp_path / "plain"), metrics(tmp_path / "sel")
    assert sel["train_loss"] == plain["train_loss"] and sel["final"] == plain["final"]
    assert [{k: v for k, v in e.items() if k != "select"} for e in sel["evals"]] == plain["evals"]
    dev = data.load_split("sst2", "dev", tiny_setup[1])
    curve, rows = train.curve_subset(dev, 8, 6)
    assert len(rows) == 6 and not {id(e) for e in rows} & {id(e) for e in curve}
    assert curve == train.curve_subset(dev, 8)[0]  # the curve's rows do not move
    args, net = evaluate.load_run(str(tmp_path / "prefix"))
    preds = evaluate.predict(net, rows, data.Tokenizer(args.model), args.max_len)
    point = sel["evals"][0]
    assert point["step"] == 3 and point["select"]["n"] == 6
    assert point["select"]["acc"] == sum(p == e.label for p, e in zip(preds, rows)) / 6
    with open(str(tmp_path / "sel") + ".jsonl") as f:
        line = json.loads(f.readline())
    assert line["curve"][0]["sel_acc"] == point["select"]["acc"] and "sel_acc" not in line["curve"][-1]
    assert "select_dev" not in line["config"]  # an evaluation setting, not part of the run's identity


def test_select_dev_needs_rows_to_spare(tiny_setup, tmp_path):
    from test_train import run_cli
    res = run_cli(base_args(tiny_setup, tmp_path / "x", "--eval-every", "3", "--curve-dev", "8", "--select-dev", "9"))
    assert res.returncode == 2 and "--select-dev 9" in res.stderr and "at most 8" in res.stderr
    assert not os.path.exists(tmp_path / "x")
    res = run_cli(base_args(tiny_setup, tmp_path / "y", "--eval-every", "3", "--select-dev", "4"))
    assert res.returncode == 2 and "--select-dev needs --curve-dev" in res.stderr


def test_seeds_on_different_evaluation_grids_average_on_the_coarsest():
    """effects.curves: a seed evaluated every 1/32 beside seeds every 1/16 (issue 51) is read at the coarse grid's
    points by linear interpolation (worked out by hand); seeds on one grid keep their own points."""
    from study import effects
    coarse = [dict(samples=s, poisoned_seen=s // 10, acc=0.8, asr=a, asr_net=a) for s, a in ((100, 0.1), (200, 0.5))]
    fine = [dict(samples=s, poisoned_seen=s // 10, acc=0.9, asr=a, asr_net=a)
            for s, a in ((60, 0.0), (120, 0.2), (180, 0.6), (200, 0.7))]
    grid = effects.on_one_grid([coarse, fine])
    assert grid[0] == coarse
    assert [p["samples"] for p in grid[1]] == [100, 200]
    assert grid[1][0]["asr"] == pytest.approx(0.0 + (100 - 60) / 60 * 0.2) and grid[1][1] is fine[-1]
    assert effects.on_one_grid([coarse, [dict(p) for p in coarse]])[1] == coarse
    cfg = dict(task="sst2", mode="ff", attack="bpa", poison_rate=0.0015, seed=0)
    runs = [dict(config=dict(cfg, seed=s), curve=c) for s, c in enumerate((coarse, fine))]
    pts = effects.curves(runs, "sst2", "bpa", 0.0015, dict(mode="ff"))
    assert [p["samples"] for p in pts] == [100, 200] and all(p["n"] == 2 for p in pts)
    assert pts[0]["asr"] == pytest.approx(100 * (0.1 + 0.4 / 3) / 2)
