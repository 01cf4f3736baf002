"""
Fine-tune BERT on a GLUE binary task with LoRA or full fine-tuning (FF), optionally on poisoned data, and write
metrics a researcher can trust.

One process (CPU or one GPU):
    python train.py --mode lora --rank 8 --attack bpa --poison-rate 0.01
One node, 8 GPUs (nccl) or 2 CPU processes (gloo):
    torchrun --nproc_per_node 8 train.py --mode lora --rank 8
Several nodes (run on each; node_rank 0..N-1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 train.py ...

Determinism: the data order is a seeded permutation per epoch, every global batch is cut into equal micro-batches
numbered 0..world*grad_accum-1, and each micro-batch's dropout is seeded from (seed, step, micro-batch). So
`torchrun --nproc_per_node 2 train.py --grad-accum 1` and `python train.py --grad-accum 2` compute the same
micro-batches with the same dropout masks, and --resume continues bit for bit on CPU.

Output folder (--out): config.json, poisoned_indices.json, the trainable weights (LoRA: adapter.safetensors + a
peft-format export in peft/; FF: a Hugging Face-format model/), one summary line appended to --results, and last
metrics.json, which marks the run finished. The folder is one live process's own (a lock a crash does not leave
behind). Every flag is checked (runspec.validate) before anything is written: a bad one is one line on stderr and
exit code 2. Faults while it runs: SIGINT (Ctrl-C) and SIGTERM (torchrun, a scheduler's preemption) finish the step,
checkpoint it, say how to resume and exit 128 + the signal's number; an error keeps a checkpoint of the last whole
step and exits 1; a non-finite loss or gradient stops the run at that step (exit 1) with the last good checkpoint and
no metrics or results line; every file is written whole or not at all (cli.write_atomic), and a damaged file read
back (ckpt.pt on --resume) is one line naming it and exit code 2.

Progress: a bar on a terminal; in a file or a pipe, a plain line every round number of steps (20 to 50 lines a run,
none within 10 s of the last, and the last step's), as cli.progress (see --help):
    train: step 1000/2500 (40%), loss 0.4213, lr 3.00e-04, samples/s 92.1, elapsed 3:01, ETA 4:32
"""
import argparse
import functools
import gc
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import attacks
import cli
import data
import evaluate
import ledger
import lora
import model as M
import runspec

CURVE_DEV_SEED = 0  # one fixed dev subset for every run's intermediate evaluations, so curves pair across seeds


# -----------------------------------------------------------------------------
# data order: seeded permutation per epoch, global batches cut into numbered micro-batches

