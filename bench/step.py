"""
Benchmarks of a training step (forward + backward + AdamW), each a side-by-side comparison timed interleaved in one
run (ABAB...), reported as a ratio of medians so that machine noise hits both sides alike:

    python -m bench.step                      # ours vs Hugging Face transformers' BertForSequenceClassification (FF)
    python -m bench.step --model ~/.cache/lorasec/all-mpnet-base-v2   # ... vs MPNetForSequenceClassification
    python -m bench.step --dtypes --threads 1 # fp32 vs bf16 autocast, FF and LoRA r8, with the GEMM peaks
    python -m bench.step --dtypes --profile   # ... and where a bf16 step's time goes (torch.profiler, top ops)
    python -m bench.step --conv-run 2500      # end to end: train.py's conv-protocol run, fp32 vs bf16, samples/s
    python -m bench.step --versus ~/.cache/lorasec/all-mpnet-base-v2 --threads 1  # another model's FF and LoRA r8
                                              # steps against --model's (the cost of a protocol on it)

Two batches: `dense`, random tokens with no padding (the pure matmul case), and `sst2`, real SST-2 training
sentences padded to the longest of them (truncated at --seq), as training actually sees them. Both sides use the
fused AdamW kernel (transformers.Trainer's default since torch 2.8, and ours). bf16 is train.py's `--dtype bf16`:
autocast over the forward, fp32 master weights, optimizer state and loss.

The fraction of the GEMM peak: the step's matmul FLOPs (torch.utils.flop_counter) over its median time, against
the best of a linear layer's three GEMMs (1024x384 by 1536: forward, grad-input, grad-weight) measured in the same
run. It is a lower bound on the matmuls' own efficiency, since the step's time includes everything around them.
"""
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import cli
import lora
import model as M
import runspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default=None, help="HF BERT or MPNet folder (default: the embedded MiniLM)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also torch.compile our model (ours vs transformers)")
    p.add_argument("--dtypes", action="store_true", help="fp32 vs bf16 for FF and LoRA r8 instead")
    p.add_argument("--profile", action="store_true", help="with --dtypes: profile a bf16 FF and LoRA step")
    p.add_argument("--versus", default=None, metavar="MODEL",
                   help="another BERT or MPNet folder: its FF and LoRA r8 steps against --model's, each model on its "
                        "own tokenization of the batches")
    p.add_argument("--conv-run", type=int, default=None, metavar="STEPS",
                   help="time train.py end to end (conv flags, one thread), fp32 vs bf16, for this many steps")
    args = p.parse_args(argv)
    with cli.usage_errors():
        for flag in ("batch", "seq", "steps", "threads", "conv_run"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise cli.UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        for flag, folder in (("--model", args.model), ("--versus", args.versus)):
            if folder is not None:
                runspec.check_model_folder(folder, flag)
    if args.conv_run:
        return conv_run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with cli.usage_errors():
        folder = args.model or M.default_model_dir()
        runspec.model_limits(folder)  # a wrong --model is one line, before any timing
    batches = make_batches(folder, args)
    print(f"batch {args.batch}, max {args.seq} tokens, {torch.get_num_threads()} threads, {args.steps} steps each, "
          f"interleaved; CPU: {cpu_flags()}")
    if args.dtypes:
        dtypes(folder, batches, args)
    elif args.versus:
        with cli.usage_errors():
            runspec.model_limits(args.versus)
        versus(folder, batches, args.versus, make_batches(args.versus, args), args)
    else:
        ours_vs_transformers(folder, batches, args)


# -----------------------------------------------------------------------------
# the steps being compared

def make_step(net, forward, dtype=None, lr=3e-6):
    """One optimizer step of `net` (its trainable parameters), with train.py's autocast when dtype is bf16."""
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr, fused=True)

    def step(batch, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = forward(net, batch)
        loss = F.cross_entropy(logits.float(), labels)  # the loss in fp32, as train.py computes it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours(folder, mode):
    torch.manual_seed(0)
    net = M.from_pretrained(folder, verbose=False).train()
    if mode == "lora":
        lora.apply_lora(net, rank=8, alpha=16)
    return net


def time_interleaved(steps, batch, labels, n):
    """{name: [seconds per step]} with the steps taken in turn, after 3 untimed warm-up rounds."""
    times = {name: [] for name in steps}
    for i in range(n + 3):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(batch, labels)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return times


def show(times):
    for name, t in times.items():
        print(f"  {name:>22}: median {statistics.median(t) * 1e3:7.1f} ms  (min {min(t) * 1e3:.1f}, "
              f"max {max(t) * 1e3:.1f})")


def ours_vs_transformers(folder, batches, args):
    fwd = torch.compile(M.Encoder.forward) if args.compile else M.Encoder.forward
    net = ours(folder, "ff")
    steps = {"ours" + (" (compiled)" if args.compile else ""): make_step(net, lambda m, b: fwd(m, **b))}
    try:
        import transformers
        theirs = getattr(transformers, net.cfg.hf_class).from_pretrained(folder, num_labels=2).train()
        steps["transformers"] = make_step(theirs, lambda m, b: m(**b).logits)  # (MPNet ignores token_type_ids)
    except ImportError:
        print("transformers not installed: timing ours only (pip install -r requirements-dev.txt for the ratio)")
    for kind, (batch, labels) in batches.items():
        print(f"{kind}: {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} real tokens")
        times = time_interleaved(steps, batch, labels, args.steps)
        show(times)
        if "transformers" in times:
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"  ratio ours/transformers: {med[next(iter(med))] / med['transformers']:.2f}x")


