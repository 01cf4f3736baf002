"""
Empirical neural tangent kernels and Fisher-information spectra of a classifier w.r.t. a chosen parameter subset
(all parameters = full fine-tuning, LoRA's = LoRA), in the torch.func style: `functional_call` makes the model a
function of its parameters, `vmap(jacrev(...))` / `vmap(grad(...))` give per-sample derivatives, einsums contract
them. Work is chunked over samples and over parameter tensors so a real BERT fits in a few GB.

    K(x, x')  = J(x) J(x')^T,  J = d logits / d theta            (Eq. 6)    empirical_ntk
    F         = (1/N) sum_i g_i g_i^T,  g_i = grad_theta CE_i    (Eq. 8)    fisher_spectrum (from the N x N Gram)
    IB        = 1/2 sum_{lambda > tol} log lambda                (Eq. 9)    information_bits
    H_alpha   = Renyi entropy of p = lambda / sum(lambda)        (Eq. 10)   renyi_entropy
    M'        = || mean_i K(x_i, x~_i) ||_F                      (Eq. 7)    m_prime
    H'_alpha over eig(A^T A), rank x variance grid               (Eq. 18)   fig3_grid, `python ntk.py fig3 --out DIR`

The NTK and Fisher are those of the deterministic network: every function here runs the model in eval() mode
(no dropout) and restores its previous mode afterwards. Every kernel/spectrum function takes `params` ("ff",
"lora", "trainable" or a {name: tensor} dict, see params_for), `sample_chunk` (samples per vmap call) and
`max_bytes` (memory for one parameter chunk's per-sample derivatives over all samples; more parameters than that
are done in several passes). Batches are the tokenizer's dicts (input_ids,
attention_mask, token_type_ids; other keys ignored) or, for plain models such as the tests' MLPs, an (N, d) tensor.
"""
import contextlib
import csv
import math
import os

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import cli
from lora import RANDOM_A_INITS, init_lora_A_

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# -----------------------------------------------------------------------------
# which parameters, which inputs

def params_for(model, which):
    """{name: detached tensor} for a parameter subset of `model`:
    "ff": every parameter except those LoRA added (A, B, DoRA's magnitude): what full fine-tuning trains; a LoRA
          layer's base weight counts,
    "lora": what LoRA fine-tuning trains: the LoRA factors that are not frozen (A unless --freeze-a, B unless MiCA
            freezes it, DoRA's magnitude) and the head (`classifier.*`),
    "trainable": whatever has requires_grad=True now.
    """
    named = dict(model.named_parameters())
    added = (".lora_A", ".lora_B", ".lora_magnitude")
    if which == "ff":
        keep = [n for n in named if not n.endswith(added)]
    elif which == "lora":
        keep = [n for n, p in named.items() if n.endswith(added) and p.requires_grad]
        if not keep:
            raise ValueError('params_for(model, "lora"): the model has no LoRA layers (call lora.apply_lora first)')
        keep += [n for n in named if n.startswith("classifier.")]
    elif which == "trainable":
        keep = [n for n, p in named.items() if p.requires_grad]
    else:
        raise ValueError(f'parameter subset {which!r} is not one of "ff", "lora", "trainable"')
    return {n: named[n].detach() for n in keep}


def _resolve(model, params):
    if isinstance(params, str):
        params = params_for(model, params)
    named = dict(model.named_parameters())
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(f"parameters not in the model: {unknown[:5]}")
    if not params:
        raise ValueError("empty parameter subset")
    return {n: t.detach() for n, t in params.items()}


def _inputs(batch):
    """(per-sample inputs with a leading sample dimension, N)."""
    if isinstance(batch, torch.Tensor):
        return batch, batch.shape[0]
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"batch dict has no input_ids (keys: {sorted(batch)})")
        x = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        n = x["input_ids"].shape[0]
        if any(v.shape[0] != n for v in x.values()):
            shapes = {k: tuple(v.shape) for k, v in x.items()}
            raise ValueError(f"batch tensors disagree on the number of samples: {shapes}")
        return x, n
    raise TypeError(f"a batch is a tokenizer dict or a tensor, got {type(batch).__name__}")


def _labels(labels, n):
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the batch, got {tuple(labels.shape)}")
    return labels.long()


