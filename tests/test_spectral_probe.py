"""study/spectral_probe.py on Gaussian data whose answer is known: a poison whose mean shift outweighs the clean
spread is the label's top direction; one hidden under a larger clean direction is not, and only its own direction
finds it."""
import math

import pytest
import torch

from study import spectral_probe


def gaussian_label(shift, clean_sd, n_clean=2000, n_poison=50, dims=20, seed=0):
    """Label 1: n_clean rows N(0, diag(clean_sd^2)) and n_poison rows shifted by `shift`; label 0: 300 rows N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n_clean, dims, generator=g) * clean_sd
    poison = torch.randn(n_poison, dims, generator=g) + shift
    other = torch.randn(300, dims, generator=g)
    reps = torch.cat([other, clean, poison])
    labels = [0] * 300 + [1] * (n_clean + n_poison)
    return reps, labels, list(range(300 + n_clean, len(reps)))


def test_a_shift_larger_than_the_clean_spread_is_the_top_direction():
    # eps = 50 / 2050, |d| = 10, clean covariance I: separation = eps (1 - eps) 100 / 1 = 2.38 (lambda_1 of 2,000
    # samples in 20 dims is about (1 + sqrt(20 / 2000))^2 = 1.21, so 1.9-2.4)
    shift = torch.zeros(20)
    shift[3] = 10.0
    m = spectral_probe.probe(*gaussian_label(shift, torch.ones(20)), target=1)
    assert m["n_rows"] == 2050 and m["n_poisoned"] == 50
    assert 1.7 < m["separation"] < 2.5, m
    assert m["auroc_top"] > 0.99 and m["auroc_d"] > 0.99 and m["top_dirs"][0] == pytest.approx(m["auroc_top"], abs=1e-4)


def test_a_poison_under_a_larger_clean_direction_is_missed_by_the_top_direction():
    # the clean rows spread with sd 5 along e_0, the poisoned ones with sd 1, shifted by 4 along e_5: separation =
    # eps (1 - eps) 16 / 25 = 0.015. The top direction is e_0, where the poisoned rows sit near the centre: their
    # AUROC is P(|z'| > 5 |z|) for independent standard normals, (2 / pi) arctan(1 / 5) = 0.126, below chance (sd
    # about 0.03 with 50 poisoned rows). e_5 carries the second largest variance, 1 + eps (1 - eps) 16 = 1.38, and
    # separates them
    sd = torch.ones(20)
    sd[0] = 5.0
    shift = torch.zeros(20)
    shift[5] = 4.0
    m = spectral_probe.probe(*gaussian_label(shift, sd), target=1)
    assert 0.008 < m["separation"] < 0.025, m
    assert abs(m["auroc_top"] - 2 / math.pi * math.atan(1 / 5)) < 0.07, m
    assert m["auroc_d"] > 0.97 and m["top_dirs"][1] > 0.97, m


def test_a_label_without_poisoned_rows_is_refused():
    reps, labels, poisoned = gaussian_label(torch.zeros(20), torch.ones(20))
    with pytest.raises(ValueError, match="label 0 needs both"):
        spectral_probe.probe(reps, labels, poisoned, target=0)
