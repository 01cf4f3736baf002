"""
Theorem 3.6 and the LoRA inits seen through the empirical NTK and Fisher of the real model (MiniLM-L6-H384 on SST-2
train sentences by default), at initialisation and after clean training.

    python -m study.ntk_study thm36 --out results/theory   # Thm 3.6: FF vs LoRA over rank x k x alpha, 3 draws -> thm36.md
    python -m study.ntk_study inits --out results/theory   # every init in lora.INITS at rank 8 (q, v) -> inits.md
    python -m study.ntk_study runs runs --out results/theory   # trained clean runs found under runs/ -> runs.md

Cost on one CPU thread (MiniLM, N = 64, max length 64): FF's kernels about 70 s a draw at a 7.6 GB peak (the word
embeddings' Jacobian), cached in <out>/cache/ and shared by thm36 and inits; then 3-9 s a LoRA model: thm36 about
8 minutes for its 3 x 32 models, inits about 1.5 minutes; runs about 70 s per FF run and 4 s per LoRA run a draw,
each cached in <out>/cache/ by the run's config and weights, so that adding run folders measures only the new ones.

What is measured, on N sentences (one draw per seed: the samples, the head init and the A draws):

    K_g(x, x') = J_g(x) J_g(x')^T     logit NTK (Eq. 6) w.r.t. one parameter group g, (N, N, C, C) (ntk.empirical_ntk)
    G_ij = (1/N) e_i^T K_ij e_j       the Fisher Gram (Eq. 8, 19): e_i = softmax(f(x_i)) - onehot(y_i) = dCE/dlogits,
                                      so g_i = J_i^T e_i; its eigenvalues are the non-zero ones of the P x P Fisher
    IB, H_alpha                       ntk.information_bits (Eq. 9) and ntk.renyi_entropy (Eq. 10, normalised), alpha
                                      in 0.5, 1, 2, on the <= N eigenvalues above ntk's tolerance

Disjoint parameter groups add: K_FF = K_head + K_target + K_rest (target = the W of the layers LoRA adapts). Each
Theorem 3.6 comparison is run on three parameter sets, FF's against LoRA's:

    trained   all parameters          vs  LoRA's trainable ones (A, B and the classifier head)
    adapted   all but the head        vs  A and B (the adapted parameters: the honest comparison)
    layers    W of the q, v layers    vs  A and B (Thm 3.3's per-layer kernels, Eq. 15)

("A and B": whatever the init trains in the adapted layers: MiCA trains A only, DoRA adds its magnitude vector.)

At initialisation B = 0, so dF/dA = s B^T(...) = 0 exactly: A carries no gradient, K_A = 0, and LoRA's kernel is
B's alone, K_B = s^2 sum_tt' (d_t . d'_t') x_t^T A^T A x'_t' (Lemma 3.1 with the scaling s = alpha / r that the
paper drops). A enters only through A^T A, and since A(k) = sqrt(k) A(1) for one seed, K_B scales exactly as
k s^2: H_alpha of the adapted set cannot depend on k or alpha at all, and IB moves by (support / 2) log(k s^2).

NTK distances between LoRA's kernel and FF's (both flattened to NC x NC matrices):

    rel_dist   ||K_L - K_F||_F / ||K_F||_F                (the Cor. 3.5 error; 0 iff equal)
    misalign   1 - <K_L, K_F>_F / (||K_L||_F ||K_F||_F)   (1 - kernel alignment; scale-free. The normalised
               distance || K_L/||K_L|| - K_F/||K_F|| ||_F equals sqrt(2 misalign), so it is not reported twice)
    norm_ratio ||K_L||_F / ||K_F||_F

and the Loewner check of the proof's central step (A.5, Eq. 40: I_LoRA <= I_FF): lambda_max(G_L - G_F) /
lambda_max(G_F), <= 0 iff G_L <= G_F. The paper's Eq. 40-43 then use sums of raw eigenvalues, not IB and H_alpha
as Eq. 9-10 define them; a Loewner order bounds each eigenvalue (Weyl) but implies neither IB_L <= IB_F (a smaller
support drops log-terms of either sign) nor H_L <= H_F (entropy is scale-free), so both are measured, not inferred.
IB is in nats and depends on the parameterisation's scale (B's gradient carries s, W's does not).

`runs` measures each finished clean run (evaluate.load_run) on the same draws and pairs every LoRA run with every
FF run of the same task, seed and max length. After training, samples fit to e_i ~ 0 drop below the tolerance, so
the supports differ; the pair tables also give IB over each one's top-t eigenvalues, t the smaller support.
"""
import argparse
import copy
import csv
import functools
import glob
import hashlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import cli

ALPHAS = (0.5, 1.0, 2.0)
SUMMARIES = ("ib",) + tuple(f"h{a:g}" for a in ALPHAS)
SETS = ("trained", "adapted", "layers")
TARGETS = "qv"  # train.py's default LoRA targets
SAMPLE_CHUNK = 4  # samples per vmap call: the word-embedding Jacobian (N, C, 11.7M) dominates memory
MAX_BYTES = 2 ** 30


# -----------------------------------------------------------------------------
# inputs and models

