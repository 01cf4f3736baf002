"""
Benchmark one full fine-tuning step (forward + backward + AdamW) of our BERT against Hugging Face transformers'
BertForSequenceClassification on the same checkpoint, batch and thread count. The two are timed interleaved in
one run (ABAB...) and the ratio of medians is reported, so machine noise hits both alike. Both use the fused
AdamW kernel (transformers.Trainer's default since torch 2.8, and ours).

Two batches: `dense`, 8 x 64 random tokens with no padding (the pure matmul case), and `sst2`, 8 real SST-2 training
sentences padded to the longest of them (truncated at 64), as training actually sees them.

    python -m bench.step                      # MiniLM default, 8 x 64 tokens, all threads
    python -m bench.step --threads 2 --steps 30 --compile
"""
import statistics
import time

import torch
import torch.nn.functional as F

import cli
import model as M


def make_step(net, forward, lr=3e-6):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, fused=True)  # transformers.Trainer's default since torch 2.8

    def step(batch, labels):
        loss = F.cross_entropy(forward(net, batch), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default=None, help="HF BERT folder (default: the embedded MiniLM)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also torch.compile our model")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or M.default_model_dir()
    torch.manual_seed(0)
    ours = M.from_pretrained(folder, verbose=False).train()
    batches = make_batches(folder, args)

    fwd = torch.compile(M.Bert.forward) if args.compile else M.Bert.forward
    steps = {"ours" + (" (compiled)" if args.compile else ""): make_step(ours, lambda m, b: fwd(m, **b))}
    try:
        import transformers
        theirs = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2).train()
        steps["transformers"] = make_step(theirs, lambda m, b: m(**b).logits)
    except ImportError:
        print("transformers not installed: timing ours only (pip install -r requirements-dev.txt for the ratio)")

    print(f"batch {args.batch}, max {args.seq} tokens, {torch.get_num_threads()} threads, {args.steps} steps each, interleaved")
    for kind, (batch, labels) in batches.items():
        times = {name: [] for name in steps}
        for i in range(args.steps + 3):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(batch, labels)
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
        real = int(batch["attention_mask"].sum())
        print(f"{kind}: {tuple(batch['input_ids'].shape)}, {real} real tokens")
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            print(f"  {name:>20}: median {med[name] * 1e3:7.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
        if "transformers" in med:
            ours_name = next(iter(med))
            print(f"  ratio ours/transformers: {med[ours_name] / med['transformers']:.2f}x")


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


if __name__ == "__main__":
    main()
