"""Faults while a run works, or in the files it reads back (issue 25), the way tests/test_cli.py tries bad input:
each case injects one fault into a tiny run (4 steps, a checkpoint every 2) and checks the exit code, the one error
line, that nothing was written that should not have been (no metrics.json or results line for an unfinished run, no
temporary or torn file, a damaged folder left as it was), and, where the fault allows it, that the run continued
after it equals the uninterrupted run.

How the faults are made, in this process:
  a full disk (ENOSPC), a quota (EDQUOT), a read-only folder (EROFS): os.fsync or os.write patched to raise that
    OSError for one file, found by the descriptor's /proc/self/fd link (Linux). Every write goes through one of them
    (cli.write_atomic fsyncs the temporary file; ledger.append is one os.write and an fsync). A small real filesystem
    would need root here;
  SIGTERM, SIGINT: os.kill of this process from inside a training step, or from the final outputs (train.main
    installs the handlers);
  divergence: a learning rate of 1e30, or a gradient set to NaN after the backward pass of one step;
  damaged files: a finished or stopped run's file truncated to half, emptied, or overwritten with garbage."""
import errno
import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch

import cli
import data
import evaluate
import ledger
import runspec
import train
from study import report
from study import sweep
from test_cli import state
from test_train import tiny_setup, trainer_pid  # noqa: F401 (tiny_setup is a fixture)

FLAGS = ["--steps", "4", "--ckpt-every", "2", "--batch-size", "8", "--max-len", "16", "--lr", "1e-3"]
FF = ["--mode", "ff"]


def argv(paths, d, extra):
    folder, glue = paths
    return ["--model", folder, "--data-dir", glue, "--out", str(d / "run"), "--results", str(d / "res.jsonl"),
            *FLAGS, *extra]


def exit_code(main, args):
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


# -----------------------------------------------------------------------------
# the faults: fault(monkeypatch, folder)

def fail(call, name, code=errno.ENOSPC):
    """os.<call> (fsync or write) raises OSError(code) for the file whose name ends with `name`."""
    real = getattr(os, call)

    def faulty(fd, *a):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(code, os.strerror(code))
        return real(fd, *a)
    return lambda mp, d: mp.setattr(os, call, faulty)


def signal_in_step(signum, at=2):
    """The signal arrives in the middle of step `at` (0-based): after its forward pass, before its update."""
    real = train.train_step

    def step(run, k):
        if k == at:
            os.kill(os.getpid(), signum)
        real(run, k)
    return lambda mp, d: mp.setattr(train, "train_step", step)


def signal_after_check(signum, at=3):
    """The signal arrives in step `at` (0-based) after check_step agreed on whether to stop (the last step's: after
    the loop)."""
    real = train.check_step

    def check(run, k, loss):
        real(run, k, loss)
        if k == at:
            os.kill(os.getpid(), signum)
    return lambda mp, d: mp.setattr(train, "check_step", check)


def signal_in_outputs(mp, d):
    """SIGTERM while the final weights are being written."""
    real = train.save_weights

    def save(net, args):
        os.kill(os.getpid(), signal.SIGTERM)
        real(net, args)
    mp.setattr(train, "save_weights", save)