def load_batch(model_dir, data_dir, n, max_len, seed, task="sst2"):
    """N training sentences drawn with `seed` (data.load_split's seeded subset), tokenized, with their labels."""
    import data
    examples = data.load_split(task, "train", data_dir, cap=n, seed=seed)
    if len(examples) < n:
        raise cli.UsageError(f"{task} train has {len(examples)} rows, fewer than --n {n}")
    return data.collate(examples, data.Tokenizer(model_dir), max_len)


def base_model(model_dir, seed):
    """The pretrained encoder with a fresh 2-label head drawn from `seed`, as runspec.build_model makes it."""
    import model as M
    torch.manual_seed(seed)
    return M.from_pretrained(model_dir, num_labels=2, verbose=False).eval()


def lora_model(base, rank, alpha, init="kaiming_uniform", init_scale=None, seed=0):
    """A LoRA copy of `base` (targets q, v); init_scale=None keeps lora's default for `init`."""
    import lora
    net = copy.deepcopy(base)
    kw = {} if init_scale is None else {"init_scale": init_scale}
    lora.apply_lora(net, rank, alpha=alpha, targets=TARGETS, init=init, generator=seed, **kw)
    return net.eval()


def target_weights(model, targets=TARGETS):
    """The weight names of the nn.Linear modules that lora.apply_lora(targets=...) would adapt (same suffix rule)."""
    import lora
    suffixes = lora.TARGETS[targets]
    return [f"{n}.weight" for n, m in model.named_modules()
            if type(m) is nn.Linear and any(n == s or n.endswith("." + s) for s in suffixes)]


def groups_for(model):
    """Disjoint parameter groups {name: [parameter names]}. A model with LoRA layers: head (classifier) and adapted
    (every other trainable parameter: A, B, and whatever else an init makes trainable). Without: head, target
    (the W that LoRA would adapt) and rest (everything else), which together are all of FF's parameters."""
    import lora
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("classifier.")]
    if lora.lora_layers(model):
        adapted = [n for n, p in model.named_parameters() if p.requires_grad and n not in head]
        return {"head": head, "adapted": adapted}
    target = target_weights(model)
    return {"head": head, "target": target, "rest": [n for n in names if n not in head and n not in target]}


# -----------------------------------------------------------------------------
# kernels, Fisher Grams and their summaries

def residuals(model, batch):
    """e_i = softmax(f(x_i)) - onehot(y_i) = dCE/dlogits (N, C), float64, without dropout."""
    import ntk
    model.eval()
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ntk.MODEL_INPUTS if k in batch})
    return logits.double().softmax(-1) - nn.functional.one_hot(batch["labels"], logits.shape[1]).double()


def measure(model, batch, groups=None, desc=None):
    """{"e": residuals, "K": {group: float64 (N, N, C, C) NTK}} of `model` on `batch` (groups: groups_for(model))."""
    import ntk
    groups = groups or groups_for(model)
    named = dict(model.named_parameters())
    K = {}
    for g, names in cli.progress(groups.items(), desc=desc, unit="group", leave=False, disable=desc is None):
        K[g] = ntk.empirical_ntk(model, batch, params={n: named[n].detach() for n in names},
                                 sample_chunk=SAMPLE_CHUNK, max_bytes=MAX_BYTES).double()
    return {"e": residuals(model, batch), "K": K}


def kernel_sets(m):
    """{set: K} for the three comparison sets (module docstring) from a measurement's group kernels."""
    K = m["K"]
    if "adapted" in K:  # LoRA: A and B live in the target layers, so "layers" is "adapted"
        return {"trained": K["head"] + K["adapted"], "adapted": K["adapted"], "layers": K["adapted"]}
    return {"trained": K["head"] + K["target"] + K["rest"], "adapted": K["target"] + K["rest"], "layers": K["target"]}


def fisher_gram(K, e):
    """G_ij = (1/N) e_i^T K(x_i, x_j) e_j (Eq. 8 via the chain rule g_i = J_i^T e_i)."""
    return torch.einsum("ic,ijcd,jd->ij", e, K, e) / e.shape[0]


def spectrum(G):
    """Eigenvalues of a Gram, descending, clamped at 0, in float32: the kernels come from float32 Jacobians, so
    ntk's default tolerance (lambda_max * N * eps of the dtype) must be float32's, as ntk.fisher_spectrum has it."""
    return torch.linalg.eigvalsh(G).flip(0).clamp_min(0).float()


def summarise(G):
    """IB (Eq. 9), H_alpha (Eq. 10), the support size (eigenvalues above ntk's tolerance), lambda_max and trace;
    ib_f64 / support_f64: the same IB with float64's tolerance, to show how much the cut decides. The Gram is formed
    in float64 and G = D k D with D = diag(e) is graded, so eigenvalues small only because e_i is small (fitted
    samples) are resolved far below float32's cut; ones small because gradients nearly coincide are not."""
    import ntk
    eigs = spectrum(G)
    tol = eigs.max().item() * eigs.numel() * torch.finfo(eigs.dtype).eps  # ntk._support's default, stated
    out = {"ib": ntk.information_bits(eigs, tol), **{f"h{a:g}": ntk.renyi_entropy(eigs, a, tol) for a in ALPHAS}}
    ev = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)
    tol64 = ev[0].item() * ev.numel() * torch.finfo(ev.dtype).eps
    return {**out, "support": int((eigs > tol).sum()), "lambda_max": eigs[0].item(), "trace": G.trace().item(),
            "ib_f64": ntk.information_bits(ev, tol64), "support_f64": int((ev > tol64).sum())}