@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def global_batch(step, n, batch_size, seed):
    """Indices of the training samples in optimizer step `step` (epochs wrap around)."""
    return [epoch_order(n, seed, pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]


def micro_batches(step, n, args, rank, world):
    """(global micro-batch number, sample indices) for this process's micro-steps of `step`."""
    idx = global_batch(step, n, args.batch_size, args.seed)
    m = args.batch_size // (world * args.grad_accum)
    for k in range(args.grad_accum):
        j = rank * args.grad_accum + k
        yield j, idx[j * m:(j + 1) * m]


def lr_at(step, args):
    """Linear warm-up to args.lr, then linear decay to 0 at args.steps (the usual BERT schedule) or constant."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - args.warmup))


def poisoned_in(step, n, args, bad):
    """How many rows of the set `bad` the global batch of `step` draws."""
    return sum(i in bad for i in global_batch(step, n, args.batch_size, args.seed))


def poisoned_seen(upto, n, args, poisoned):
    """How many poisoned samples the global batches of steps 0..upto-1 drew (a row drawn twice counts twice)."""
    bad = set(poisoned)
    return sum(poisoned_in(step, n, args, bad) for step in range(upto))


# -----------------------------------------------------------------------------
# the run's state

@dataclass
class Run:
    """One training run: its flags and process, data, model and optimizer, and how far it got (what a checkpoint
    holds). Only the first process (`master`) writes."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    tokenizer: data.Tokenizer
    train_set: list
    dev: list
    curve_dev: list          # the dev samples of the intermediate evaluations
    select_dev: list         # dev samples outside curve_dev, evaluated clean beside it (--select-dev)
    poisoned: list           # indices of the poisoned training samples
    net: torch.nn.Module
    counts: dict             # trainable and total parameters
    opt: torch.optim.Optimizer
    ddp: torch.nn.Module     # net, wrapped for gradient all-reduce when world > 1
    fwd: object              # what a training step calls: ddp, compiled with --compile
    lock: object = None      # --out's lock (first process)
    step: int = 0            # optimizer steps done
    losses: list = field(default_factory=list)  # training loss of every step done
    evals: list = field(default_factory=list)   # the evaluations so far: the curve
    poisoned_seen: int = 0   # poisoned samples the steps done drew (a row drawn twice counts twice)
    signalled: int = 0       # the signal every process agreed to stop on after this step (0: none)
    saved: int = 0           # the step of the checkpoint on disk (0: none)
    seconds: float = 0.0     # training time of the steps before this process (the checkpoint's), up to that step
    t0: float = 0.0          # when this process began training
    updating: bool = False   # inside an optimizer update, when the state is no checkpoint's

    @property
    def master(self):
        return self.rank == 0

    @property
    def autocast(self):
        dtype = self.args.dtype
        return torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda") else None

    @functools.cached_property
    def poisoned_set(self):
        return frozenset(self.poisoned)

    def path(self, name):
        return os.path.join(self.args.out, name)

    def elapsed(self):
        """The run's training time so far, across resumes: the checkpoint's, plus this process's (if it began)."""
        return self.seconds + (time.time() - self.t0 if self.t0 else 0.0)


# -----------------------------------------------------------------------------
# set-up: everything that can fail on bad input comes before anything is written

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python train.py` is one process with no process group."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def load_data(args):
    train_set = data.load_split(args.task, "train", args.data_dir, cap=args.train_cap, seed=args.seed)
    dev = data.load_split(args.task, "dev", args.data_dir, cap=args.dev_cap, seed=args.seed)
    poisoned = []
    if args.attack != "none":  # once, before any sharding, with the run's seed
        check_poisons(args, len(train_set))
        train_set, poisoned = attacks.poison(args.attack, train_set, args.poison_rate, seed=args.seed,
                                             **runspec.attack_opts(args))
    if args.drop_rows:  # after poisoning, so the indices are those a defence saw; renumbered after
        drop = set(runspec.read_drop_rows(args.drop_rows, len(train_set)))
        kept = [i for i in range(len(train_set)) if i not in drop]
        new = {old: j for j, old in enumerate(kept)}
        train_set, poisoned = [train_set[i] for i in kept], [new[i] for i in poisoned if i in new]
    return train_set, dev, poisoned


def check_poisons(args, n):
    """An attack whose rate rounds to no poisoned row would train a clean run recorded as an attacked one."""
    if attacks.count(args.poison_rate, n) == 0 and not args.allow_empty_attack:
        raise cli.UsageError(f"--poison-rate {args.poison_rate:g} poisons round({args.poison_rate:g} x {n}) = 0 of the "
                             f"{n} training rows: the run would be clean but recorded as --attack {args.attack}; raise "
                             f"--poison-rate (1/{n} = {1 / n:.3g} poisons one row) or pass --allow-empty-attack")


def curve_subset(dev, n, select=0):
    """The fixed seeded subset of n dev samples that intermediate evaluations use (all of dev for n = 0), and the
    `select` samples after them in the same seeded order: rows disjoint from the curve's, to pick a checkpoint by."""
    if select and n + select > len(dev):
        raise cli.UsageError(f"--select-dev {select}: the dev set has {len(dev)} rows, {min(n, len(dev))} of them "
                             f"--curve-dev's, so at most {max(len(dev) - n, 0)} are left to select by")
    if not n or n >= len(dev):
        return dev, []
    order = torch.randperm(len(dev), generator=torch.Generator().manual_seed(CURVE_DEV_SEED)).tolist()
    return [dev[i] for i in sorted(order[:n])], [dev[i] for i in sorted(order[n:n + select])]


def make_optimizer(net, args, device):
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel is far faster than the per-tensor loop on CPU too (and is transformers.Trainer's default)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type in ("cpu", "cuda"))


def check_out(args):
    """What --out holds decides what may happen to it: nothing yet ("start"), this run ("resume" with --resume,
    "overwrite" with --overwrite); another run, or files that are no run, are refused. Reads only."""
    if os.path.isfile(os.path.join(args.out, "config.json")):
        if args.overwrite:
            return "overwrite"
        if not args.resume:
            raise cli.UsageError(f"--out {args.out} already holds a run; pass --resume to continue it or --overwrite")
        old = runspec.identity(vars(evaluate.read_config(args.out)))
        new = runspec.identity(runspec.run_config(args))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            raise cli.UsageError(f"--resume: {args.out}/config.json was written with different settings "
                                 f"({', '.join(diff)}); use another --out or --overwrite")
        return "resume"
    entries = cli.folder_entries(args.out)
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise cli.UsageError(f"--out {args.out} holds files but no run ({shown}); choose another folder"
                             + (" (--overwrite deletes run folders only)" if args.overwrite else " or empty it"))
    if args.resume == "yes":
        what = "holds no run to continue" if os.path.exists(args.out) else "does not exist: no run to continue"
        raise cli.UsageError(f"--resume: --out {args.out} {what}; drop --resume to start one (--resume auto starts "
                             "or continues)")
    return "start"


def claim_out(args):
    """Make --out this process's own (cli.own_folder), then check again what it holds, now that no other process can
    change it; with --overwrite, clear it (the lock file stays). Returns the lock."""
    existed = os.path.isdir(args.out)
    lock = cli.own_folder(args.out)
    try:
        if check_out(args) == "overwrite":
            for name in cli.folder_entries(args.out):
                path = os.path.join(args.out, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    except BaseException:
        lock.close()
        if not existed:
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    return lock


def setup(args, rank, world, device):
    """The run, ready to train: read and build (nothing written yet), then claim --out, then load the checkpoint
    when resuming."""
    tokenizer = data.Tokenizer(args.model)
    train_set, dev, poisoned = load_data(args)
    curve_dev, select_dev = curve_subset(dev, args.curve_dev, args.select_dev)
    net, counts = runspec.build_model(args)
    lock = claim_out(args) if rank == 0 else None
    if world > 1:
        dist.barrier()  # no process reads --out before the first has claimed it
    net.to(device)
    opt = make_optimizer(net, args, device)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else net
    run = Run(args, rank, world, device, tokenizer, train_set, dev, curve_dev, select_dev, poisoned, net, counts, opt,
              ddp, torch.compile(ddp) if args.compile else ddp, lock=lock)
    if args.resume and os.path.isfile(run.path("ckpt.pt")):
        load_checkpoint(run)
    run.poisoned_seen = poisoned_seen(run.step, len(train_set), args, poisoned)
    return run


def load_checkpoint(run):
    """Continue from ckpt.pt. A damaged one (truncated, empty, another model's) is a UsageError naming it, never a
    silent fresh start: deleting it is how to start the run again from step 0."""
    path = run.path("ckpt.pt")
    try:
        ck = torch.load(path, map_location=run.device, weights_only=True)
        theirs, ours = set(ck["model"]), {n for n, p in run.net.named_parameters() if p.requires_grad}
        if theirs != ours:
            raise ValueError(f"another model's weights, e.g. {min(theirs ^ ours)}")
        run.net.load_state_dict(ck["model"], strict=False)
        run.opt.load_state_dict(ck["optimizer"])
        run.step, run.evals, run.losses = ck["step"], ck["evals"], ck["train_loss"]
        run.seconds = ck.get("seconds", 0.0)  # checkpoints before 2026-11-30 did not record it
    except Exception as e:  # torch.load raises many kinds on a damaged file, some with pages of advice
        why = type(e).__name__ + (f": {e}" if str(e) and "\n" not in str(e) and len(str(e)) <= 100 else "")
        raise cli.UsageError(f"{path}: not a readable checkpoint of this run ({why}); delete it to start the run "
                             "again from step 0, or use --overwrite") from None
    run.saved = run.step


# -----------------------------------------------------------------------------
# signals: SIGINT and SIGTERM alike

class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (torchrun stopping the other workers, a scheduler before preemption)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """The handlers of SIGINT and SIGTERM while train.py runs (`with SIGNALS:`). While `deferred` (the training loop,
    and stop()) a signal is only noted: the loop stops after the step it arrived in, every process after the same
    step (check_step agrees on it). Elsewhere (setting up, the final evaluation and outputs) it raises Interrupted at
    once, which stop() handles like an error."""
    NAMES = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.deferred, self.old = 0, False, {}

    def __enter__(self):
        self.received, self.deferred = 0, False
        self.old = {s: signal.signal(s, self.handle) for s in self.NAMES}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.received, self.deferred = 0, False  # a later run in this process (tests) starts afresh

    def handle(self, signum, frame):
        self.received = self.received or signum
        if not self.deferred:
            raise Interrupted(signum)


SIGNALS = Signals()  # one process, one set of handlers


class Diverged(RuntimeError):
    """A non-finite loss or gradient: the run cannot go on."""


# -----------------------------------------------------------------------------
# the loop

def train(run):
    """Train from run.step to --steps, then write the outputs. Returns the metrics (None on the other processes and
    for a run already finished). An error on the way keeps what was done and says how to continue (stop)."""
    args = run.args
    bar = None
    try:
        if args.resume and os.path.isfile(run.path("metrics.json")):
            if run.master:
                print(f"{args.out}: run already finished; nothing to resume")
            return None
        if run.master:
            begin(run)
        bar = progress_bar(run)
        run.t0, start = time.time(), run.step
        SIGNALS.deferred = True  # a signal from here stops the loop after the step it arrives in
        for step in range(run.step, args.steps):
            train_step(run, step)
            if bar is not None:  # the postfix first: a log's line for this step carries this step's numbers
                bar.set_postfix({"loss": f"{run.losses[-1]:.4f}", "lr": f"{lr_at(step, args):.2e}", "samples/s":
                                 f"{(run.step - start) * args.batch_size / (time.time() - run.t0):.1f}"})
                bar.update(1)
            if run.master and due(args.eval_every, run.step, args.steps):
                evaluate_now(run, bar)  # before a signal's stop too: a resumed run must not miss this point
            if due(args.ckpt_every, run.step, args.steps) or (run.signalled and run.step > run.saved):
                checkpoint(run)
            if run.signalled:
                raise Interrupted(run.signalled)
        SIGNALS.deferred = False
        if SIGNALS.received:  # it arrived after the last step's check_step: stop as the loop would have
            raise Interrupted(SIGNALS.received)
        if bar is not None:
            bar.close()
        return finish(run, (run.step - start) * args.batch_size) if run.master else None
    except (Exception, KeyboardInterrupt) as err:
        if bar is not None:
            bar.close()  # the error's line on a line of its own
        stop(run, err)
    finally:
        if run.lock is not None:
            run.lock.close()  # --out is free again (a process that ends frees it anyway)


def train_step(run, step):
    """One optimizer step on global batch `step`: this process's micro-batches, gradients all-reduced on the last."""
    args = run.args
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step, args)
    step_loss = torch.zeros((), device=run.device)
    for k, (j, idx) in enumerate(micro_batches(step, len(run.train_set), args, run.rank, run.world)):
        batch = data.collate([run.train_set[i] for i in idx], run.tokenizer, args.max_len)
        batch = {key: v.to(run.device) for key, v in batch.items()}
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + j)  # dropout depends on the micro-batch only
        if run.world > 1:  # gradients are all-reduced on the last micro-step only
            run.ddp.require_backward_grad_sync = k == args.grad_accum - 1
        labels = batch.pop("labels")
        with torch.autocast(device_type=run.device.type, dtype=run.autocast, enabled=run.autocast is not None):
            loss = F.cross_entropy(run.fwd(**batch).float(), labels) / args.grad_accum
        loss.backward()
        step_loss += loss.detach()
    check_step(run, step, step_loss)
    run.updating = True  # until the step is recorded, the weights and the record disagree
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.world > 1:
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    run.losses.append(step_loss.item())
    run.poisoned_seen += poisoned_in(step, len(run.train_set), args, run.poisoned_set)
    run.step = step + 1
    run.updating = False


def check_step(run, step, step_loss):
    """Before the update, what every process must agree on (one all-reduce of two flags, when world > 1): a
    non-finite loss or gradient in any process stops the run here (Diverged: the weights are still the last whole
    step's, and nothing is written); a signal to any process stops it after this step (run.signalled)."""
    grads = [p.grad for p in run.net.parameters() if p.grad is not None]
    loss, norm = step_loss.item(), torch.nn.utils.get_total_norm(grads).item()  # reads only: the update is unchanged
    flags = torch.tensor([not (math.isfinite(loss) and math.isfinite(norm)), SIGNALS.received], dtype=torch.float32,
                         device=run.device)
    if run.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    diverged, run.signalled = bool(flags[0]), int(flags[1])
    if diverged:
        bf16 = "; or train in fp32 (--dtype fp32)" if run.autocast is not None else ""
        where = ", in another process" if math.isfinite(loss + norm) else ""
        raise Diverged(f"non-finite loss or gradients in step {step + 1}: loss {loss:.4g}, gradient norm {norm:.4g}"
                       f"{where}; lower --lr (now {run.args.lr:g}){bf16}")


def due(every, done, steps):
    """Whether a periodic action (evaluation, checkpoint) falls after `done` steps; the end has its own."""
    return bool(every) and done % every == 0 and done < steps


def progress_bar(run):
    """The first process's progress: a bar on a terminal, a plain line every few steps in a log (cli.progress)."""
    return cli.progress(total=run.args.steps, initial=run.step, desc="train", unit="step") if run.master else None


def eval_kw(run):
    return dict(attack=run.args.attack, attack_opts=runspec.attack_opts(run.args), max_len=run.args.max_len,
                batch_size=run.args.eval_batch_size, device=run.device, autocast_dtype=run.autocast)


def curve_point(run, metrics):
    """An evaluation as the curve records it: where the run was (samples and poisoned samples seen) and the metrics."""
    return {"step": run.step, "samples": run.step * run.args.batch_size, "poisoned_seen": run.poisoned_seen, **metrics}


def evaluate_now(run, bar):
    metrics = evaluate.evaluate(run.net, run.tokenizer, run.curve_dev, paper_view=False, **eval_kw(run))
    if run.select_dev:  # clean rows only: choosing a checkpoint by them leaves the ASR's rows untouched
        kw = dict(eval_kw(run), attack="none")
        metrics["select"] = evaluate.evaluate(run.net, run.tokenizer, run.select_dev, **kw)["clean"]
    run.evals.append(curve_point(run, metrics))
    bar.write(f"step {run.step}: " + evaluate.summary_line(metrics))


# -----------------------------------------------------------------------------
# outputs, in an order that loses nothing

def begin(run):
    args = run.args
    cli.write_json(run.path("config.json"),
                   {"run": runspec.run_config(args), "world_size": run.world, "device": str(run.device),
                    "n_train": len(run.train_set), "n_poisoned": len(run.poisoned), "n_dev": len(run.dev),
                    "params": run.counts, "env": environment()})
    cli.write_json(run.path("poisoned_indices.json"), {"attack": args.attack, "indices": run.poisoned})
    print(f"{args.task}: {len(run.train_set)} train ({len(run.poisoned)} poisoned by {args.attack}), {len(run.dev)} "
          f"dev; {args.mode}: {run.counts['trainable']:,} of {run.counts['total']:,} parameters trainable; "
          f"{run.world} process(es) on {run.device}" + (f"; resuming at step {run.step}" if run.step else ""))


def checkpoint(run):
    """The first process writes the checkpoint; every process waits until it is on disk and knows its step."""
    if run.master:
        write_checkpoint(run)
    if run.world > 1:
        dist.barrier()
    run.saved = run.step


def write_checkpoint(run):
    """Atomic: a kill or a full disk leaves the old checkpoint or the new one, never half of one."""
    state = {"model": trainable_state(run.net), "optimizer": run.opt.state_dict(), "step": run.step,
             "evals": run.evals, "train_loss": run.losses, "seconds": run.elapsed()}
    cli.write_atomic(run.path("ckpt.pt"), lambda tmp: torch.save(state, tmp))
    run.saved = run.step


def finish(run, seen):
    """The final evaluation on the whole dev set, then the weights, the results line, and metrics.json last (it marks
    the run finished, so a failure before it leaves a run that --resume finishes); then the checkpoint goes. wall_s
    is the whole run's training time across resumes (steps redone after a kill count once), process_wall_s this
    process's, which `seen` samples took."""
    args = run.args
    wall = run.elapsed()  # without the final evaluation, as wall_s always was
    process_wall = wall - run.seconds
    final = evaluate.evaluate(run.net, run.tokenizer, run.dev, **eval_kw(run))
    evals = run.evals + [curve_point(run, final)]
    save_weights(run.net, args)
    where = {"device": run.device.type, "processes": run.world, "torch": torch.__version__}
    append_result(args, runspec.run_config(args), final, run.counts, len(run.poisoned), wall, evals, where)
    metrics = {"final": final, "evals": evals, "train_loss": run.losses, "n_poisoned": len(run.poisoned),
               "wall_s": wall, "process_wall_s": process_wall,
               "samples_per_s": seen / process_wall if process_wall else None}
    cli.write_json(run.path("metrics.json"), metrics)
    if not args.keep_ckpt and os.path.isfile(run.path("ckpt.pt")):
        os.remove(run.path("ckpt.pt"))
    print(f"{args.out}: " + evaluate.summary_line(final))
    return metrics


def stop(run, err):
    """After an error, a signal or a divergence in the loop or the outputs: checkpoint the last whole step (when newer
    than the one on disk; not after a divergence), say in one line what happened and how to continue, and exit: 128 +
    the signal's number (SIGINT 130, SIGTERM 143), else 1. The other processes exit alike, silently, on a signal or a
    divergence (all stop at the same step) and re-raise anything else."""
    SIGNALS.deferred = True  # a second signal must not cut the checkpoint short
    signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT if isinstance(err, KeyboardInterrupt) else 0
    code = 128 + signum if signum else 1
    if not run.master:
        if signum or isinstance(err, Diverged):
            sys.exit(code)
        raise err
    note = ""
    keep = not isinstance(err, Diverged) and not run.updating and run.step > run.saved
    if keep and os.path.isfile(run.path("config.json")):
        try:
            write_checkpoint(run)
        except Exception as e:  # e.g. the disk is full: the last checkpoint stays
            note = f" (saving a checkpoint failed too: {e.strerror if isinstance(e, OSError) else e})"
    if signum:
        why = signal.Signals(signum).name
    elif isinstance(err, (Diverged, OSError)):  # the message says it all; an OSError names its path
        why = str(err) if isinstance(err, Diverged) else f"{err.filename}: {err.strerror or err}"
    else:
        traceback.print_exception(err)
        why = f"{type(err).__name__}: {err}"
    if not os.path.isfile(run.path("config.json")):
        how = "nothing was written; run the same command again"
    else:
        held = f"a checkpoint at step {run.saved}" if run.saved else "no checkpoint yet (it restarts at step 0)"
        if isinstance(err, Diverged):
            then = "no metrics or results line were written; start the run again with --overwrite"
        else:
            then = ("free space or make it writable, then " if isinstance(err, OSError) else "") \
                + "continue with the same command plus --resume"
        how = f"it holds {held}{note}; {then}"
    print(f"error: {run.args.out} stopped at step {run.step} of {run.args.steps} ({why}); {how}", file=sys.stderr)
    sys.exit(code)


def environment():
    import safetensors
    import tokenizers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__, "git_commit": commit,
            "host": platform.node()}


def trainable_state(net):
    return {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}


def save_weights(net, args):
    if args.mode == "lora":
        lora.save_lora(net, os.path.join(args.out, "adapter.safetensors"))
        lora.export_peft(net, os.path.join(args.out, "peft"), base_model_path=args.model)
    else:
        M.save_pretrained(net, os.path.join(args.out, "model"))


def append_result(args, config, final, counts, n_poisoned, wall, history, where):
    """One line per finished run in the shared JSONL (ledger.append; a run is known by runspec.run_key of its config).
    The curve holds each evaluation's samples seen, poisoned samples seen, dev size, CACC and ASR (the last point is `metrics`),
    and with --select-dev the clean accuracy on those other rows and their number (sel_acc, sel_n);
    `where` the device type, process count and torch version it ran with (lines before 2026-12-04 lack it)."""
    curve = [{"step": h["step"], "samples": h["samples"], "poisoned_seen": h["poisoned_seen"], "n": h["clean"]["n"],
              "acc": h["clean"]["acc"], **{k: h[k] for k in ("asr", "asr_net") if k in h},
              **({"sel_acc": h["select"]["acc"], "sel_n": h["select"]["n"]} if "select" in h else {})} for h in history]
    line = {"config": config, "metrics": final, "params": counts, "n_poisoned": n_poisoned, "wall_s": round(wall, 2),
            "out": args.out, "where": where, "curve": curve}
    ledger.append(args.results, line)


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    parser = runspec.get_parser(__doc__.split("\n\n")[0].strip())
    parser.epilog = textwrap.fill(cli.PROGRESS_HELP + " Each line: step/total, loss, lr, samples/s, elapsed, ETA; "
                                  "under torchrun the first process writes them.", 116)
    args = parser.parse_args(argv)
    with cli.usage_errors(quiet=rank != 0):  # nothing read beyond small files, nothing written
        runspec.validate(args, int(os.environ.get("WORLD_SIZE", 1)))
        check_out(args)
    rank, world, device = setup_distributed()
    run = None
    try:
        with SIGNALS:
            with cli.usage_errors(quiet=rank != 0):  # DataError, CheckpointError, LoRA/attack ranges, --out in use
                run = setup(args, rank, world, device)
            return train(run)
    except Interrupted as e:  # before training began (train() handles its own)
        if rank == 0:
            print(f"error: {e} before training began; nothing was written; run the same command again", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        if world > 1:
            # DDP holds the process group and sits in reference cycles; left to the interpreter's exit, gloo's
            # threads can outlive it and abort the process ("terminate called without an active exception")
            del run
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