# -----------------------------------------------------------------------------
# one model against another: what a protocol costs on each

def versus(folder, batches, other, other_batches, args):
    """FF and LoRA r8 training steps of two models, interleaved, each on its own tokenization of the same texts (the
    dense batch is the same token ids for both); the ratio of medians other / folder."""
    names = {f: runspec.model_name(f) for f in (folder, other)}
    for kind in [k for k in batches if k in other_batches]:
        for mode in ("ff", "lora"):
            steps = {}
            for f, (batch, labels) in ((folder, batches[kind]), (other, other_batches[kind])):
                step = make_step(ours(f, mode), lambda m, b: m(**b))
                steps[f"{names[f]} {mode}"] = lambda _b, _l, step=step, batch=batch, labels=labels: step(batch, labels)
            print(f"{kind}, {mode}: {names[folder]} {tuple(batches[kind][0]['input_ids'].shape)}, {names[other]} "
                  f"{tuple(other_batches[kind][0]['input_ids'].shape)}")
            times = time_interleaved(steps, None, None, args.steps)
            show(times)
            med = [statistics.median(t) for t in times.values()]
            print(f"  {kind} {mode}: {names[other]} / {names[folder]} = {med[1] / med[0]:.2f}x")


# -----------------------------------------------------------------------------
# fp32 vs bf16