def nan_gradient(at=2):
    """A NaN in one gradient of step `at` (0-based); the loss stays finite."""
    real = train.check_step

    def check(run, k, loss):
        if k == at:
            next(p for p in run.net.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        real(run, k, loss)
    return lambda mp, d: mp.setattr(train, "check_step", check)


# -----------------------------------------------------------------------------
# what a case finds before it runs: prep(folder, paths, flags, cache), cache a folder the module's cases share

def stop_early(d, paths, flags):
    """A run stopped by SIGTERM in its second step: ckpt.pt at step 2, no metrics.json."""
    with pytest.MonkeyPatch.context() as mp:
        signal_in_step(signal.SIGTERM, at=1)(mp, d)
        assert exit_code(train.main, argv(paths, d, flags)) == 128 + signal.SIGTERM


def finish(d, paths, flags):
    assert train.main(argv(paths, d, flags)) is not None


def made(make):
    """A run (./run, ./res.jsonl) as make(folder, paths, flags) leaves it: made once per flags, then copied."""
    def prep(d, paths, flags, cache):
        done = cache / "-".join([make.__name__, *flags])
        if not done.exists():
            make(done, paths, flags)
        shutil.copytree(done / "run", d / "run")
        if (done / "res.jsonl").exists():
            shutil.copy(done / "res.jsonl", d / "res.jsonl")
    return prep


stopped, finished = made(stop_early), made(finish)


def foreign_ckpt(d, paths, flags, cache):
    """A stopped run whose ckpt.pt is a stopped LoRA run's."""
    stopped(d / "lora", paths, [], cache)
    stopped(d, paths, flags, cache)
    shutil.move(d / "lora" / "run" / "ckpt.pt", d / "run" / "ckpt.pt")
    shutil.rmtree(d / "lora")


def negatives(d, paths, flags, cache):
    """./neg: the tiny task's negative rows only, so clean-label BPA (target-label rows only) has nothing to poison."""
    for split in ("train", "dev"):
        rows = open(os.path.join(paths[1], "SST-2", f"{split}.tsv")).read().splitlines()
        os.makedirs(d / "neg" / "SST-2", exist_ok=True)
        (d / "neg" / "SST-2" / f"{split}.tsv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r[0] == "0"]) + "\n")


def damaged(prep, name, how):
    """prep, then the file `name` in the run folder truncated to half, emptied, or overwritten with garbage."""
    def damage(d, paths, flags, cache):
        prep(d, paths, flags, cache)
        path = d / "run" / name
        data = path.read_bytes()
        path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"\x00\xff not a file\n"}[how])
    return damage


def no_outputs(d):
    """An unfinished run: no metrics.json, no results line, no temporary file."""
    assert not (d / "run" / "metrics.json").exists()
    assert not (d / "res.jsonl").exists() or (d / "res.jsonl").read_bytes() == b""
    no_tmp(d)


def no_tmp(d):
    assert not [p for p in d.rglob("*.tmp")], "a temporary file was left behind"


def ckpt_at(step):
    def check(d):
        no_outputs(d)
        assert torch.load(d / "run" / "ckpt.pt", weights_only=True)["step"] == step
    return check


def absent(*names):
    def check(d):
        no_outputs(d)
        assert not [n for n in names if (d / "run" / n).exists()]
    return check


def one_line_no_metrics(d):
    """The results line was written before the fault; metrics.json was not."""
    assert not (d / "run" / "metrics.json").exists() and len(ledger.read(d / "res.jsonl")) == 1
    no_tmp(d)


TRAIN, RESUME = train.main, lambda args: train.main(args + ["--resume"])
EVAL = lambda args: evaluate.main([args[args.index("--out") + 1]])  # noqa: E731
REPORT = lambda args: report.main([args[args.index("--results") + 1], "--out", "rep"])  # noqa: E731
UNCHANGED = "unchanged"  # the case leaves the folder exactly as it found it

