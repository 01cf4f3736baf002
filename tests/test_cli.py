"""Every command line against bad input: each case must exit 2 with one line on stderr ("error: ..."), no
traceback, and leave the folder it ran in as it was. Most cases call the command's main(argv) in this process; a few
run real processes (a real exit code, two trainers on one --out, a killed trainer's lock). Then what must work:
a torn results line, an older config.json, an error in the middle of training, every default in --help."""
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from bench import fisher, step
from study import calibrate
import cli
import data
import defences
import evaluate
import ledger
import ntk
from study import ntk_study
from study import report
import runspec
from study import spectrum
from study import sweep
import train
from test_train import ROOT, base_args, metrics, run_cli, tiny_setup  # noqa: F401 (tiny_setup is a fixture)


@pytest.fixture(scope="module")
def paths(tiny_setup, tmp_path_factory):
    """{bert, glue}: the tiny model, and its GLUE folder with a pair task (QNLI) added."""
    folder, glue = tiny_setup
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(glue, root / "glue")
    (root / "glue" / "QNLI").mkdir()
    for split in ("train", "dev"):
        rows = (root / "glue" / "SST-2" / f"{split}.tsv").read_text().splitlines()[1:]
        (root / "glue" / "QNLI" / f"{split}.tsv").write_text(
            "label\ttext_a\ttext_b\n" + "".join(r.rstrip("\t") + "\tthe film was .\n" for r in rows))
    return {"bert": folder, "glue": str(root / "glue")}


with open(os.path.join(ROOT, "results", "cpu", "results.jsonl")) as f:
    GOOD = f.readline().strip()  # a real results line


def T(*extra, out="run"):
    """train.py flags for a 6-step run on the tiny model, into ./run and ./res.jsonl."""
    return ["--model", "{bert}", "--data-dir", "{glue}", "--steps", "6", "--batch-size", "8", "--max-len", "16",
            "--lr", "1e-3", "--out", out, "--results", "res.jsonl", *extra]


def S(*extra):
    """study/sweep.py flags planning on the tiny model into ./r.jsonl (so nothing could ever start a real run)."""
    return ["fig1", "--seeds", "1", "--results", "r.jsonl", "--model", "{bert}", "--data-dir", "{glue}", *extra]


# what a case finds in its folder before it runs: prep(folder, paths)