@contextlib.contextmanager
def _deterministic(model):
    """eval() mode (no dropout), no autograd graph for the model's own parameters (torch.func transforms still
    differentiate), and the math attention kernel: CPU flash attention has no vmap batching rule and would fall
    back to a slow per-sample loop; the math kernel is plain batched matmuls and softmax."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# per-sample derivatives, chunked

def _logits_fn(model):
    def f(params, x):  # one sample -> its logits (C,)
        if isinstance(x, dict):
            return functional_call(model, params, (), {k: v[None] for k, v in x.items()})[0]
        return functional_call(model, params, (x[None],))[0]
    return f


def _per_sample(model, params, x, n, labels, sample_chunk):
    """Per-sample derivatives flattened over `params`: (N, C, P) logit Jacobians, or (N, 1, P) cross-entropy
    gradients when labels are given. Filled chunk by chunk into one preallocated tensor (vmap's own chunk_size
    would concatenate a second copy)."""
    f = _logits_fn(model)
    if labels is None:
        per_sample = vmap(jacrev(f), in_dims=(None, 0))
    else:
        def loss(p, xi, yi):
            return F.cross_entropy(f(p, xi)[None], yi[None])
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    out = None
    for s in range(0, n, sample_chunk):
        xs = {k: v[s:s + sample_chunk] for k, v in x.items()} if isinstance(x, dict) else x[s:s + sample_chunk]
        args = (params, xs) if labels is None else (params, xs, labels[s:s + sample_chunk])
        d = per_sample(*args)
        rows = len(d[next(iter(params))])
        if labels is None:  # d[k]: (rows, C, *shape)
            flat = torch.cat([d[k].reshape(rows, d[k].shape[1], -1) for k in params], dim=-1)
        else:  # d[k]: (rows, *shape)
            flat = torch.cat([d[k].reshape(rows, -1) for k in params], dim=-1)[:, None]
        if out is None:
            out = flat.new_empty(n, flat.shape[1], flat.shape[2])
        out[s:s + rows] = flat
    return out


def _param_chunks(params, rows, max_bytes):
    """Split parameter names into groups whose per-sample derivatives (rows x numel) fit in max_bytes;
    a single tensor larger than that is a group of its own."""
    itemsize = next(iter(params.values())).element_size()
    limit = max(1, max_bytes // (rows * itemsize))
    groups, group, size = [], [], 0
    for name, t in params.items():
        if group and size + t.numel() > limit:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += t.numel()
    groups.append(group)
    return groups


def _derivatives(model, params, batches, labels, sample_chunk, max_bytes):
    """For each chunk of parameters, yield one (N_b, C, p) derivative tensor per batch (see _per_sample)."""
    params = _resolve(model, params)
    xs = [_inputs(b) for b in batches]
    labels = [None if y is None else _labels(y, n) for y, (_, n) in zip(labels, xs)]
    with _deterministic(model):
        x0 = xs[0][0]
        one = {k: v[0] for k, v in x0.items()} if isinstance(x0, dict) else x0[0]
        n_out = 1 if labels[0] is not None else _logits_fn(model)(params, one).shape[0]
        rows = n_out * sum(n for _, n in xs)
        for names in _param_chunks(params, rows, max_bytes):
            sub = {k: params[k] for k in names}
            yield [_per_sample(model, sub, x, n, y, sample_chunk) for (x, n), y in zip(xs, labels)]


# -----------------------------------------------------------------------------
# kernels and spectra

def empirical_ntk(model, batch, batch2=None, params="ff", sample_chunk=16, max_bytes=2**30):
    """K[i, j] = J(x_i) J(x'_j)^T (Eq. 6): the (N1, N2, C, C) empirical NTK of the logits w.r.t. `params`
    ("ff", "lora", "trainable" or a {name: tensor} dict). batch2=None: the kernel of batch with itself."""
    same = batch2 is None
    K = None
    for J in _derivatives(model, params, [batch] if same else [batch, batch2], [None] * (1 if same else 2),
                          sample_chunk, max_bytes):
        J1, J2 = (J[0], J[0]) if same else J
        part = torch.einsum("icp,jdp->ijcd", J1, J2)
        K = part if K is None else K + part
    return K


def sample_labels(model, batch, generator=None):
    """y_i ~ softmax(f(x_i)): labels drawn from the model's own predictive distribution (for the model Fisher)."""
    x, n = _inputs(batch)
    with _deterministic(model):
        logits = model(**x) if isinstance(x, dict) else model(x)
    return torch.multinomial(logits.softmax(-1).double().cpu(), 1, generator=generator)[:, 0].to(logits.device)


def fisher_gram(model, batch, labels=None, params="ff", kind="empirical", generator=None, sample_chunk=16,
                max_bytes=2**30):
    """G = (1/N) [g_i . g_j], g_i = grad_theta CE(f(x_i), y_i): the N x N Gram whose eigenvalues are the non-zero
    eigenvalues of the Fisher F = (1/N) sum_i g_i g_i^T (Eq. 8, 19), which is P x P and never formed.

    kind="empirical": y_i are the true labels (`labels`, or batch["labels"]).
    kind="model": y_i ~ softmax(f(x_i)), one draw per sample from `generator`, a one-sample Monte-Carlo estimate of
    the model's Fisher E_{y ~ p(y|x)}[g g^T]; `labels` must then be None.
    The paper writes Eq. 8 as a scalar g^T g; its eigenvalues (Eq. 9-10) only make sense for the matrix g g^T.
    """
    if kind == "empirical":
        if labels is None:
            labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None:
            raise ValueError('kind="empirical" needs the true labels (labels=... or batch["labels"])')
    elif kind == "model":
        if labels is not None:
            raise ValueError('kind="model" samples its labels from the model; pass labels=None')
        labels = sample_labels(model, batch, generator)
    else:
        raise ValueError(f'Fisher kind {kind!r} is not "empirical" or "model"')
    G = None
    for (g,) in _derivatives(model, params, [batch], [labels], sample_chunk, max_bytes):
        g = g[:, 0]
        G = g @ g.T if G is None else G + g @ g.T
    return G / G.shape[0]


def fisher_spectrum(model, batch, labels=None, params="ff", kind="empirical", generator=None, sample_chunk=16,
                    max_bytes=2**30):
    """The N eigenvalues of fisher_gram(...) in descending order, clamped at 0 (rounding can make zeros slightly
    negative), in the Gram's dtype. At most N of the Fisher's P eigenvalues are non-zero; these are they."""
    G = fisher_gram(model, batch, labels, params, kind, generator, sample_chunk, max_bytes)
    return torch.linalg.eigvalsh(G.double()).flip(0).clamp_min(0).to(G.dtype)


def m_prime(model, clean, poisoned, params="ff", sample_chunk=16, max_bytes=2**30):
    """M' = || (1/N) sum_i K(x_i, x~_i) ||_F (Eq. 7): the NTK between each clean sample and its poisoned
    counterpart (same index), averaged, Frobenius norm of the C x C result. The logit NTK does not see labels, so
    a pure label flip has M'(clean, poisoned) = M'(clean, clean); see gradient_alignment for label-aware pairs."""
    S, n = None, None
    for J, Jt in _derivatives(model, params, [clean, poisoned], [None, None], sample_chunk, max_bytes):
        if J.shape[0] != Jt.shape[0]:
            raise ValueError(f"m_prime pairs samples by index: {J.shape[0]} clean vs {Jt.shape[0]} poisoned")
        part = torch.einsum("icp,idp->cd", J, Jt)
        S, n = (part if S is None else S + part), J.shape[0]
    return torch.linalg.matrix_norm(S / n)


def gradient_alignment(model, clean, labels, poisoned, poisoned_labels, params="ff", sample_chunk=16,
                       max_bytes=2**30):
    """a_i = grad CE(x_i, y_i) . grad CE(x~_i, y~_i) for each clean/poisoned pair: the inner products that a
    backdoor drives to zero (Eq. 16) and an untargeted poisoning drives up (Eq. 17) in absolute value."""
    a = None
    for g, gt in _derivatives(model, params, [clean, poisoned], [labels, poisoned_labels], sample_chunk, max_bytes):
        if g.shape[0] != gt.shape[0]:
            raise ValueError(f"gradient_alignment pairs samples by index: {g.shape[0]} vs {gt.shape[0]}")
        part = (g[:, 0] * gt[:, 0]).sum(-1)
        a = part if a is None else a + part
    return a


# -----------------------------------------------------------------------------
# information bits and Renyi entropy of a spectrum

def _support(eigs, tol):
    """The eigenvalues above tol, in float64; tol=None: lambda_max * len * eps(dtype), as matrix_rank does."""
    eigs = torch.as_tensor(eigs)
    if eigs.ndim != 1 or eigs.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of eigenvalues, got shape {tuple(eigs.shape)}")
    if not eigs.is_floating_point():
        eigs = eigs.double()
    if tol is None:
        tol = eigs.abs().max().item() * eigs.numel() * torch.finfo(eigs.dtype).eps
    kept = eigs[eigs > tol].double()
    if kept.numel() == 0:
        raise ValueError(f"no eigenvalue is above tol={tol:g}: the spectrum is numerically zero")
    return kept


def information_bits(eigs, tol=None):
    """IB = 1/2 log pdet(F) = 1/2 sum_{lambda > tol} log lambda (Eq. 9), in nats.
    The paper's Eq. 9 prints the right-hand side as 1/2 sum lambda, dropping the log; the log-pseudo-determinant
    on its left-hand side is what is meant, and what this computes."""
    return 0.5 * _support(eigs, tol).log().sum().item()


def renyi_entropy(eigs, alpha, tol=None):
    """H_alpha = 1/(1 - alpha) log sum_i p_i^alpha, p_i = lambda_i / sum(lambda) over lambda > tol (Eq. 10 with
    App. C.1's normalisation; Eq. 10 as printed uses the raw lambda, which is not a Renyi entropy).
    alpha = 0: log(#support); 1: Shannon -sum p log p (the alpha -> 1 limit, App. C.1); inf: -log max p (the paper
    writes H_inf = max lambda, which is not the limit)."""
    alpha = float(alpha)
    if not alpha >= 0:
        raise ValueError(f"Renyi order alpha must be >= 0, got {alpha}")
    lam = _support(eigs, tol)
    p = lam / lam.sum()
    if alpha == 0:
        return math.log(p.numel())
    if alpha == 1:
        return -(p * p.log()).sum().item()
    if math.isinf(alpha):
        return -p.max().log().item()
    return (torch.logsumexp(alpha * p.log(), 0) / (1 - alpha)).item()


# -----------------------------------------------------------------------------
# Eq. 18 / Figure 3: entropy of eig(A^T A) over rank x variance scale

def fig3_grid(ranks, scales, n_in=1024, alpha=1.0, init="kaiming_uniform", seed=0):
    """H'_alpha (Eq. 18) of the non-zero eigenvalues of A^T A, A (r x n_in) with Var(A_ij) = k / n_in, for every
    (k, r) in scales x ranks. Returns {name: (len(scales), len(ranks)) float64 tensor}: rows are variance scales
    (the y axis), columns ranks (the x axis).

      H            Renyi entropy of p = lambda / sum(lambda) (renyi_entropy). Exactly independent of k: A -> cA
                   scales every lambda by c^2 and leaves p unchanged.
      neg_lambda_log_lambda   -sum lambda log lambda on the raw lambda: the Shannon formula without the
                   normalisation, the only form in which the variance scale can matter, as it does in the paper's
                   Fig. 3.
      trace        sum lambda = ||A||_F^2, expected r * k.
      lambda_max   largest eigenvalue; A^T A - I is negative semi-definite (Thm 3.4) iff lambda_max <= 1, which
                   for large n_in happens iff k <= 1 / (1 + sqrt(r / n_in))^2 (Marchenko-Pastur edge).

    One A per rank, drawn at k = 1 and rescaled (common random numbers), so differences along the variance axis are
    exact, not sampling noise. The non-zero eigenvalues of A^T A (n_in x n_in) are those of A A^T (r x r).
    """
    if any(not 1 <= r <= n_in for r in ranks):
        raise ValueError(f"every rank must be in 1..n_in={n_in}, got {list(ranks)}")
    if any(not k > 0 for k in scales):
        raise ValueError(f"every variance scale must be > 0, got {list(scales)}")
    keys = ("H", "neg_lambda_log_lambda", "trace", "lambda_max")
    out = {k: torch.empty(len(scales), len(ranks), dtype=torch.float64) for k in keys}
    g = torch.Generator().manual_seed(seed)
    for j, r in enumerate(ranks):
        A = init_lora_A_(torch.empty(r, n_in, dtype=torch.float64), init, 1.0, g)
        lam1 = torch.linalg.eigvalsh(A @ A.T).clamp_min(0)
        for i, k in enumerate(scales):
            lam = k * lam1
            out["H"][i, j] = renyi_entropy(lam, alpha)
            out["neg_lambda_log_lambda"][i, j] = -(lam * lam.log()).nan_to_num().sum()
            out["trace"][i, j] = lam.sum()
            out["lambda_max"][i, j] = lam.max()
    return out


def _edges(values):
    """Cell edges on a log axis: geometric midpoints, half a log-step beyond the ends."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64).log()
    step = (v[1:] - v[:-1]) if len(v) > 1 else torch.tensor([math.log(4.0)])
    mids = (v[1:] + v[:-1]) / 2
    return torch.cat([v[:1] - step[:1] / 2, mids, v[-1:] + step[-1:] / 2]).exp().tolist()


def plot_fig3(grid, ranks, scales, n_in, alpha=1.0, path=None, default_scale=1 / 3):
    """Two heatmaps, rank on x and variance scale k on y (both log), from fig3_grid's output: (a) the normalised
    H_alpha, (b) -sum lambda log lambda. Marks the default k = 1/3 and the Marchenko-Pastur edge above which
    A^T A - I stops being negative semi-definite. Returns the matplotlib Figure; saves it when path is given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    panels = [("H", f"(a) $H_{{{alpha:g}}}$ of $p=\\lambda/\\sum\\lambda$, $\\lambda\\in$ eig$(A^TA)$ (Eq. 18, C.1)"),
              ("neg_lambda_log_lambda", r"(b) $-\sum\lambda\log\lambda$ on raw $\lambda$ (unnormalised)")]
    xe, ye = _edges(ranks), _edges(scales)
    r_line = torch.logspace(math.log10(xe[0]), math.log10(xe[-1]), 200, dtype=torch.float64)
    for ax, (key, title) in zip(axes, panels):
        mesh = ax.pcolormesh(xe, ye, grid[key].numpy(), cmap="viridis", shading="flat")
        fig.colorbar(mesh, ax=ax)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(f"variance scale k  (Var(A) = k / n_in, n_in = {n_in})")
        ax.set_title(title, fontsize=10)
        ax.axhline(default_scale, color="red", ls="--", lw=1.5, label=f"default k = {default_scale:.3g}")
        ax.plot(r_line, 1 / (1 + (r_line / n_in).sqrt()) ** 2, color="white", lw=1.2,
                label=r"$\lambda_{max}(A^TA)=1$ (MP edge): NSD below")
        ax.set_xlim(xe[0], xe[-1])
        ax.set_ylim(ye[0], ye[-1])
        ax.legend(loc="lower left", fontsize=8)
    if path:
        fig.savefig(path, dpi=150)
    return fig


def write_fig3_csv(grid, ranks, scales, n_in, alpha, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "var_scale", "variance", f"H_{alpha:g}_normalised", "neg_sum_lambda_log_lambda",
                    "trace", "lambda_max", "AtA_minus_I_nsd"])
        for i, k in enumerate(scales):
            for j, r in enumerate(ranks):
                w.writerow([r, f"{k:.6g}", f"{k / n_in:.6g}", f"{grid['H'][i, j]:.6f}",
                            f"{grid['neg_lambda_log_lambda'][i, j]:.6f}", f"{grid['trace'][i, j]:.6f}",
                            f"{grid['lambda_max'][i, j]:.6f}", int(grid["lambda_max"][i, j] <= 1)])