CASES = [  # (id, flags, prep, fault, command, exit code, words in the error line, check after, flags to continue)
    # 1. divergence: stop at the step, keep the last good checkpoint, write no metrics or results line
    ("diverging FF at --lr 1e30", FF + ["--lr", "1e30"], None, None, TRAIN, 1,
     "non-finite loss or gradients in step 2: loss nan", absent("ckpt.pt"), None),
    ("NaN gradient, finite loss, after a checkpoint", [], None, nan_gradient(at=2), TRAIN, 1,
     "non-finite loss or gradients in step 3: loss 0.", ckpt_at(2), None),
    # 2. an attack that poisons nothing
    ("--poison-rate rounds to 0 rows", ["--attack", "bpa", "--poison-rate", "0.005"], None, None, TRAIN, 2,
     "round(0.005 x 64) = 0 of the 64 training rows", UNCHANGED, None),
    ("an attack with an empty pool", ["--data-dir", "neg", "--attack", "clbpa", "--poison-rate", "0.1"], negatives,
     None, TRAIN, 2, "only 0 may be poisoned", UNCHANGED, None),
    # 3. damaged files read back (more below: READ_BACK): one line naming the file, exit 2, the folder as it was
    ("ckpt.pt of another model", FF, foreign_ckpt, None, RESUME, 2,
     "ckpt.pt: not a readable checkpoint of this run (ValueError: another model's weights", UNCHANGED, None),
    ("config.json truncated, --resume", [], damaged(stopped, "config.json", "truncated"), None, RESUME, 2,
     "config.json: not a run's config.json (not valid JSON", UNCHANGED, None),
    # 4. signals: finish the step, checkpoint it, say how to resume, exit 128 + the signal's number
    ("SIGTERM in a step", [], None, signal_in_step(signal.SIGTERM), TRAIN, 143,
     "stopped at step 3 of 4 (SIGTERM); it holds a checkpoint at step 3", ckpt_at(3), ["--resume"]),
    ("SIGINT in a step", FF, None, signal_in_step(signal.SIGINT), TRAIN, 130,
     "stopped at step 3 of 4 (SIGINT); it holds a checkpoint at step 3", ckpt_at(3), ["--resume"]),
    ("SIGTERM in the last step, after its check", [], None, signal_after_check(signal.SIGTERM), TRAIN, 143,
     "stopped at step 4 of 4 (SIGTERM); it holds a checkpoint at step 4", ckpt_at(4), ["--resume"]),
    ("SIGTERM in a step, after its check", [], None, signal_after_check(signal.SIGTERM, at=0), TRAIN, 143,
     "stopped at step 2 of 4 (SIGTERM); it holds a checkpoint at step 2", ckpt_at(2), ["--resume"]),
    ("SIGTERM in the final outputs", [], None, signal_in_outputs, TRAIN, 143,
     "stopped at step 4 of 4 (SIGTERM); it holds a checkpoint at step 4", ckpt_at(4), ["--resume"]),
    # 5. a full disk, a quota, a read-only folder: no torn file, the path named, a resume once it is fixed
    ("ENOSPC writing ckpt.pt", [], None, fail("fsync", "ckpt.pt.tmp"), TRAIN, 1,
     "ckpt.pt: writing failed: No space left on device", absent("ckpt.pt"), ["--resume"]),
    ("EROFS writing config.json", [], None, fail("fsync", "config.json.tmp", errno.EROFS), TRAIN, 1,
     "config.json: writing failed: Read-only file system); nothing was written", absent("config.json"), []),
    ("EDQUOT writing adapter.safetensors", [], None, fail("fsync", "adapter.safetensors.tmp", errno.EDQUOT), TRAIN, 1,
     "adapter.safetensors: writing failed: Disk quota exceeded", ckpt_at(4), ["--resume"]),
    ("ENOSPC writing model.safetensors (FF)", FF, None, fail("fsync", "model.safetensors.tmp"), TRAIN, 1,
     "model.safetensors: writing failed: No space left on device", ckpt_at(4), ["--resume"]),
    ("ENOSPC writing the peft export", [], None, fail("fsync", "adapter_model.safetensors.tmp"), TRAIN, 1,
     "adapter_model.safetensors: writing failed", ckpt_at(4), ["--resume"]),
    ("ENOSPC in the results append's write", [], None, fail("write", "res.jsonl"), TRAIN, 1,
     "res.jsonl: appending failed: No space left on device", ckpt_at(4), ["--resume"]),
    ("ENOSPC in the results append's fsync", [], None, fail("fsync", "res.jsonl"), TRAIN, 1,
     "res.jsonl: appending failed: No space left on device", ckpt_at(4), ["--resume"]),
    ("ENOSPC writing metrics.json", [], None, fail("fsync", "metrics.json.tmp"), TRAIN, 1,
     "metrics.json: writing failed: No space left on device", one_line_no_metrics, ["--resume"]),
]


READ_BACK = [  # (file in the run folder, flags, how it was made, the command that reads it, words of its error)
    ("ckpt.pt", [], stopped, RESUME, "ckpt.pt: not a readable checkpoint of this run"),
    ("config.json", [], finished, EVAL, "config.json: not a run's config.json"),
    ("adapter.safetensors", [], finished, EVAL, "adapter.safetensors: cannot be read as safetensors"),
    ("model/model.safetensors", FF, finished, EVAL, "model.safetensors: cannot be read as safetensors"),
    ("model/config.json", FF, finished, EVAL, "model/config.json: not a Hugging Face model's config.json"),
    ("metrics.json", [], finished, EVAL, "metrics.json: not a finished run's metrics.json"),
    ("../res.jsonl", [], finished, REPORT, "res.jsonl"),  # 1: not a JSON object (garbage), or no runs (a torn line)
]
CASES += [(f"{name.lstrip('./')} {how}", flags, damaged(prep, name, how), None, main, 2, words, UNCHANGED, None)
          for name, flags, prep, main, words in READ_BACK for how in ("truncated", "empty", "garbage")]