def put(name, text="x"):
    def prep(d, paths):
        os.makedirs(os.path.dirname(os.path.join(d, name)) or d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    return prep


def folder(name):
    return lambda d, paths: os.makedirs(os.path.join(d, name))


def both(*preps):
    return lambda d, paths: [p(d, paths) for p in preps]


def a_run(d, paths):
    """./run as train.py leaves it once config.json is written, for the flags of T()."""
    args = runspec.validate(runspec.get_parser().parse_args([a.format(**paths) for a in T()]))
    put("run/config.json", json.dumps({"run": runspec.run_config(args)}))(d, paths)


LOCKS = []  # held by a case's prep, closed after it


def held(name):
    """Hold name/.lock as another live process would (a second open file description conflicts like one)."""
    return lambda d, paths: LOCKS.append(cli.own_folder(os.path.join(d, name)))

def unfixed(protocol, task):
    """The protocol's step budget for `task` not fixed yet, as before its calibration (undone after the case)."""
    def prep(d, paths):
        steps = sweep.PROTOCOLS[protocol]["steps"]
        old = steps[task]
        steps[task] = None
        LOCKS.append(types.SimpleNamespace(close=lambda: steps.__setitem__(task, old)))
    return prep


CASES = [  # (id, command's main, argv, prep, words the one error line must contain)
    ("train --lr -1", train.main, T("--lr", "-1"), None, "--lr"),
    ("train --lr 0", train.main, T("--lr", "0"), None, "--lr"),
    ("train --lr nan", train.main, T("--lr", "nan"), None, "--lr"),
    ("train --lr abc", train.main, T("--lr", "abc"), None, "--lr"),
    ("train --out names a file", train.main, T(out="afile"), put("afile"), "is a file"),
    ("train --overwrite, --out a file", train.main, T("--overwrite", out="afile"), put("afile"), "is a file"),
    ("train --out under a file", train.main, T(out="afile/run"), put("afile"), "is a file, not a folder"),
    ("train --results names a folder", train.main, T()[:-1] + ["resdir"], folder("resdir"), "is a folder"),
    ("train --results under a file", train.main, T()[:-1] + ["afile/r.jsonl"], put("afile"), "not a folder"),
    ("train --max-len over the positions", train.main, T("--max-len", "100"), None, "--max-len 100"),
    ("train --max-len 1", train.main, T("--max-len", "1"), None, "--max-len 1"),
    ("train --max-len 2", train.main, T("--max-len", "2"), None, "--max-len 2"),
    ("train --max-len 4 on pairs", train.main, T("--max-len", "4", "--task", "qnli"), None, "allows 5.."),
    ("train --warmup -5", train.main, T("--warmup", "-5"), None, "--warmup"),
    ("train --warmup > --steps", train.main, T("--warmup", "7"), None, "--warmup"),
    ("train --weight-decay -1", train.main, T("--weight-decay", "-1"), None, "--weight-decay"),
    ("train --eval-every -1", train.main, T("--eval-every", "-1"), None, "--eval-every"),
    ("train --ckpt-every -1", train.main, T("--ckpt-every", "-1"), None, "--ckpt-every"),
    ("train --curve-dev -1", train.main, T("--curve-dev", "-1"), None, "--curve-dev"),
    ("train --curve-dev without --eval-every", train.main, T("--curve-dev", "8"), None, "--eval-every"),
    ("train --train-cap 0", train.main, T("--train-cap", "0"), None, "--train-cap"),
    ("train --dev-cap -3", train.main, T("--dev-cap", "-3"), None, "--dev-cap"),
    ("train --steps 0", train.main, T("--steps", "0"), None, "--steps"),
    ("train --batch-size 0", train.main, T("--batch-size", "0"), None, "--batch-size"),
    ("train --grad-accum 0", train.main, T("--grad-accum", "0"), None, "--grad-accum"),
    ("train --batch-size not divisible", train.main, T("--batch-size", "7", "--grad-accum", "2"), None, "divisible"),
    ("train --eval-batch-size 0", train.main, T("--eval-batch-size", "0"), None, "--eval-batch-size"),
    ("train --alpha 0", train.main, T("--alpha", "0"), None, "--alpha"),
    ("train --lora-dropout 1", train.main, T("--lora-dropout", "1"), None, "--lora-dropout"),
    ("train --init-scale 0", train.main, T("--init-scale", "0"), None, "--init-scale"),
    ("train --rank 0", train.main, T("--rank", "0"), None, "--rank"),
    ("train --rank over the width", train.main, T("--rank", "33"), None, "--rank 33"),
    ("train --seed -1", train.main, T("--seed", "-1"), None, "--seed"),
    ("train --target-label 2", train.main, T("--target-label", "2"), None, "--target-label"),
    ("train --trigger ''", train.main, T("--trigger", "", "--attack", "bpa", "--poison-rate", "0.1"), None, "trigger"),
    ("train --trigger without --attack", train.main, T("--trigger", "cf"), None, "--attack"),
    ("train --attack without a rate", train.main, T("--attack", "bpa"), None, "--poison-rate"),
    ("train --poison-rate 1.5", train.main, T("--attack", "upa", "--poison-rate", "1.5"), None, "outside [0, 1]"),
    ("train --poison-pool any with upa", train.main, T("--attack", "upa", "--poison-rate", "0.1", "--poison-pool", "any"),
     None, "--poison-pool"),
    ("train LoRA flag with --mode ff", train.main, T("--mode", "ff", "--rank", "16"), None, "--rank"),
    ("train --mode xx", train.main, T("--mode", "xx"), None, "--mode"),
    ("train --init unknown", train.main, T("--init", "nope"), None, "--init"),
    ("train --task mnli", train.main, T("--task", "mnli"), None, "mnli"),
    ("train unknown flag", train.main, T("--foo"), None, "--foo"),
    ("train --model missing", train.main, T("--model", "/nonexistent/bert"), None,
     "--model /nonexistent/bert does not exist"),
    ("train --model a file", train.main, T("--model", "afile"), put("afile"), "--model afile is a file, not a folder"),
    ("train --drop-rows missing", train.main, T("--drop-rows", "nope.json"), None,
     "--drop-rows nope.json does not exist"),
    ("train --data-dir missing", train.main, T("--data-dir", "/nonexistent/glue"), None, "/nonexistent/glue"),
    ("train --resume and --overwrite", train.main, T("--resume", "--overwrite"), None, "contradict"),
    ("train --resume, no folder", train.main, T("--resume"), None, "--out run does not exist"),
    ("train --resume, empty folder", train.main, T("--resume"), folder("run"), "holds no run"),
    ("train --resume, foreign folder", train.main, T("--resume"), put("run/notes.txt"), "no run"),
    ("train --overwrite, foreign folder", train.main, T("--overwrite"), put("run/notes.txt"), "run folders only"),
    ("train --out holds another run", train.main, T(), a_run, "already holds a run"),
    ("train --resume, other settings", train.main, T("--resume", "--steps", "7"), a_run, "different settings (steps)"),
    ("train --out in use", train.main, T("--overwrite"), both(a_run, held("run")), "in use by another live process"),
    ("evaluate no such folder", evaluate.main, ["nope"], None, "run folder nope does not exist"),
    ("evaluate a file", evaluate.main, ["afile"], put("afile"), "run folder afile is a file, not a folder"),
    ("evaluate a folder that is no run", evaluate.main, ["d"], folder("d"), "d: not a run folder (no config.json)"),
    ("defences no such folder", defences.main, ["nope", "--defence", "dan"], None, "run folder nope does not exist"),
    ("ledger strict missing file", ledger.main, ["strict", "nope.jsonl"], None,
     "results file nope.jsonl does not exist"),
    ("evaluate config.json not JSON", evaluate.main, ["run"], put("run/config.json", "{"), "not a run's config.json"),
    ("evaluate config.json without run", evaluate.main, ["run"], put("run/config.json", "{}"), "not a run's config.json"),
    ("evaluate run without weights", evaluate.main, ["run"], a_run, "adapter.safetensors"),
    ("evaluate the old report command", evaluate.main, ["report", "r.jsonl"], None, "python -m study.report"),
    ("evaluate no arguments", evaluate.main, [], None, "run_dir"),
    ("report missing file", report.main, ["nope.jsonl"], None, "results file nope.jsonl does not exist"),
    ("report on a folder", report.main, ["d"], folder("d"), "is a folder"),
    ("report bad middle line", report.main, ["r.jsonl"], put("r.jsonl", f"{GOOD}\n{{oops\n{GOOD}\n"), "r.jsonl:2"),
    ("report line without config", report.main, ["r.jsonl"], put("r.jsonl", '{"metrics": {}}\n'), "no config"),
    ("report line not an object", report.main, ["r.jsonl"], put("r.jsonl", "[1, 2]\n"), "r.jsonl:1"),
    ("report empty file", report.main, ["r.jsonl"], put("r.jsonl", ""), "no runs"),
    ("report --out names a file", report.main, ["r.jsonl", "--out", "afile"], both(put("r.jsonl", GOOD), put("afile")),
     "is a file"),
    ("sweep unknown figure", sweep.main, S()[1:] + ["fig9"], None, "fig9"),
    ("sweep --jobs 0", sweep.main, S("--jobs", "0"), None, "--jobs"),
    ("sweep --seeds -1", sweep.main, S("--seeds", "-1"), None, "--seeds"),
    ("sweep --seeds 0", sweep.main, S("--seeds", "0"), None, "--seeds"),
    ("sweep --seeds over the protocol's", sweep.main, S("--seeds", "9"), None, "--seeds 9"),
    ("sweep --limit 0", sweep.main, S("--limit", "0"), None, "--limit"),
    ("sweep --protocol unknown", sweep.main, S("--protocol", "nope"), None, "--protocol"),
    ("sweep paper without --model", sweep.main, ["fig1", "--protocol", "paper", "--print"], None, "--model"),
    ("sweep a figure not ready", sweep.main, ["cola", "--protocol", "conv", "--print"], unfixed("conv", "cola"),
     "not ready"),
    ("sweep bad middle line", sweep.main, S("--print"), put("r.jsonl", f"{GOOD}\n{{oops\n{GOOD}\n"), "r.jsonl:2"),
    ("sweep --results a folder", sweep.main, S("--print", "--results", "d"), folder("d"), "is a folder"),
    ("sweep --runs-dir a file", sweep.main, S("--runs-dir", "afile"), put("afile"), "is a file"),
    ("sweep --data-dir missing", sweep.main, S("--print", "--data-dir", "/nonexistent"), None, "/nonexistent"),
    ("sweep --model missing", sweep.main, S("--print", "--model", "/nonexistent"), None, "/nonexistent"),
    ("sweep a second sweep in one runs dir", sweep.main, S("--runs-dir", "rd"), held("rd"), "in use"),
    ("spectrum --protocol unknown", spectrum.main, ["--protocol", "nope"], None, "--protocol"),
    ("spectrum --protocol without sweeps", spectrum.main, ["--protocol", "conv"], None, "--protocol conv"),
    ("spectrum --samples 0", spectrum.main, ["--samples", "0"], None, "--samples"),
    ("spectrum --protocol without results", spectrum.main, ["--protocol", "paper"], None, "no results"),
    ("spectrum --samples unlike the file's", spectrum.main, ["--samples", "16"], None, "--samples 32"),
    ("data download unknown task", data.main, ["download", "nope", "--to", "g"], None, "unknown task"),
    ("data download without --to", data.main, ["download", "sst2"], None, "--to"),
    ("data download, files exist", data.main, ["download", "sst2", "--to", "g"], put("g/SST-2/train.tsv"),
     "already exists"),
    ("data download --to a file", data.main, ["download", "sst2", "--to", "afile"], put("afile"), "is a file"),
    ("data download --timeout 0", data.main, ["download", "sst2", "--to", "g", "--timeout", "0"], None, "--timeout"),
    ("data stats, --data-dir missing", data.main, ["stats", "--data-dir", "/nonexistent"], None, "/nonexistent"),
    ("ntk fig3 --ranks 0", ntk.main, ["fig3", "--out", "f", "--ranks", "0"], None, "rank"),
    ("ntk fig3 --scales -1", ntk.main, ["fig3", "--out", "f", "--scales", "-1"], None, "scale"),
    ("ntk fig3 --n-in 0", ntk.main, ["fig3", "--out", "f", "--n-in", "0"], None, "--n-in"),
    ("ntk fig3 --alpha -1", ntk.main, ["fig3", "--out", "f", "--alpha", "-1"], None, "alpha"),
    ("ntk fig3 --out a file", ntk.main, ["fig3", "--out", "afile"], put("afile"), "is a file"),
    ("ntk fig3 without --out", ntk.main, ["fig3"], None, "--out"),
    ("calibrate missing results", calibrate.main, ["nope.jsonl"], None, "results file nope.jsonl does not exist"),
    ("ntk_study --model missing", ntk_study.main, ["thm36", "--model", "/nonexistent/bert", "--out", "f"], None,
     "--model /nonexistent/bert does not exist"),
    ("ntk_study runs, a run folder missing", ntk_study.main, ["runs", "nope", "--out", "f"], None,
     "run folder nope does not exist"),
    ("bench.step --model missing", step.main, ["--model", "/nonexistent/bert"], None,
     "--model /nonexistent/bert does not exist"),
    ("bench.step --versus missing", step.main, ["--versus", "/nonexistent/mpnet"], None,
     "--versus /nonexistent/mpnet does not exist"),
    ("bench.fisher --model missing", fisher.main, ["--model", "/nonexistent/bert"], None,
     "--model /nonexistent/bert does not exist"),
]


def state(d):
    """What a folder holds: every path with a hash of its contents."""
    out = {}
    for base, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), d) + "/"] = None
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), d)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("name, main, argv, prep, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, main, argv, prep, words, paths, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    if prep:
        prep(str(tmp_path), paths)
    before = state(tmp_path)
    try:
        with pytest.raises(SystemExit) as stop:
            main([a.format(**paths) for a in argv])
    finally:
        while LOCKS:
            LOCKS.pop().close()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert words in lines[0]
    assert state(tmp_path) == before


# -----------------------------------------------------------------------------
# real processes

def test_real_process_exit_code_and_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "study.report", str(tmp_path / "nope.jsonl")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")


def test_one_live_trainer_per_folder_and_a_killed_one_leaves_no_lock(tiny_setup, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                              *base_args(tiny_setup, out, "--steps", "100000", "--ckpt-every", "5")],
                             env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first trainer ended early"
        second = run_cli(base_args(tiny_setup, out, "--steps", "100000", "--ckpt-every", "5", "--overwrite"))
        assert second.returncode == 2 and "in use by another live process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "metrics.json").exists()
    again = run_cli(base_args(tiny_setup, out, "--overwrite", "--steps", "2"))
    assert again.returncode == 0, again.stderr  # the kill released the lock


# -----------------------------------------------------------------------------
# what must work

def test_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(GOOD + "\n" + GOOD[:40])
    report.main([str(path), "--out", str(tmp_path / "rep")])
    assert "skipped a torn last line" in capsys.readouterr().err
    assert (tmp_path / "rep" / "table.md").exists()


def test_evaluate_reads_a_config_from_before_newer_flags(tiny_setup, tmp_path, capsys):
    import test_train
    test_train._train_in_process(tiny_setup, tmp_path / "old", "--attack", "bpa", "--poison-rate", "0.25")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for flag in ("schedule", "poison_pool", "curve_dev"):  # flags added after the first results were recorded
        cfg["run"].pop(flag, None)
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    evaluate.main([str(tmp_path / "old")])
    assert capsys.readouterr().out.strip().endswith("matches metrics.json")


def test_an_error_in_training_leaves_a_run_that_resumes_bit_for_bit(tiny_setup, tmp_path, monkeypatch, capsys):
    flags = ["--steps", "6", "--ckpt-every", "0", "--mode", "ff"]  # no periodic checkpoint: the error's is the only
    assert train.main(base_args(tiny_setup, tmp_path / "full", *flags)) is not None
    real = train.train_step

    def failing(run, step):
        if step == 4:
            raise RuntimeError("the disk went away")
        real(run, step)
    monkeypatch.setattr(train, "train_step", failing)
    with pytest.raises(SystemExit) as stop:
        train.main(base_args(tiny_setup, tmp_path / "cut", *flags))
    assert stop.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped at step 4 of 6" in last and "checkpoint at step 4" in last and "--resume" in last
    assert not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(train, "train_step", real)
    train.main(base_args(tiny_setup, tmp_path / "cut", *flags, "--resume"))
    assert metrics(tmp_path / "cut")["train_loss"] == metrics(tmp_path / "full")["train_loss"]
    assert metrics(tmp_path / "cut")["final"] == metrics(tmp_path / "full")["final"]


def test_results_path_is_checked_before_training(tiny_setup, tmp_path, capsys):
    (tmp_path / "resdir").mkdir()
    args = base_args(tiny_setup, tmp_path / "run")
    args[args.index("--results") + 1] = str(tmp_path / "resdir")
    with pytest.raises(SystemExit):
        train.main(args)
    assert not (tmp_path / "run").exists() and "is a folder" in capsys.readouterr().err


def test_help_shows_every_default_zero_included(capsys):
    lines = runspec.get_parser().format_help().splitlines()
    for flag, default in (("--lora-dropout", "0.0"), ("--poison-rate", "0.0"), ("--weight-decay", "0.0"),
                          ("--warmup", "0"), ("--seed", "0"), ("--eval-every", "0"), ("--curve-dev", "0")):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag} "))
        j = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("  -"))
        assert f"(default: {default})" in " ".join(" ".join(lines[i:j]).split()), flag
    for main, argv in ((train.main, []), (evaluate.main, []), (report.main, []), (sweep.main, []),
                       (spectrum.main, []), (data.main, ["download"]), (ntk.main, ["fig3"])):
        with pytest.raises(SystemExit) as stop:
            main(argv + ["--help"])
        assert stop.value.code == 0
    capsys.readouterr()