def distances(K_l, K_f):
    """rel_dist, misalign and norm_ratio of K_l against K_f (module docstring), on the NC x NC flattening."""
    l, f = K_l.reshape(-1), K_f.reshape(-1)
    nl, nf = l.norm().item(), f.norm().item()
    return {"rel_dist": (l - f).norm().item() / nf, "misalign": 1 - (l @ f).item() / (nl * nf),
            "norm_ratio": nl / nf}


def loewner_excess(G_l, G_f):
    """lambda_max(G_l - G_f) / lambda_max(G_f): <= 0 iff G_l <= G_f in the Loewner order (A.5, Eq. 40)."""
    return torch.linalg.eigvalsh(G_l - G_f)[-1].item() / torch.linalg.eigvalsh(G_f)[-1].item()


def compare(lora_m, ff_m, sets=SETS):
    """{set: {"lora": summary, "ff": summary, "loewner": x, **distances}} of a LoRA and an FF measurement."""
    Kl, Kf = kernel_sets(lora_m), kernel_sets(ff_m)
    out = {}
    for s in sets:
        Gl, Gf = fisher_gram(Kl[s], lora_m["e"]), fisher_gram(Kf[s], ff_m["e"])
        out[s] = {"lora": summarise(Gl), "ff": summarise(Gf), "loewner": loewner_excess(Gl, Gf),
                  **distances(Kl[s], Kf[s])}
        # IB over each one's top-t eigenvalues, t = the smaller support: IB on supports of different sizes sums
        # different numbers of log-terms (after training, samples fit to e_i ~ 0 leave the support)
        t = min(out[s]["lora"]["support"], out[s]["ff"]["support"])
        out[s]["ib_common"] = {"support": t, **{who: 0.5 * spectrum(G)[:t].double().log().sum().item()
                                                for who, G in (("lora", Gl), ("ff", Gf))}}
    return out


# -----------------------------------------------------------------------------
# measurements cached per draw (FF's is the expensive part: about a minute and 7.6 GB on MiniLM, N = 64)

def cached_measure(path, meta, compute):
    """compute()'s measurement, saved at `path` with `meta` and reused while `meta` is unchanged: the kernels are
    stored in float32 (their origin: float32 Jacobians) and given back in float64, as measure() gives them."""
    if os.path.isfile(path):
        saved = torch.load(path)
        if saved["meta"] == meta:
            return {"e": saved["e"], "K": {g: K.double() for g, K in saved["K"].items()}}
    t = time.time()
    m = compute()
    m["seconds"] = time.time() - t
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"meta": meta, "e": m["e"], "K": {g: K.float() for g, K in m["K"].items()}}, path)
    return m