def dtypes(folder, batches, args):
    peak = {dt: gemm_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print("GEMM peak (1024x384 by 1536, best of forward / grad-input / grad-weight): "
          + ", ".join(f"{name(dt)} {v:.0f} GFLOP/s" for dt, v in peak.items())
          + f"; bf16/fp32 {peak[torch.bfloat16] / peak[torch.float32]:.2f}x")
    for kind, (batch, labels) in batches.items():
        print(f"{kind}: {tuple(batch['input_ids'].shape)}, {int(batch['attention_mask'].sum())} real tokens")
        for mode in ("ff", "lora"):
            nets = {dt: ours(folder, mode) for dt in peak}
            flops = matmul_flops(nets[torch.float32], batch, labels)
            steps = {f"{mode} {name(dt)}": make_step(net, lambda m, b: m(**b), dt) for dt, net in nets.items()}
            times = time_interleaved(steps, batch, labels, args.steps)
            show(times)
            med = {dt: statistics.median(times[f"{mode} {name(dt)}"]) for dt in peak}
            n = batch["input_ids"].size(0)
            print(f"  {mode}: fp32 {n / med[torch.float32]:.1f} samples/s, bf16 {n / med[torch.bfloat16]:.1f} "
                  f"samples/s, bf16/fp32 {med[torch.float32] / med[torch.bfloat16]:.2f}x; matmuls at "
                  + ", ".join(f"{name(dt)} {100 * flops / med[dt] / 1e9 / peak[dt]:.0f}%" for dt in peak)
                  + " of that dtype's GEMM peak")
            if args.profile:
                profile(steps[f"{mode} bf16"], batch, labels)


def name(dt):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def gemm_peak(dt, m=1024, k=384, n=1536, reps=20):
    """GFLOP/s of the best of a linear layer's three GEMMs on this machine, in dtype dt."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g).to(dt) for s in ((m, k), (n, k), (m, n)))
    best = 0.0
    for fn in (lambda: F.linear(x, w), lambda: dy @ w, lambda: dy.t() @ x):
        fn(), fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_flops(net, batch, labels):
    """The FLOPs of one step's matmuls (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(**batch), labels).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile(step, batch, labels, n=5):
    """The top operators of n steps by their own CPU time: where the time around the matmuls goes."""
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            step(batch, labels)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


# -----------------------------------------------------------------------------
# end to end: train.py's conv-protocol run

def conv_run(args):
    """train.py with the conv protocol's flags (SST-2, batch 16, max length 64, 8 curve evaluations on 256 dev rows,
    then the whole dev set), one thread, fp32 then bf16 for LoRA r8 and FF; samples/s from the run's own wall time.
    The runs go to a temporary folder; leave the other core idle while they run."""
    import json
    import tempfile
    flags = ["--task", "sst2", "--batch-size", "16", "--max-len", "64", "--schedule", "constant", "--warmup", "100",
             "--steps", str(args.conv_run), "--eval-every", str(max(1, args.conv_run // 8)), "--curve-dev", "256",
             "--ckpt-every", "0"] + (["--model", args.model] if args.model else [])
    modes = {"lora": ["--mode", "lora", "--rank", "8", "--alpha", "16", "--lr", "5e-4"],
             "ff": ["--mode", "ff", "--lr", "2e-5"]}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, mflags in modes.items():
            wall = {}
            for dtype in ("fp32", "bf16"):
                out = os.path.join(tmp, f"{mode}-{dtype}")
                cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, *mflags, "--dtype", dtype, "--out", out,
                       "--results", out + ".jsonl"]
                res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                                     text=True)
                if res.returncode:
                    cli.fail(f"train.py failed ({mode}, {dtype}): {res.stderr.strip().splitlines()[-1]}")
                with open(os.path.join(out, "metrics.json")) as f:
                    wall[dtype] = json.load(f)["wall_s"]
                print(f"{mode} {dtype}: {wall[dtype]:.0f} s, {16 * args.conv_run / wall[dtype]:.1f} samples/s")
            print(f"{mode}: bf16 takes {wall['bf16'] / wall['fp32']:.2f} of fp32's wall time")


def make_batches(folder, args):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    dense = dict(input_ids=torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
                 attention_mask=torch.ones(args.batch, args.seq, dtype=torch.long),
                 token_type_ids=torch.zeros(args.batch, args.seq, dtype=torch.long))
    out = {"dense": (dense, labels)}
    try:
        import data
        train = data.load_split("sst2", "train", cap=args.batch, seed=0)
        batch = data.collate(train, data.Tokenizer(folder), args.seq)
        out["sst2"] = (batch, batch.pop("labels"))
    except (ValueError, FileNotFoundError) as e:
        print(f"no SST-2 batch ({e})")
    return out


def cpu_flags():
    """The bf16 matrix features this CPU reports (AMX tiles are what make bf16 GEMMs several times faster)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "unknown"
    have = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f in flags]
    return ", ".join(have) if have else "no bf16 matrix features"


if __name__ == "__main__":
    main()