# -----------------------------------------------------------------------------
# progress: a bar on a terminal, plain lines in a log

class Stream(io.StringIO):
    """A stream that is a terminal or not."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def log_lines(total, seconds_per_step, initial=0, leave=True):
    """The lines LogProgress writes for a loop from `initial` to `total` whose steps take seconds_per_step each (a
    clock the test sets), each step's loss 1 / step."""
    now, log = [0.0], Stream(tty=False)
    bar = cli.LogProgress(desc="train", total=total, unit="step", initial=initial, leave=leave, file=log,
                          clock=lambda: now[0])
    for step in range(initial + 1, total + 1):
        now[0] = (step - initial) * seconds_per_step
        bar.set_postfix({"loss": f"{1 / step:.4f}", "lr": "1.00e-03"})
        bar.update(1)
    assert "\r" not in log.getvalue()
    return log.getvalue().splitlines()


def test_a_log_gets_a_line_every_round_number_of_steps_and_at_the_last():
    # 2,500 steps: a line every 100 (the largest 1, 2 or 5 x 10^k giving at least 20 lines), elapsed and ETA
    # worked out by hand (3 s a step: 1,000 steps took 50 min, 1,500 more take 75)
    lines = log_lines(2500, 3.0)
    assert [line.split()[2] for line in lines] == [f"{k}/2500" for k in range(100, 2501, 100)]
    assert lines[9] == "train: step 1000/2500 (40%), loss 0.0010, lr 1.00e-03, elapsed 50:00, ETA 1:15:00"
    assert lines[-1] == "train: step 2500/2500 (100%), loss 0.0004, lr 1.00e-03, elapsed 2:05:00"
    # fast steps (10 ms): never two lines within 10 s, the last step's always
    assert [line.split()[2] for line in log_lines(2500, 0.01)] == ["1000/2500", "2000/2500", "2500/2500"]
    assert [line.split()[2] for line in log_lines(7, 0.01)] == ["7/7"]
    # a pass that leaves no bar on a terminal leaves no line in a log either, unless it took 10 s or more
    assert log_lines(7, 0.01, leave=False) == []
    assert [line.split()[2] for line in log_lines(7, 2.0, leave=False)] == ["5/7", "7/7"]
    # a resumed run (at step 2,000, 2 s a step): elapsed and ETA are this process's
    lines = log_lines(2500, 2.0, initial=2000)
    assert lines[1] == "train: step 2200/2500 (88%), loss 0.0005, lr 1.00e-03, elapsed 6:40, ETA 10:00"
    assert len(lines) == 5


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    tty, log = Stream(tty=True), Stream(tty=False)
    for stream in (tty, log):
        assert list(cli.progress(range(30), desc="scoring", unit="input", file=stream)) == list(range(30))
    assert "\r" in tty.getvalue()  # tqdm redraws in place
    assert log.getvalue() == "scoring: input 30/30 (100%), elapsed 0:00\n"