def draw_meta(model_dir, batch, n, max_len, seed):
    """What a measurement on one draw depends on besides the weights: the model, the samples, their labels."""
    return {"model": os.path.realpath(model_dir), "n": n, "max_len": max_len, "seed": seed, "targets": TARGETS,
            "input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()}


def ff_at_init(args, seed):
    """(base model, batch, FF measurement) for one draw; the measurement is cached in <out>/cache/."""
    batch = load_batch(args.model, args.data_dir, args.n, args.max_len, seed)
    net = base_model(args.model, seed)
    path = os.path.join(args.out, "cache", f"ff-init-n{args.n}-len{args.max_len}-s{seed}.pt")
    m = cached_measure(path, draw_meta(args.model, batch, args.n, args.max_len, seed),
                       lambda: measure(net, batch, desc=f"FF NTK, draw {seed}"))
    return net, batch, m


# -----------------------------------------------------------------------------
# thm36: FF vs LoRA at initialisation over rank x k x alpha

def thm36(args):
    rows, checks = [], []
    configs = [(r, a, k) for r in args.ranks for a in args.alphas for k in args.scales]
    for seed in args.seeds:
        net, batch, ff = ff_at_init(args, seed)
        check = a_gradient_check(net, batch, args.ranks[0], seed)
        head_share = ff["K"]["head"].norm().item() / kernel_sets(ff)["trained"].norm().item()
        checks.append({"seed": seed, "ff_seconds": ff.get("seconds"), "head_share": head_share, **check})
        for rank, alpha, k in cli.progress(configs, desc=f"LoRA configs, draw {seed}", unit="config"):
            lnet = lora_model(net, rank, scaling(rank, alpha) * rank, init_scale=k, seed=seed)
            lm = measure(lnet, batch, {"adapted": groups_for(lnet)["adapted"]})
            if not torch.allclose(lm["e"], ff["e"], rtol=0, atol=1e-5):
                raise RuntimeError("LoRA at init (B = 0) must compute the base model's function")
            lm["K"]["head"] = ff["K"]["head"]  # same function and same head at B = 0: the same head kernel
            rows.append({"seed": seed, "rank": rank, "alpha": alpha, "k": k, "sets": compare(lm, ff)})
    return {"setup": setup(args), "checks": checks, "rows": rows}


def scaling(rank, alpha):
    """LoRA's s = alpha / r; alpha "r" means s = 1, the paper's Lemma 3.1, which has no scaling."""
    return 1.0 if alpha == "r" else alpha / rank


def a_gradient_check(net, batch, rank, seed):
    """max |K_A| and max |K_B| for one LoRA draw at B = 0 (k = 1/3, alpha = 16): A's kernel is exactly zero."""
    import lora
    lnet = lora_model(net, rank, 16, init_scale=1 / 3, seed=seed)
    names = {n: p for n, p in lnet.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    groups = {w: [n for n in names if n.endswith(f".lora_{w}")] for w in "AB"}
    assert all(layer.lora_B.abs().max() == 0 for layer in lora.lora_layers(lnet).values())
    K = measure(lnet, batch, groups)["K"]
    return {"rank": rank, "max_abs_K_A": K["A"].abs().max().item(), "max_abs_K_B": K["B"].abs().max().item()}


def setup(args):
    return {k: v for k, v in vars(args).items() if k != "cmd"}


# -----------------------------------------------------------------------------
# inits: every A/B init at rank 8, at initialisation

def inits(args):
    import lora
    rows, skipped = [], {}
    for seed in args.seeds:
        net, batch, ff = ff_at_init(args, seed)
        for init in cli.progress(args.inits, desc=f"inits, draw {seed}", unit="init"):
            try:
                lnet = lora_model(net, args.rank, args.alpha, init=init, seed=seed)
            except Exception as e:  # an init these flags cannot build (orthogonal at an odd rank): listed in inits.md
                skipped[init] = f"{type(e).__name__}: {e}"
                continue
            lm = measure(lnet, batch)
            drift = (lm["e"] - ff["e"]).abs().max().item()  # e differ iff the init changed the function
            rows.append({"seed": seed, "init": init, "softmax_change": drift,
                         "trainable": sum(p.numel() for p in lnet.parameters() if p.requires_grad),
                         "sets": compare(lm, ff)})
    return {"setup": setup(args), "inits_available": list(lora.INITS), "skipped": skipped, "rows": rows}


# -----------------------------------------------------------------------------
# runs: trained runs (train.py's folders), FF and LoRA, each on the same draws

def find_runs(paths):
    """Finished run folders (config.json plus adapter.safetensors or model/) at or below each path, sorted."""
    found = []
    for p in paths:
        cli.check_input_folder(p, "run folder", "pass run folders, or folders holding them")
        for cfg in sorted(glob.glob(os.path.join(p, "**", "config.json"), recursive=True)):
            d = os.path.dirname(cfg)
            if os.path.isfile(os.path.join(d, "adapter.safetensors")) or os.path.isdir(os.path.join(d, "model")):
                found.append(d)
    return sorted(set(found))


def run_digest(run_dir):
    """sha256 of what a finished run's measurement depends on: its config.json and its saved weights."""
    h = hashlib.sha256()
    files = [os.path.join(run_dir, "config.json"), os.path.join(run_dir, "adapter.safetensors")]
    files += sorted(glob.glob(os.path.join(run_dir, "model", "*")))
    for f in (f for f in files if os.path.isfile(f)):
        with open(f, "rb") as fh:
            h.update(os.path.basename(f).encode() + fh.read())
    return h.hexdigest()


def runs(args):
    """Each finished clean run measured on every draw, cached per (run, draw) in <out>/cache/: a second call with
    more run folders measures only the new ones."""
    import evaluate
    dirs = find_runs(args.paths)
    measured = []
    for d in (bar := cli.progress(dirs, desc="runs", unit="run")):
        run_args = evaluate.read_config(d)
        if run_args.attack != "none":
            bar.write(f"{d}: attack {run_args.attack}, not a clean run; skipped")
            continue
        digest = run_digest(d)
        model = functools.cache(lambda d=d: evaluate.load_run(d)[1].eval())  # loaded only if a draw is not cached
        for seed in args.seeds:
            batch = load_batch(run_args.model, run_args.data_dir, args.n, run_args.max_len, seed, run_args.task)
            meta = {**draw_meta(run_args.model, batch, args.n, run_args.max_len, seed), "run": digest}
            path = os.path.join(args.out, "cache", f"run-{digest[:16]}-n{args.n}-s{seed}.pt")
            m = cached_measure(path, meta, lambda: measure(model(), batch, desc=os.path.basename(d)))
            measured.append({"run": d, "config": vars(run_args), "seed": seed, "m": m})
    pairs = []
    for lo in (x for x in measured if x["config"]["mode"] == "lora"):
        for ff in (x for x in measured if x["config"]["mode"] == "ff"):
            same = all(lo["config"][k] == ff["config"][k] for k in ("task", "seed", "max_len", "steps", "batch_size")) \
                and lo["seed"] == ff["seed"] and lo["config"]["targets"] == TARGETS
            if same:
                c = lo["config"]  # the LoRA setting, so pairs of several training seeds group into one
                pairs.append({"lora": lo["run"], "ff": ff["run"], "seed": lo["seed"], "rank": c["rank"],
                              "k": c["init_scale"], "alpha": c["alpha"], "rslora": c["rslora"], "init": c["init"],
                              "sets": compare(lo["m"], ff["m"])})
    alone = [{"run": x["run"], "mode": x["config"]["mode"], "seed": x["seed"],
              "sets": {s: summarise(fisher_gram(K, x["m"]["e"])) for s, K in kernel_sets(x["m"]).items()}}
             for x in measured]
    return {"setup": setup(args), "runs": dirs, "alone": alone, "rows": pairs}


# -----------------------------------------------------------------------------
# tables

def mean_sd(xs):
    """'mean ± sample sd' over draws, 4 significant digits for the mean."""
    return f"{statistics.mean(xs):+.4g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:+.4g}"


def below(xs):
    """'n/m': in how many draws LoRA's value was below FF's (xs are LoRA - FF)."""
    return f"{sum(x < 0 for x in xs)}/{len(xs)}"


def group_rows(rows, key):
    cells = {}
    for r in rows:
        cells.setdefault(key(r), []).append(r)
    return cells


def verdict_table(rows, set_name):
    """Rank x k grid, one cell per (rank, k): in how many draws IB_L < IB_F, and H_L < H_F for each alpha."""
    ranks = sorted({r["rank"] for r in rows})
    ks = sorted({r["k"] for r in rows})
    cells = group_rows(rows, lambda r: (r["rank"], r["k"]))
    lines = ["| rank \\ k | " + " | ".join(f"{k:.3g}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for rank in ranks:
        out = []
        for k in ks:
            d = [r["sets"][set_name] for r in cells[(rank, k)]]
            out.append(" ".join(f"{'IB' if m == 'ib' else 'H' + m[1:]} {below([x['lora'][m] - x['ff'][m] for x in d])}"
                                for m in SUMMARIES))
        lines.append(f"| {rank} | " + " | ".join(out) + " |")
    return lines


def detail_table(rows, set_name, key_cols, common=False):
    """One row per setting: LoRA - FF differences (mean ± sd over draws), supports, Loewner excess, distances;
    common: also IB_L - IB_F over the common top-t eigenvalues (compare)."""
    head = [*key_cols, "IB_L - IB_F", *(["same, top-t common", "same, float64 tol (support L/F)"] if common else []),
            *(f"H{a:g}_L - H{a:g}_F" for a in ALPHAS), "support L / F",
            "max over draws of λmax(G_L-G_F)/λmax(G_F)", "1 - align", "‖K_L‖/‖K_F‖"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in group_rows(rows, lambda r: tuple(r[c] for c in key_cols)).items():
        d = [r["sets"][set_name] for r in rs]
        diffs = [mean_sd([x["lora"][m] - x["ff"][m] for x in d]) + f" ({below([x['lora'][m] - x['ff'][m] for x in d])})"
                 for m in SUMMARIES]
        if common:
            c = [x["ib_common"]["lora"] - x["ib_common"]["ff"] for x in d]
            f64 = [x["lora"]["ib_f64"] - x["ff"]["ib_f64"] for x in d]
            supp64 = ", ".join(f"{x['lora']['support_f64']}/{x['ff']['support_f64']}" for x in d)
            diffs[1:1] = [f"{mean_sd(c)} ({below(c)}, t = {'/'.join(str(x['ib_common']['support']) for x in d)})",
                          f"{mean_sd(f64)} ({below(f64)}; {supp64})"]
        supp = ", ".join(sorted({f"{x['lora']['support']}/{x['ff']['support']}" for x in d}))
        stats = [f"{max(x['loewner'] for x in d):+.3g}", f"{statistics.mean(x['misalign'] for x in d):.3g}",
                 f"{statistics.mean(x['norm_ratio'] for x in d):.3g}"]
        lines.append("| " + " | ".join([*map(fmt, key), *diffs, supp, *stats]) + " |")
    return lines


def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def ff_table(rows, sets=SETS):
    """FF's own IB and H_alpha per parameter set (mean ± sd over draws)."""
    lines = ["| FF set | IB | " + " | ".join(f"H{a:g}" for a in ALPHAS) + " | support |", "|---|" + "---|" * 5]
    first = group_rows(rows, lambda r: r["seed"])
    for s in sets:
        d = [rs[0]["sets"][s]["ff"] for rs in first.values()]
        lines.append(f"| {s} | " + " | ".join(mean_sd([x[m] for x in d]) for m in SUMMARIES)
                     + f" | {'/'.join(sorted({str(x['support']) for x in d}))} |")
    return lines


def thm36_verdict(res):
    """The one-paragraph verdict of thm36.md; every number in it is computed here from the rows."""
    rows, checks = res["rows"], res["checks"]
    cells = group_rows(rows, lambda r: (r["rank"], r["k"], r["alpha"]))
    n = len(cells)

    def count(s, test):
        return sum(all(test(r["sets"][s]) for r in rs) for rs in cells.values())

    ib_below = lambda d: d["lora"]["ib"] < d["ff"]["ib"]
    h_below = lambda d: all(d["lora"][m] < d["ff"][m] for m in SUMMARIES[1:])
    h1_above = {s: sum(statistics.mean(r["sets"][s]["lora"]["h1"] - r["sets"][s]["ff"]["h1"] for r in rs) > 0
                       for rs in cells.values()) for s in SETS}
    ratio = lambda rs, s: statistics.mean(r["sets"][s]["norm_ratio"] for r in rs)
    name = lambda key: f"(r {key[0]}, k {key[1]:.3g}, alpha {key[2]})"
    fails = [(key, ratio(rs, s)) for s in ("layers",) for key, rs in cells.items()
             if not all(ib_below(r["sets"][s]) for r in rs)]
    oks = [ratio(rs, "layers") for rs in cells.values() if all(ib_below(r["sets"]["layers"]) for r in rs)]
    loewner = [f"{s} {name(key)}" for s in SETS for key, rs in cells.items()
               if max(r["sets"][s]["loewner"] for r in rs) > 0]
    # at B = 0, K_adapted = k s^2 K(k = 1, s = 1): H is flat in (k, alpha), IB - (support / 2) log(k s^2) too
    h_spread, ib_spread = 0.0, 0.0
    for rs in group_rows(rows, lambda r: (r["seed"], r["rank"])).values():
        d = [(r["sets"]["adapted"]["lora"], r["k"] * scaling(r["rank"], r["alpha"]) ** 2) for r in rs]
        for m in SUMMARIES[1:]:
            h_spread = max(h_spread, max(x[m] for x, _ in d) - min(x[m] for x, _ in d))
        shifted = [x["ib"] - x["support"] / 2 * math.log(c) for x, c in d]
        ib_spread = max(ib_spread, max(shifted) - min(shifted))
    trained_ratio = [ratio(rs, "trained") for rs in cells.values()]
    return (
        f"**Verdict.** At initialisation B = 0 and A's gradient is exactly zero (max |K_A| = "
        f"{max(c['max_abs_K_A'] for c in checks):g} in every draw), so Var(A) reaches LoRA's Fisher only as the "
        f"factor k s^2 on B's kernel: on the adapted parameters H_alpha does not move with k or alpha (largest spread "
        f"{h_spread:.1e}) and IB moves by exactly (N/2) log(k s^2) (largest deviation {ib_spread:.1e} nats). "
        f"Theorem 3.6's IB half: IB_LoRA < IB_FF in every draw in {count('trained', ib_below)}/{n}, "
        f"{count('adapted', ib_below)}/{n} and {count('layers', ib_below)}/{n} (rank, k, alpha) settings "
        f"(trained / adapted / layers); the per-layer exceptions are "
        + (", ".join(f"{name(key)} with ‖K_L‖/‖K_F‖ = {x:.2f}" for key, x in fails) or "none")
        + (f", and per layer IB is below in every draw wherever ‖K_L‖/‖K_F‖ <= {max(oks):.2f}" if oks else "")
        + ": the order follows the kernel scale r k s^2 / n, not the condition k <= 1 by itself. Its entropy half "
        f"{holds(count('adapted', h_below), n)} on the adapted parameters: H_alpha,LoRA < H_alpha,FF for all three "
        f"alpha in every draw in "
        f"{count('adapted', h_below)}/{n} settings, and LoRA's H_1 is above FF's on average in "
        f"{h1_above['adapted']}/{n} (per layer: {count('layers', h_below)}/{n} below, {h1_above['layers']}/{n} "
        f"above on average). With the head included (trained) both halves hold in {count('trained', h_below)}/{n} "
        f"settings for H and {count('trained', ib_below)}/{n} for IB, but there the head carries LoRA's Gram "
        f"(‖K_L‖/‖K_F‖ = {min(trained_ratio):.2f}-{max(trained_ratio):.2f}, of which the head alone is "
        f"{min(c['head_share'] for c in checks):.2f}-{max(c['head_share'] for c in checks):.2f}), so that is a "
        f"statement about the head's spectrum, not about A and B. The proof's step I_LoRA <= I_FF (Eq. 40, "
        f"a Loewner order) fails in " + (", ".join(loewner) or "no setting") + "."
    )


def holds(k, n):
    return "holds" if k == n else "fails" if k == 0 else "holds only in part"


def thm36_markdown(res):
    st, rows = res["setup"], res["rows"]
    checks = res["checks"]
    out = ["# Theorem 3.6 on the real model, at initialisation",
           "",
           f"`{st['command']}` (data: `thm36.json`, `thm36.csv`). "
           f"Model `{os.path.basename(os.path.dirname(st['model'].rstrip('/')))}`, SST-2 train, N = {st['n']} "
           f"sentences per draw, max length {st['max_len']}, draws (seeds) {st['seeds']}; LoRA on q, v, "
           f"kaiming-uniform A with Var(A) = k / n_in, B = 0. Each draw fixes the sentences, the head and the A draws. "
           "Empirical Fisher (true labels) through the N x N Gram (Eq. 8); IB = 1/2 log pdet (Eq. 9), H_alpha "
           "normalised (Eq. 10); a cell `n/m` counts the draws in which LoRA's value is below FF's.",
           "",
           "At B = 0 the A-gradient is exactly zero: max |K_A| = "
           + ", ".join(f"{c['max_abs_K_A']:g}" for c in checks) + " (vs max |K_B| = "
           + ", ".join(f"{c['max_abs_K_B']:.3g}" for c in checks) + f", rank {checks[0]['rank']}, k = 1/3, alpha = 16).",
           "",
           thm36_verdict(res), "",
           "## FF's own values", "", *ff_table(rows), ""]
    for alpha in st["alphas"]:
        sub = [r for r in rows if r["alpha"] == alpha]
        label = "alpha = r (s = 1, the paper's Lemma 3.1)" if alpha == "r" else f"alpha = {alpha} (s = {alpha}/r)"
        for s in SETS:
            out += [f"## {s}, {label}", "", "Verdict (draws with LoRA < FF):", "", *verdict_table(sub, s), "",
                    *detail_table(sub, s, ("rank", "k")), ""]
    return "\n".join(out) + "\n"


def inits_markdown(res):
    st, rows = res["setup"], res["rows"]
    out = ["# Each LoRA init through the NTK, at initialisation",
           "",
           f"`{st['command']}` (data: `inits.json`, `inits.csv`). Rank {st['rank']}, "
           f"alpha {st['alpha']}, targets q, v, each init at lora's default init_scale; N = {st['n']} SST-2 train "
           f"sentences, max length {st['max_len']}, draws {st['seeds']}. FF is the base model with the same head. "
           "`1 - align` = 1 - <K_L, K_F> / (||K_L|| ||K_F||); `rel dist` = ||K_L - K_F|| / ||K_F||; "
           "`softmax change` = max |p_LoRA - p_base| over samples (0 iff the init keeps the function).",
           ""]
    if res["skipped"]:
        out += ["Skipped (apply_lora failed): " + "; ".join(f"`{k}`: {v}" for k, v in res["skipped"].items()), ""]
    out += ["## NTK distance to FF", "",
            "| init | trainable (with head) | softmax change | layers: 1 - align | layers: rel dist | layers: ‖K_L‖/‖K_F‖ "
            "| trained: 1 - align | trained: rel dist | trained: ‖K_L‖/‖K_F‖ |", "|---|" + "---|" * 8]
    for init, rs in group_rows(rows, lambda r: r["init"]).items():
        vals = [f"{rs[0]['trainable']:,}", f"{max(r['softmax_change'] for r in rs):.2g}"]
        for s in ("layers", "trained"):
            for m in ("misalign", "rel_dist", "norm_ratio"):
                vals.append(mean_sd([r["sets"][s][m] for r in rs]).lstrip("+"))
        out.append(f"| {init} | " + " | ".join(vals) + " |")
    out += ["", "## Fisher IB and H_alpha (LoRA's own; FF's in the last rows)", "",
            "| init | set | IB | " + " | ".join(f"H{a:g}" for a in ALPHAS) + " | IB_L < IB_F | H_L < H_F (0.5/1/2) |",
            "|---|" + "---|" * 7]
    for init, rs in group_rows(rows, lambda r: r["init"]).items():
        for s in ("layers", "trained"):
            d = [r["sets"][s] for r in rs]
            hs = " ".join(below([x["lora"][m] - x["ff"][m] for x in d]) for m in SUMMARIES[1:])
            out.append(f"| {init} | {s} | " + " | ".join(mean_sd([x["lora"][m] for x in d]) for m in SUMMARIES)
                       + f" | {below([x['lora']['ib'] - x['ff']['ib'] for x in d])} | {hs} |")
    for s in ("layers", "trained"):
        d = [rs[0]["sets"][s]["ff"] for rs in group_rows(rows, lambda r: r["seed"]).values()]
        out.append(f"| FF | {s} | " + " | ".join(mean_sd([x[m] for x in d]) for m in SUMMARIES) + " | | |")
    return "\n".join(out) + "\n"


def runs_markdown(res):
    st = res["setup"]
    out = ["# Theorem 3.6 after clean training", "",
           f"`{st['command']}`; N = {st['n']} SST-2 train "
           f"sentences per draw, draws {st['seeds']}. Runs found: {len(res['runs'])}. A LoRA run is paired with "
           "each FF run of the same task, seed, budget and batch size, each mode at its own learning rate; after "
           "training the support (eigenvalues above ntk's tolerance) falls below N because "
           "a fitted sample's dCE/dlogits is ~1e-3 and its eigenvalue ~1e-6 lambda_max, under ntk's float32 cut, "
           "so IB sums different numbers of log-terms: the pair tables also compare IB over the common top-t "
           "eigenvalues and IB with float64's tolerance.", ""]
    if not res["alone"]:
        return "\n".join(out + ["No finished clean run (config.json with adapter.safetensors or model/) was found."]) + "\n"
    out += ["## Each run's own Fisher", "", "| run | mode | draw | set | IB | "
            + " | ".join(f"H{a:g}" for a in ALPHAS) + " | support |", "|---|" + "---|" * 8]
    for x in res["alone"]:
        for s, v in x["sets"].items():
            out.append(f"| {os.path.basename(x['run'])} | {x['mode']} | {x['seed']} | {s} | "
                       + " | ".join(f"{v[m]:.2f}" for m in SUMMARIES) + f" | {v['support']} |")
    if res["rows"]:
        setting = ("init", "rank", "k", "alpha", "rslora")
        out += ["", "## LoRA vs FF per LoRA setting, adapted parameters (over training seeds x draws)", "",
                *detail_table(res["rows"], "adapted", setting, common=True)]
        for r in res["rows"]:
            r["pair"] = f"{os.path.basename(r['lora'])} vs {os.path.basename(r['ff'])}"
        for s in SETS:
            out += ["", f"## LoRA vs FF, {s}", "", *detail_table(res["rows"], s, ("pair",), common=True)]
    return "\n".join(out) + "\n"


def write_csv(rows, path, key_cols):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*key_cols, "set", *(f"{who}_{m}" for who in ("lora", "ff") for m in (*SUMMARIES, "support")),
                    "loewner", "rel_dist", "misalign", "norm_ratio"])
        for r in rows:
            for s, v in r["sets"].items():
                w.writerow([r[c] for c in key_cols] + [s] + [v[who][m] for who in ("lora", "ff")
                                                             for m in (*SUMMARIES, "support")]
                           + [v["loewner"], v["rel_dist"], v["misalign"], v["norm_ratio"]])


def write(res, out, name, markdown, key_cols):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    write_csv(res["rows"], os.path.join(out, f"{name}.csv"), key_cols)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown(res))
    print(f"wrote {out}/{name}.md, .json, .csv")


# -----------------------------------------------------------------------------
# command line

def alpha_arg(v):
    if v == "r":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an alpha is a number or 'r' (alpha = rank, s = 1), got {v!r}") from None


def parser():
    import lora
    p = cli.Parser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="results/theory", help="output folder (and its cache/ of measured kernels)")
    common.add_argument("--n", type=int, default=64, help="sentences per draw (the Gram is N x N)")
    common.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draws: samples, head, A")
    common.add_argument("--max-len", type=int, default=64, help="tokenizer max length")
    common.add_argument("--model", default=None, help="BERT folder (default: the embedded MiniLM)")
    common.add_argument("--data-dir", default=None, help="GLUE folder (default: ../shared/data/glue or $GLUE_DIR)")
    common.add_argument("--threads", type=int, default=1, help="torch threads (a background sweep owns the rest)")
    t = sub.add_parser("thm36", parents=[common], help="Theorem 3.6 at init: FF vs LoRA over rank x k x alpha")
    t.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 64, 384])
    t.add_argument("--scales", type=float, nargs="+", default=[1e-4, 1 / 3, 1.0, 2.0], help="k: Var(A) = k / n_in")
    t.add_argument("--alphas", type=alpha_arg, nargs="+", default=[16.0, "r"],
                   help="LoRA alpha (s = alpha / r); 'r' = alpha equal to the rank, s = 1 as in the paper")
    i = sub.add_parser("inits", parents=[common], help="every init in lora.INITS at init: NTK distance, IB, H")
    i.add_argument("--inits", nargs="+", default=list(lora.INITS), help="default: all of lora.INITS")
    i.add_argument("--rank", type=int, default=8)
    i.add_argument("--alpha", type=float, default=16.0)
    r = sub.add_parser("runs", parents=[common], help="trained runs: each run's Fisher, LoRA vs FF per seed")
    r.add_argument("paths", nargs="+", help="run folders, or folders searched for them")
    return p


