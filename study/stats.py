"""
The statistics behind every verdict in results/REPORT.md: per-seed paired differences, their 95% t-interval, the
four verdict kinds, and how many seeds an effect would need; and the rank correlations behind "does X predict
robustness" (Spearman's rho, its permutation p-value, a bootstrap interval over measurement noise).

    d = paired([0.91, 0.88, 0.90], [0.85, 0.86, 0.84])      # per-seed differences a_i - b_i
    e = effect(d, paper_sign=+1, delta=0.02)                 # mean, 95% CI, n, verdict
    seeds_needed(effect_size=0.05, sd=0.04)                  # seeds for 80% power at that noise (exact t power)
    spearman(x, y), spearman_p(x, y)                         # rho and its two-sided permutation p-value
    holm([0.01, 0.04, 0.03])                                 # family-wise adjusted p-values

Verdicts (defined once, here and in REPORT.md), with the interval oriented so that + is the paper's direction:
    replicated    the interval excludes 0 on the paper's side
    opposite      the interval excludes 0 on the other side
    no effect     the interval lies inside (-delta, +delta)
    inconclusive  none of these: the interval is too wide to tell

Student's t quantiles come from the regularised incomplete beta function (continued fraction, Lentz's method), and
the noncentral t behind the power of a t-interval from a one-dimensional integral (Simpson's rule), so the module
needs nothing beyond the standard library.
"""
import functools
import math

VERDICTS = ("replicated", "opposite", "no effect", "inconclusive")


