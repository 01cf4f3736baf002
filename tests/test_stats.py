"""stats.py against printed t tables, hand-computed intervals and scipy (when installed) as independent oracles."""
import math

import pytest

import stats

# Student's t quantiles as printed in standard tables (3 decimals)
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 10: 2.228, 30: 2.042}
T80 = {2: 1.061, 4: 0.941, 8: 0.889, 9: 0.883}


@pytest.mark.parametrize("df,q", sorted(T975.items()))
def test_t975_matches_printed_table(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)


@pytest.mark.parametrize("df,q", sorted(T80.items()))
def test_t80_matches_printed_table(df, q):
    assert stats.t_quantile(0.8, df) == pytest.approx(q, abs=6e-4)


def test_t_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 20, 200):
        for t in (-6.0, -1.3, -0.2, 0.0, 0.4, 2.1, 9.0):
            assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)
        for p in (0.025, 0.5, 0.8, 0.975, 0.999):
            assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-8)


def test_effect_interval_by_hand():
    e = stats.effect([1.0, 2.0, 3.0], delta=2)  # mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.4843
    assert (e["mean"], e["sd"], e["n"]) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert (e["lo"], e["hi"]) == (pytest.approx(2 - 2.4843, abs=1e-3), pytest.approx(2 + 2.4843, abs=1e-3))
    assert e["verdict"] == "inconclusive"
    assert stats.effect([1.0, 2.0, 3.0], delta=5)["verdict"] == "no effect"
    assert stats.effect([1.0, 2.0, 3.0], paper_sign=-1, delta=5)["verdict"] == "no effect"


@pytest.mark.parametrize("lo,hi,sign,delta,want", [
    (0.5, 3.0, 1, 2, "replicated"), (-3.0, -0.5, 1, 2, "opposite"), (-3.0, -0.5, -1, 2, "replicated"),
    (-1.0, 1.5, 1, 2, "no effect"), (-1.0, 2.5, 1, 2, "inconclusive"), (-2.0, 1.0, 1, 2, "inconclusive"),
    (0.1, 0.3, 1, 2, "replicated"),  # excluding 0 takes precedence over a small size
])
def test_verdict_kinds(lo, hi, sign, delta, want):
    assert stats.verdict(lo, hi, sign, delta) == want


def test_one_seed_is_inconclusive():
    e = stats.effect([5.0], delta=1)
    assert math.isinf(e["hi"]) and e["verdict"] == "inconclusive"


def test_seeds_needed_by_hand():
    # n = 9: (2.306 + 0.889) / 3 = 1.065 > 1; n = 10: (2.262 + 0.883) / sqrt(10) = 0.9946 <= 1
    assert stats.seeds_needed(1.0, 1.0) == 10
    assert stats.seeds_needed(-1.0, 1.0) == 10
    assert stats.seeds_needed(0.0, 1.0) is None and stats.seeds_needed(1e-4, 1.0) is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal numbers"):
        stats.paired([1, 2], [1])
    with pytest.raises(ValueError, match="paper_sign"):
        stats.effect([1, 2], paper_sign=0)
    with pytest.raises(ValueError, match="standard deviation"):
        stats.seeds_needed(1.0, 0.0)