def check(args):
    """The checks argparse cannot make, as cli.UsageError (one line, exit code 2)."""
    import data
    import lora
    import runspec
    cli.check_folder_path(args.out, "--out")
    if args.model is not None:
        runspec.check_model_folder(args.model)
    if args.data_dir is not None:
        data.glue_dir(args.data_dir)
    if args.n < 2 or args.max_len < 2 or args.threads < 1:
        raise cli.UsageError("--n and --max-len must be at least 2, --threads at least 1")
    if args.cmd == "thm36" and (any(k <= 0 for k in args.scales) or any(r < 1 for r in args.ranks)):
        raise cli.UsageError(f"--scales must be > 0 and --ranks >= 1, got {args.scales} and {args.ranks}")
    if args.cmd == "inits" and any(x not in lora.INITS for x in args.inits):
        raise cli.UsageError(f"--inits {[x for x in args.inits if x not in lora.INITS]} not in lora.INITS "
                             f"{list(lora.INITS)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.command = " ".join(["python -m study.ntk_study", *argv])
    t = time.time()
    with cli.usage_errors():  # bad flags, files, data or checkpoints: one line, exit code 2
        check(args)
        torch.set_num_threads(args.threads)
        import model as M
        args.model = args.model or M.default_model_dir()
        if args.cmd == "thm36":
            write(thm36(args), args.out, "thm36", thm36_markdown, ("seed", "rank", "alpha", "k"))
        elif args.cmd == "inits":
            write(inits(args), args.out, "inits", inits_markdown, ("seed", "init"))
        else:
            write(runs(args), args.out, "runs", runs_markdown, ("lora", "ff", "seed"))
    print(f"{args.cmd}: {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