@pytest.fixture(scope="module")
def paths(tiny_setup):
    return tiny_setup


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("made")


REFERENCE = {}  # flags -> (metrics.json, results line) of the uninterrupted run


def uninterrupted(paths, d, flags):
    key = tuple(flags)
    if key not in REFERENCE:
        train.main(argv(paths, d, flags))
        REFERENCE[key] = read_outputs(d)
    return REFERENCE[key]


def read_outputs(d):
    """What a finished run leaves that must not depend on how it got there (wall times and paths aside)."""
    with open(d / "run" / "metrics.json") as f:
        m = json.load(f)
    (line,) = ledger.runs(d / "res.jsonl")
    return ({k: m[k] for k in ("final", "evals", "train_loss", "n_poisoned")},
            {k: v for k, v in line.items() if k not in ("wall_s", "out")})


@pytest.mark.parametrize("name, flags, prep, fault, main, code, words, check, again", CASES, ids=[c[0] for c in CASES])
def test_fault_is_one_line_writes_nothing_wrong_and_resumes(name, flags, prep, fault, main, code, words, check, again,
                                                             paths, cache, tmp_path, tmp_path_factory, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    if prep:
        prep(tmp_path, paths, flags, cache)
    before = state(tmp_path)
    capsys.readouterr()
    with monkeypatch.context() as mp:
        if fault:
            fault(mp, tmp_path)
        assert exit_code(main, argv(paths, tmp_path, flags)) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    assert words in errors[0], errors[0]
    if check == UNCHANGED:
        assert state(tmp_path) == before
    else:
        check(tmp_path)
    if again is not None:  # the fault gone (space freed, no signal), the same command continues the run
        assert train.main(argv(paths, tmp_path, flags + again)) is not None
        assert read_outputs(tmp_path) == uninterrupted(paths, tmp_path_factory.mktemp("ref"), flags)


# -----------------------------------------------------------------------------
# what goes with the table

def test_an_empty_attack_asked_for_trains_and_says_so(paths, tmp_path):
    """--allow-empty-attack trains the clean run it is, records n_poisoned = 0, and is no part of the run's identity."""
    flags = ["--attack", "bpa", "--poison-rate", "0.005"]
    assert train.main(argv(paths, tmp_path, flags + ["--allow-empty-attack"])) is not None
    with open(tmp_path / "run" / "config.json") as f:
        config = json.load(f)
    assert config["n_poisoned"] == 0 and "allow_empty_attack" not in config["run"]
    (line,) = ledger.runs(tmp_path / "res.jsonl")
    assert line["n_poisoned"] == 0 and line["metrics"]["asr"] is not None
    plain = runspec.validate(runspec.get_parser().parse_args(argv(paths, tmp_path, flags)))
    assert runspec.run_key(line["config"]) == runspec.run_key(runspec.run_config(plain))


def test_the_ledger_refuses_nan_and_strict_rewrites_old_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps({"config": {"seed": 0}, "metrics": {"asr_net": 0.5}})
    old = '{"config": {"seed": 1}, "metrics": {"asr_net": NaN}, "curve": [{"asr_net": NaN}, {"asr_net": 1.0}]}'
    path.write_text(f"{good}\n{old}\n{good[:20]}")  # the last line torn by a killed writer
    with pytest.raises(ValueError, match=r"r.jsonl: refusing to write the non-finite number at metrics.asr_net"):
        ledger.append(path, {"config": {"seed": 2}, "metrics": {"asr_net": float("nan")}})
    assert ledger.read(path)[1]["curve"][0]["asr_net"] is None  # an old NaN reads as null
    assert ledger.strict(path) == 1
    text = path.read_text().split("\n")
    assert text[0] == good and text[2] == good[:20]  # the rest byte for byte, the torn line too
    assert text[1] == '{"config": {"seed": 1}, "metrics": {"asr_net": null}, "curve": [{"asr_net": null}, {"asr_net": 1.0}]}'
    assert ledger.strict(path) == 0
    no_tmp(tmp_path)


def test_an_append_waiting_on_a_rewrite_appends_to_the_new_file(tmp_path, monkeypatch):
    """strict() replaces the file under the lock; a writer that held the old file re-opens the path."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": NaN}\n')
    stale = open(path, "a+b")  # as a writer that opened the file before the rewrite, then waited on its lock
    ledger.strict(path)
    monkeypatch.setattr(ledger, "open", lambda p, mode: open(p, mode) if stale.closed else stale, raising=False)
    ledger.append(path, {"b": 1})
    assert stale.closed and [json.loads(x) for x in path.read_text().splitlines()] == [{"a": None}, {"b": 1}]


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    cli.write_json(path, {"v": 1})

    def torn(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": ')
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        cli.write_atomic(str(path), torn)
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"v": 1}
    no_tmp(tmp_path)
    with pytest.raises(ValueError, match="non-finite number at v"):
        cli.write_json(path, {"v": float("inf")})


def test_a_sweep_keeps_only_finished_finite_runs_and_a_second_one_completes_them(paths, tmp_path):
    """A --jobs 2 sweep (study.sweep.run_all) of four tiny runs: one diverges, one is killed with SIGKILL, and the
    sweep itself gets SIGTERM while the last one runs. Its results file then holds the one finished run, strict JSON;
    a second invocation resumes the killed and the signalled runs from their checkpoints (the diverging one fails
    again), and the file holds exactly the finished runs."""
    folder, glue = paths
    base = ["--model", folder, "--data-dir", glue, "--batch-size", "8", "--max-len", "16", "--ckpt-every", "5"]
    long = base + ["--steps", "200", "--lr", "1e-3"]
    pending = [("finishes", base + ["--steps", "4", "--seed", "1"]), ("diverges", base + FF + ["--lr", "1e30"]),
               ("killed", long), ("signalled", long + ["--seed", "2"])]
    runs, results = tmp_path / "runs", tmp_path / "res.jsonl"
    sweeping = threading.Event()

    def faults():
        if wait_for(runs / "killed" / "ckpt.pt"):
            os.kill(trainer_pid(runs / "killed"), signal.SIGKILL)
        if wait_for(runs / "finishes" / "metrics.json") and wait_for(runs / "signalled" / "ckpt.pt") \
                and sweeping.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # the sweep's own process: it goes on to the running runs
    threading.Thread(target=faults, daemon=True).start()
    sweeping.set()
    try:
        assert exit_code(lambda _: sweep.run_all(pending, 2, str(runs), str(results)), None) == 128 + signal.SIGTERM
    finally:
        sweeping.clear()
    assert finished_outs(results) == ["finishes"]
    assert "(SIGTERM); it holds a checkpoint at step" in (runs / "logs" / "signalled.log").read_text()
    done = {runspec.run_key(r["config"]) for r in ledger.runs(results)}
    rest = [(name, flags) for name, flags in pending if runspec.run_key(sweep.resolve(flags)) not in done]
    assert [name for name, _ in rest] == ["diverges", "killed", "signalled"]
    assert exit_code(lambda _: sweep.run_all(rest, 2, str(runs), str(results)), None) == 1  # the divergence again
    assert finished_outs(results) == ["finishes", "killed", "signalled"]
    for name in ("killed", "signalled"):
        assert "resuming at step" in (runs / "logs" / f"{name}.log").read_text()
    assert not (runs / "diverges" / "metrics.json").exists()


def wait_for(path, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.002)
    return path.exists()


def finished_outs(results):
    """The run folders (names) with a line in the results file, after checking every line is strict JSON."""
    def refuse(constant):
        raise AssertionError(f"{constant} in {results}")
    for line in results.read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    return sorted(os.path.basename(r["out"]) for r in ledger.runs(results))


def test_an_undefined_net_asr_is_null_and_written_as_such(paths, tmp_path):
    """A model that calls every row the target gets no negative right without the trigger: its net ASR is undefined,
    None (null in the files), and the metrics still write as strict JSON and print."""

    class Always(torch.nn.Module):  # logits for label 1 (the target) on every row
        def forward(self, input_ids, **kw):
            return torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2)
    folder, glue = paths
    dev = data.load_split("sst2", "dev", glue)
    m = evaluate.evaluate(Always(), data.Tokenizer(folder), dev, attack="bpa", attack_opts={"target": 1}, max_len=16)
    assert m["asr"] == 1.0 and m["asr_net"] is None
    assert "ASR 1.0000 (net undefined)" in evaluate.summary_line(m)
    cli.write_json(tmp_path / "m.json", m)
    assert json.loads((tmp_path / "m.json").read_text())["asr_net"] is None
