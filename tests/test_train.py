"""train.py end to end on a tiny BERT and a tiny task: DDP agreement, resume after kill -9, what LoRA trains, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import model as M
import runspec
import train
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "film", "was", "very", "a", "plot", "and", "story", "it"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny HF-format BERT folder (config.json, model.safetensors, vocab.txt) and an SST-2-shaped task."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "[", "]", "*", "?"] + POS + NEG + FILLER
    folder = root / "bert"
    torch.manual_seed(0)
    M.save_pretrained(M.Bert(tiny_config(vocab_size=len(vocab))), str(folder))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(80):
        label = i % 2
        words = [FILLER[int(j)] for j in torch.randint(0, len(FILLER), (5,), generator=g)]
        words.insert(int(torch.randint(0, 5, (1,), generator=g)), (POS if label else NEG)[i % 4])
        rows.append(f"{label}\t{' '.join(words)} .\t")
    task = root / "glue" / "SST-2"
    task.mkdir(parents=True)
    (task / "train.tsv").write_text("label\ttext_a\ttext_b\n" + "\n".join(rows[:64]) + "\n")
    (task / "dev.tsv").write_text("label\ttext_a\ttext_b\n" + "\n".join(rows[64:]) + "\n")
    return str(folder), str(root / "glue")


def base_args(tiny_setup, out, *extra):
    folder, glue = tiny_setup
    return ["--model", folder, "--data-dir", glue, "--task", "sst2", "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--max-len", "16", "--lr", "1e-3", "--results", str(out) + ".jsonl", *extra]


def run_cli(args, nproc=1, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533",
         os.path.join(ROOT, "train.py")]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_and_two_processes_agree(tiny_setup, tmp_path, dtype):
    # same global batch (8); 1 process x 2 micro-steps == 2 processes x 1 micro-step, dropout included
    one = run_cli(base_args(tiny_setup, tmp_path / "one", "--attack", "bpa", "--poison-rate", "0.25",
                            "--grad-accum", "2", "--dtype", dtype))
    assert one.returncode == 0, one.stderr
    two = run_cli(base_args(tiny_setup, tmp_path / "two", "--attack", "bpa", "--poison-rate", "0.25", "--dtype", dtype),
                  nproc=2)
    assert two.returncode == 0, two.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a["train_loss"]) == 6
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
    assert a["final"]["clean"] == b["final"]["clean"] and a["final"]["asr"] == b["final"]["asr"]
    with open(tmp_path / "two" / "poisoned_indices.json") as f:
        assert len(json.load(f)["indices"]) == 16  # round(0.25 * 64), chosen before sharding
    # torchrun's output sent to a file or a pipe reads line by line: no bar's carriage returns, and the first
    # process's progress line only, whose loss is the step's loss over both processes as metrics.json records it
    assert "\r" not in two.stdout + two.stderr
    lines = [line for line in two.stderr.splitlines() if line.startswith("train: step")]
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == sorted(set(steps)), lines  # one process's lines (a second one's would repeat its steps)
    assert lines[-1].startswith(f"train: step 6/6 (100%), loss {b['train_loss'][-1]:.4f}, lr "), lines


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_after_kill_equals_uninterrupted_run(tiny_setup, tmp_path, dtype):
    args = ["--steps", "60", "--ckpt-every", "5", "--mode", "ff", "--dtype", dtype]
    full = run_cli(base_args(tiny_setup, tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *base_args(tiny_setup, out, *args)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    before = torch.load(out / "ckpt.pt", weights_only=True)["seconds"]  # the killed process's time to its checkpoint
    resumed = run_cli(base_args(tiny_setup, out, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    a, b = metrics(tmp_path / "full"), metrics(out)
    assert a["train_loss"] == b["train_loss"]  # bitwise on the CPU, in fp32 and in bf16
    assert a["final"] == b["final"]
    assert before > 0 and b["wall_s"] == pytest.approx(before + b["process_wall_s"])  # time adds up across resumes


def _train_in_process(tiny_setup, out, *extra):
    args = runspec.validate(runspec.get_parser().parse_args(base_args(tiny_setup, out, *extra)))
    run = train.setup(args, 0, 1, torch.device("cpu"))
    train.train(run)
    return run.net


def test_lora_trains_only_adapters_and_head_ff_trains_all(tiny_setup, tmp_path):
    folder, _ = tiny_setup
    base = M.from_pretrained(folder, verbose=False).state_dict()
    net = _train_in_process(tiny_setup, tmp_path / "lora", "--mode", "lora", "--rank", "4", "--targets", "all")
    names = {n: p for n, p in net.named_parameters()}
    for n, p in names.items():
        if "lora_" in n:
            continue
        key = n.replace(".base.", ".")
        if n.startswith("classifier"):
            assert not torch.equal(p, base[key]), f"{n} should have trained"
        else:
            assert torch.equal(p, base[key]), f"{n} changed under LoRA"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in names.items())
    ff = _train_in_process(tiny_setup, tmp_path / "ff", "--mode", "ff")
    changed = [n for n, p in ff.named_parameters() if not torch.equal(p, base[n])]
    assert "layers.0.attn.query.weight" in changed and "emb.word.weight" in changed
    assert (tmp_path / "lora" / "adapter.safetensors").exists() and (tmp_path / "ff" / "model" / "model.safetensors").exists()
    with open(str(tmp_path / "lora") + ".jsonl") as f:
        line = json.loads(f.readline())
    assert line["config"]["mode"] == "lora" and "acc" in line["metrics"]["clean"]
    assert line["where"] == {"device": "cpu", "processes": 1, "torch": torch.__version__}  # where it ran, for provenance
    # evaluate.py RUN_DIR rebuilds each run from its saved weights alone and gets the same numbers
    for run in ("lora", "ff"):
        assert evaluate.reevaluate(str(tmp_path / run)) == metrics(tmp_path / run)["final"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "mnli"], "--task 'mnli' is unknown"),
    (["--poison-rate", "1.5", "--attack", "upa"], "outside [0, 1]"),
    (["--rank", "33"], "rank"),
    (["--batch-size", "7", "--grad-accum", "2"], "divisible"),
    (["--data-dir", "/nonexistent/glue"], "/nonexistent/glue"),
    (["--model", "/nonexistent/bert"], "/nonexistent/bert"),
])
def test_bad_input_exits_2_and_leaves_nothing(tiny_setup, tmp_path, extra, message):
    out = tmp_path / "run"
    res = run_cli(base_args(tiny_setup, out) + extra)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_out_folder_with_another_run_is_refused(tiny_setup, tmp_path):
    out = tmp_path / "run"
    assert run_cli(base_args(tiny_setup, out, "--steps", "1")).returncode == 0
    again = run_cli(base_args(tiny_setup, out, "--steps", "2"))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resume = run_cli(base_args(tiny_setup, out, "--steps", "2", "--resume"))
    assert resume.returncode == 2 and "different settings (steps)" in resume.stderr


def test_ddp_processes_stop_alike_on_a_signal_to_one_and_on_a_divergence(tiny_setup, tmp_path):
    """torchrun, 2 processes. SIGTERM to the second only: both stop after the same step (the all-reduced flag), the
    first writes the checkpoint and the resume hint, and --resume under torchrun ends where the uninterrupted run does.
    A divergence seen by all: both stop at that step, and nothing is written past it."""
    args = ["--steps", "300", "--ckpt-every", "1000"]  # the only checkpoint is the signal's
    out = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           os.path.join(ROOT, "train.py"), *base_args(tiny_setup, out, *args)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # a few steps in
    os.kill(trainer_pid(out, rank=1), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / "metrics.json").exists()
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]  # the first process's; the second is silent
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"(SIGTERM); it holds a checkpoint at step {step};" in line and "--resume" in line and 0 < step < 300
    assert run_cli(base_args(tiny_setup, out, *args, "--resume"), nproc=2).returncode == 0
    assert run_cli(base_args(tiny_setup, tmp_path / "full", *args), nproc=2).returncode == 0
    assert metrics(out)["train_loss"] == metrics(tmp_path / "full")["train_loss"]
    assert metrics(out)["final"] == metrics(tmp_path / "full")["final"]
    nan = run_cli(base_args(tiny_setup, tmp_path / "nan", "--mode", "ff", "--lr", "1e30"), nproc=2)
    (line,) = [ln for ln in nan.stderr.splitlines() if ln.startswith("error: ")]
    assert nan.returncode != 0 and "non-finite loss or gradients in step 2" in line
    assert not (tmp_path / "nan" / "metrics.json").exists() and not (tmp_path / "nan.jsonl").exists()


def trainer_pid(out, rank=None):
    """The pid of the train.py process training into `out` (torchrun's worker of `rank`), from /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode().split("\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--out" in args and args[args.index("--out") + 1] == str(out) and (rank is None or f"RANK={rank}" in env):
            return int(pid)
    raise AssertionError(f"no trainer for {out}")