def paired(a, b):
    """Per-seed differences a_i - b_i of two equal-length lists (seed i of a paired with seed i of b)."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need equal numbers of seeds (got {len(a)} and {len(b)})")
    return [x - y for x, y in zip(a, b)]


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def spread_text(mean, sd, n, spec=".1f"):
    """"mean ± sd" as text; a single value has no spread to show, so just "mean"."""
    return f"{mean:{spec}} ± {sd:{spec}}" if n > 1 else f"{mean:{spec}}"


def effect_text(e, verdict=None, bold=False):
    """An effect (from `effect`) as text: 'mean [lo, hi], n=N, verdict' in points to one decimal."""
    v = verdict or e["verdict"]
    return f"{interval_text(e)}, n={e['n']}, " + (f"**{v}**" if bold else v)


def interval_text(e, scale=1):
    """'mean [lo, hi]' of an effect, signed, to one decimal, each multiplied by `scale` (100: shares as points)."""
    return f"{scale * e['mean']:+.1f} [{scale * e['lo']:+.1f}, {scale * e['hi']:+.1f}]"


def effect(diffs, paper_sign=1, delta=0.0, level=0.95):
    """Mean of the paired differences, its t-interval and the verdict, as a dict.

    paper_sign: +1 if the paper predicts a positive difference, -1 if negative. delta: the 'no effect' margin, in
    the same units as the differences."""
    if paper_sign not in (1, -1):
        raise ValueError(f"paper_sign must be +1 or -1, got {paper_sign!r}")
    n = len(diffs)
    if n == 0:
        raise ValueError("an effect needs at least one paired difference")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("inf")
    lo, hi = mean - half, mean + half
    return dict(mean=mean, sd=sd, n=n, lo=lo, hi=hi, verdict=verdict(lo, hi, paper_sign, delta))


def verdict(lo, hi, paper_sign=1, delta=0.0):
    """The verdict kind of an interval [lo, hi] (see the module docstring)."""
    lo, hi = sorted((paper_sign * lo, paper_sign * hi))
    if lo > 0:
        return "replicated"
    if hi < 0:
        return "opposite"
    if -delta < lo and hi < delta:
        return "no effect"
    return "inconclusive"


def seeds_needed(effect_size, sd, power=0.8, level=0.95, most=1000):
    """Smallest number of seeds n >= 2 at which a paired t-interval at `level` excludes 0 on the effect's side with
    probability at least `power`, for a true effect `effect_size` at seed-to-seed noise `sd`: the exact power of the
    t-test (t_power), not the normal-style approximation (t_{1-(1-level)/2, n-1} + t_{power, n-1}) sd / sqrt(n) <=
    |effect|, which can be a seed short at n = 2 (power 0.77 where it promised 0.8). None if more than `most` would
    be needed. The power grows with n, so doubling n from 2, then a bisection, finds the first n that reaches it."""
    if not sd > 0:
        raise ValueError(f"the seed-to-seed standard deviation must be > 0, got {sd}")
    if effect_size == 0 or t_power(effect_size, sd, most, level) < power:
        return None
    lo, hi = 1, 2  # t_power(lo) is below `power` (one seed gives no interval); double hi until t_power(hi) reaches it
    while hi < most and t_power(effect_size, sd, hi, level) < power:
        lo, hi = hi, min(2 * hi, most)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t_power(effect_size, sd, mid, level) >= power else (mid, hi)
    return hi


def t_power(effect_size, sd, n, level=0.95):
    """The probability that a paired t-interval at `level` over n seeds excludes 0 on the side of a true effect
    `effect_size` at seed-to-seed noise `sd`: P(T > t_{1-(1-level)/2, n-1}) for T noncentral t with n - 1 degrees of
    freedom and noncentrality |effect| sqrt(n) / sd. 0 for one seed (no interval)."""
    if n < 2:
        return 0.0
    return nct_sf(t_quantile(0.5 + level / 2, n - 1), n - 1, abs(effect_size) * math.sqrt(n) / sd)


# -----------------------------------------------------------------------------
# rank correlation: Spearman's rho, its exact permutation p-value, and a bootstrap interval over measurement noise

def ranks(values):
    """1-based ranks of values; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x, y):
    """Spearman's rank correlation: the Pearson correlation of the ranks (average ranks for ties); nan if either
    sample is constant."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"spearman needs two equal-length samples of at least 3 (got {len(x)}, {len(y)})")
    return _pearson(ranks(list(x)), ranks(list(y)))


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    sab = sum((u - ma) * (v - mb) for u, v in zip(a, b))
    saa, sbb = sum((u - ma) ** 2 for u in a), sum((v - mb) ** 2 for v in b)
    return float("nan") if saa == 0 or sbb == 0 else sab / math.sqrt(saa * sbb)


def spearman_p(x, y, exact_up_to=8, draws=20000, seed=0):
    """Two-sided permutation p-value of Spearman's rho under 'no association': the share of orderings of y whose
    |rho| is at least the observed one. Exact (all n! orderings) for n <= exact_up_to, else `draws` seeded random
    orderings (the observed one counted, so p >= 1/(draws + 1)). Reordering y reorders its ranks, so the ranks are
    computed once."""
    import itertools
    import random
    observed = abs(spearman(x, y))
    if math.isnan(observed):
        return float("nan")
    rx, ry = ranks(list(x)), ranks(list(y))
    hit = lambda perm: abs(_pearson(rx, perm)) >= observed - 1e-12
    if len(x) <= exact_up_to:
        perms = list(itertools.permutations(ry))
        return sum(hit(p) for p in perms) / len(perms)
    rng = random.Random(seed)
    count = 1
    for _ in range(draws):
        rng.shuffle(ry)
        count += hit(ry)
    return count / (draws + 1)


def spearman_interval(xs, ys, reps=2000, level=0.95, seed=0):
    """Percentile bootstrap interval of Spearman's rho over units (e.g. inits) whose x and y are each a mean of
    repeated measurements (draws, seeds): xs[i] and ys[i] are unit i's measurements, resampled with replacement
    within the unit. It states how much the measurement noise moves rho; it says nothing about which units were
    chosen (the permutation p-value is about that). Replicates with a constant side are left out."""
    import random
    if len(xs) != len(ys) or len(xs) < 3 or not all(xs) or not all(ys):
        raise ValueError("spearman_interval needs at least 3 units, each with at least one x and one y measurement")
    rng = random.Random(seed)
    mean_of_resample = lambda v: sum(rng.choice(v) for _ in v) / len(v)
    rhos = []
    for _ in range(reps):
        rho = spearman([mean_of_resample(v) for v in xs], [mean_of_resample(v) for v in ys])
        if not math.isnan(rho):
            rhos.append(rho)
    if not rhos:
        return float("nan"), float("nan")
    rhos.sort()
    at = lambda q: rhos[min(len(rhos) - 1, max(0, round(q * (len(rhos) - 1))))]
    return at((1 - level) / 2), at((1 + level) / 2)


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (same order as given): reject where adjusted < alpha and
    the family-wise error rate stays at most alpha, for any dependence between the tests."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


# -----------------------------------------------------------------------------
# Student's t distribution

def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


@functools.cache  # a pure function of (p, df), asked again for each power (seeds_needed) and interval
def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom (bisection on t_cdf, to 1e-10)."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def nct_sf(t, df, nc, intervals=2000):
    """P(T > t) for the noncentral t with df degrees of freedom and noncentrality nc, T = (Z + nc) / S with Z standard
    normal and S = sqrt(V / df), V chi-square with df degrees of freedom, independent of Z. Conditioning on S,
    P(T > t) = E[Q(t S - nc)] with Q the normal upper tail, integrated over S's density
    2 (df/2)^(df/2) / Gamma(df/2) s^(df-1) exp(-df s^2 / 2) by Simpson's rule on [1 - 8/sqrt(df), 1 + 8/sqrt(df)]
    (cut at 0), where all but about 1e-13 of S's mass lies; the step also resolves Q's edge, 1/|t| wide."""
    if not df >= 1:  # below 1 the density of S is infinite at 0, which the rule below does not integrate
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = max(0.0, 1 - 8 / math.sqrt(df)), 1 + 8 / math.sqrt(df)
    steps = 2 * math.ceil(max(intervals, 20 * (hi - lo) * abs(t)) / 2)
    h = (hi - lo) / steps
    log_front = math.log(2) + (df / 2) * math.log(df / 2) - math.lgamma(df / 2)

    def integrand(s):
        if s <= 0:
            return 0.0 if df > 1 else math.exp(log_front) * 0.5 * math.erfc(-nc / math.sqrt(2))
        density = math.exp(log_front + (df - 1) * math.log(s) - df * s * s / 2)
        return density * 0.5 * math.erfc((t * s - nc) / math.sqrt(2))

    total = integrand(lo) + integrand(hi) + sum((4 if k % 2 else 2) * integrand(lo + k * h) for k in range(1, steps))
    return min(1.0, max(0.0, total * h / 3))


def _betainc(a, b, x):
    """Regularised incomplete beta function I_x(a, b) by its continued fraction (Numerical Recipes, 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point; use the symmetry there
        return 1.0 - _betainc(b, a, 1 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a, b, x, tiny=1e-300, eps=1e-15):
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")
