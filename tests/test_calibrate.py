"""study/calibrate.py: the converged protocol's rule on hand-made curves whose answer is worked out by hand."""
import pytest

from study import calibrate


def curve(values, every=250):
    return [(every * (i + 1), v) for i, v in enumerate(values)]


FLAT = [0.90] * 20  # steps 250..5000


def test_plateau_is_the_mean_from_step_3750():
    c = curve([0.5] * 14 + [0.80, 0.82, 0.84, 0.86, 0.88, 0.90])  # steps 3750..5000 hold the last six values
    assert calibrate.plateau(c) == pytest.approx(0.85)


def test_smoothed_uses_the_neighbours_and_two_at_the_end():
    c = curve([0.1, 0.2, 0.3, 0.4])
    assert calibrate.smoothed(c, 500) == pytest.approx(0.2)
    assert calibrate.smoothed(c, 250) == pytest.approx(0.15)
    assert calibrate.smoothed(c, 1000) == pytest.approx(0.35)


def test_budget_by_hand():
    # LoRA climbs 0.80, 0.84, 0.88, then 0.90 for good; FF is 0.90 throughout (plateaus 0.90 and 0.90).
    # a_LoRA(250) = 0.82, a(500) = 0.84, a(750) = (0.84 + 0.88 + 0.90) / 3 = 0.8733, a(1000) = 0.8933 >= 0.89:
    # the first step with both within 1 point of their plateau and of each other is 1000.
    lora = curve([0.80, 0.84, 0.88] + [0.90] * 17)
    d = calibrate.choose({"lora": {5e-4: lora}, "ff": {2e-5: curve(FLAT)}})
    assert d["budget"] == 1000 and d["matched"]
    assert d["at_budget"]["lora"] == pytest.approx((0.88 + 0.90 + 0.90) / 3)


def test_learning_rate_with_the_highest_plateau_wins():
    slow_but_high = curve([0.70] * 10 + [0.92] * 10)
    fast_but_low = curve([0.88] * 20)
    d = calibrate.choose({"lora": {1e-4: slow_but_high, 1e-3: fast_but_low}, "ff": {2e-5: curve([0.92] * 20)}})
    assert d["lr"]["lora"] == 1e-4
    assert d["budget"] == 3000  # a(2750) = (0.70 + 0.92 + 0.92) / 3 = 0.847 < 0.91; a(3000) = 0.92


def test_no_matched_fit_falls_back_and_says_so():
    d = calibrate.choose({"lora": {5e-4: curve([0.85] * 20)}, "ff": {2e-5: curve([0.80] + [0.90] * 19)}})
    # a_FF(250) = 0.85 and a_FF(500) = 0.867 are below 0.89, a_FF(750) = 0.90; LoRA sits at its own plateau 0.85,
    # 5 points under FF from step 750 on, so matched fit (met only at 250) never coincides with both near plateau
    assert not d["matched"] and d["budget"] == 750


def test_the_pair_tasks_curves_say_they_used_a_dev_subset():
    line = lambda task, n, final: {"config": {"task": task, "attack": "none", "steps": 5000},
                                   "curve": [{"step": 250, "n": n}, {"step": 5000, "n": final}]}
    lines = [line("sst2", 872, 872), line("qnli", 1000, 5463), line("qnli", 1000, 5463)]
    assert calibrate.dev_used(lines, "sst2") == "whole dev set"
    assert calibrate.dev_used(lines, "qnli") == "a fixed 1,000-row dev subset, the last point the final dev set"
