"""
Benchmark (not a test): time and memory of the Fisher spectrum (ntk.fisher_spectrum) on the MiniLM checkpoint.

  1. LoRA on every linear layer (rank 8), LoRA parameters + head, `--samples` random sequences of `--seq-len`
     tokens: vmap route vs a naive per-sample torch.autograd.grad loop (same Gram, same eigensolver).
  2. Full fine-tuning (every parameter) on as many samples as fit in `--ff-budget-gb` with one parameter chunk.

    python -m bench.fisher                      # defaults: 256 x 64 tokens, r = 8, FF budget 8 GB
    python -m bench.fisher --samples 32 --ff-budget-gb 2    # quick look

Peak memory is the process's resident-set high-water mark (VmHWM), reset before each phase. On a shared machine
wall times vary with the other jobs (the load average is printed alongside), and `--threads 1` avoids the
thread-synchronisation stalls that two threads suffer when another job holds a core.
"""
import os
import time

import torch
import torch.nn.functional as F

import cli
import ntk
from data import Tokenizer
from lora import apply_lora
from model import default_model_dir, from_pretrained
import runspec


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_gb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def timed(fn):
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, peak_gb()


def loop_spectrum(model, batch, labels, params):
    """The naive oracle: one forward/backward per sample, then the same Gram and eigensolver."""
    named = dict(model.named_parameters())
    ps = [named[n] for n in params]
    model.eval()
    rows = []
    for i in range(len(labels)):
        x = {k: v[i:i + 1] for k, v in batch.items()}
        loss = F.cross_entropy(model(**x), labels[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
    g = torch.stack(rows)
    G = g @ g.T / len(rows)
    return torch.linalg.eigvalsh(G.double()).flip(0).clamp_min(0).to(G.dtype)


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default=None, help="HF BERT or MPNet folder (default: the embedded MiniLM-L6-H384)")
    p.add_argument("--samples", type=int, default=256, help="samples for the LoRA spectrum")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sample")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="all", help="LoRA targets preset (qv, attn, all)")
    p.add_argument("--sample-chunk", type=int, default=16, help="samples per vmap call")
    p.add_argument("--ff-budget-gb", type=float, default=8.0, help="memory budget that sizes the FF sample count")
    p.add_argument("--ff-samples", type=int, default=None, help="override the FF sample count")
    p.add_argument("--ff-sample-chunk", type=int, default=4, help="samples per vmap call for FF (91 MB each)")
    p.add_argument("--skip-loop", action="store_true", help="skip the naive-loop comparison")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model is not None:
        with cli.usage_errors():
            runspec.check_model_folder(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = from_pretrained(args.model or default_model_dir()).eval()
    counts = apply_lora(model, args.rank, targets=args.targets, generator=args.seed)
    cfg = model.cfg
    n = args.samples
    ids = torch.randint(1000, cfg.vocab_size, (n, args.seq_len))
    ids[:, 0] = Tokenizer(args.model or default_model_dir()).cls_id  # [CLS] (MPNet: <s>)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    labels = torch.randint(0, cfg.num_labels, (n,))
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (shared machine: times vary); "
          f"LoRA r={args.rank} on '{args.targets}': {counts['trainable']:,} trainable of {counts['total']:,}")

    lora = ntk.params_for(model, "lora")
    warm = {k: v[:2] for k, v in batch.items()}  # first calls pay one-off costs (kernel selection, caches)
    ntk.fisher_spectrum(model, warm, labels[:2], lora)
    if not args.skip_loop:
        loop_spectrum(model, warm, labels[:2], lora)
    eigs, t_vmap, mem = timed(lambda: ntk.fisher_spectrum(model, batch, labels, lora, sample_chunk=args.sample_chunk))
    print(f"LoRA Fisher spectrum, {n} x {args.seq_len} tokens, vmap route: {t_vmap:.1f} s, peak RSS {mem:.2f} GB; "
          f"IB = {ntk.information_bits(eigs):.1f} nats, H_1 = {ntk.renyi_entropy(eigs, 1):.3f}, "
          f"lambda_max = {eigs[0]:.3g}")
    if not args.skip_loop:
        ref, t_loop, mem = timed(lambda: loop_spectrum(model, batch, labels, lora))
        err = ((eigs - ref).abs().max() / ref[0]).item()
        print(f"  naive per-sample loop: {t_loop:.1f} s, peak RSS {mem:.2f} GB; vmap/loop speed ratio "
              f"{t_loop / t_vmap:.2f}x; spectra agree to {err:.1e} (relative to lambda_max)")
        print(f"  load average now {os.getloadavg()[0]:.2f}")

    ff = ntk.params_for(model, "ff")
    P = sum(t.numel() for t in ff.values())
    row = P * 4
    budget = int(args.ff_budget_gb * 2**30)
    # the (N, P) gradient buffer, plus one vmap chunk's gradients twice over (dict + flattened copy), plus ~1 GB
    # for the model and activations
    n_ff = args.ff_samples or max(1, min(n, (budget - 2 * args.ff_sample_chunk * row - 2**30) // row))
    eigs, t_ff, mem = timed(lambda: ntk.fisher_spectrum(model, {k: v[:n_ff] for k, v in batch.items()},
                                                         labels[:n_ff], ff, sample_chunk=args.ff_sample_chunk,
                                                         max_bytes=budget))
    print(f"FF Fisher spectrum ({P:,} parameters), {n_ff} samples (fit in {args.ff_budget_gb:g} GB with one "
          f"parameter chunk): {t_ff:.1f} s, peak RSS {mem:.2f} GB; IB = {ntk.information_bits(eigs):.1f} nats, "
          f"H_1 = {ntk.renyi_entropy(eigs, 1):.3f}")


if __name__ == "__main__":
    main()