def main(argv=None):
    p = cli.Parser(description="NTK / Fisher tools. `fig3`: the paper's Eq. 18 / Figure 3 grid.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f3 = sub.add_parser("fig3", help="entropy of eig(A^T A) over rank x variance scale: CSV + heatmap PNG")
    f3.add_argument("--out", required=True, help="output folder (fig3.csv, fig3.png)")
    f3.add_argument("--n-in", type=int, default=1024, help="input width n_in of the adapted layer")
    f3.add_argument("--ranks", type=int, nargs="+", default=[2 ** i for i in range(2, 10)],
                    help="ranks (x axis); default 4..512, powers of 2")
    f3.add_argument("--scales", type=float, nargs="+",
                    default=torch.logspace(math.log10(1e-3), math.log10(2.0), 12, dtype=torch.float64).tolist(),
                    help="variance scales k, Var(A) = k / n_in (y axis); default 12 log-spaced in 0.001..2")
    f3.add_argument("--alpha", type=float, default=1.0, help="Renyi order of panel (a); 1 = Shannon, as Fig. 3")
    f3.add_argument("--init", default="kaiming_uniform", choices=RANDOM_A_INITS, help="A init (Var(A) = k / n_in for each)")
    f3.add_argument("--seed", type=int, default=0, help="seed for the A draws")
    args = p.parse_args(argv)
    with cli.usage_errors():  # every check (fig3_grid's too) before the folder is made
        cli.check_folder_path(args.out, "--out")
        if args.n_in < 1 or args.seed < 0:
            raise cli.UsageError(f"--n-in must be >= 1 and --seed >= 0, got {args.n_in} and {args.seed}")
        grid = fig3_grid(args.ranks, args.scales, args.n_in, args.alpha, args.init, args.seed)
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "fig3.csv"), os.path.join(args.out, "fig3.png")
    write_fig3_csv(grid, args.ranks, args.scales, args.n_in, args.alpha, csv_path)
    import matplotlib.pyplot as plt
    plt.close(plot_fig3(grid, args.ranks, args.scales, args.n_in, args.alpha, png_path))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
