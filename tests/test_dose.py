"""study/dose.py: the pre-registered dose rule (issue 51) on hand-made runs whose crossings, ratios and kept checkpoints
are worked out by hand; the intervals against scipy's t distribution."""
import math

import pytest
from scipy import stats as sps

from study import delay, dose, effects

BASE = dict(task="sst2", batch_size=16, max_len=64, rank=8, alpha=16.0, rslora=False, init="kaiming_uniform",
            init_scale=1 / 3, attack="bpa", poison_pool="any", curve_dev=256)
MODE = {"ff": dict(mode="ff", lr=2e-5), "lora": dict(mode="lora", lr=5e-4)}


def run(mode, seed, rate, nets, poisoned, steps=12628, sel=None, end_net=None):
    """A BPA run whose curve has net ASR `nets` (fractions) at `poisoned` poisoned samples seen, the last point being the
    final one; `sel`: clean accuracy on the selection rows at each intermediate point."""
    curve = [dict(step=i + 1, samples=16 * (i + 1), poisoned_seen=p, acc=0.88, asr=n, asr_net=n)
             for i, (n, p) in enumerate(zip(nets, poisoned))]
    for p, a in zip(curve[:-1], sel or ()):
        p.update(sel_acc=a, sel_n=616)
    end = nets[-1] if end_net is None else end_net
    return {"config": {**BASE, **MODE[mode], "poison_rate": rate, "steps": steps, "seed": seed},
            "metrics": {"clean": {"acc": 0.88}, "asr": end, "asr_net": end}, "curve": curve}


def clean_grid():
    """The grid's budget has to exist for delay.long_runs to tell three-epoch runs apart: 2,500-step clean runs."""
    return [{"config": {**BASE, **MODE[m], "attack": "none", "poison_rate": 0.0, "steps": 2500, "seed": s},
             "metrics": {"clean": {"acc": 0.88}}, "curve": [dict(samples=40000, poisoned_seen=0, acc=0.88)] * 2}
            for m in MODE for s in range(5)]


def t_interval(values):
    n = len(values)
    m, sd = sum(values) / n, math.sqrt(sum((v - sum(values) / n) ** 2 for v in values) / (n - 1))
    half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return m - half, m + half


def test_the_ratio_at_50_percent_paired_by_seed():
    # FF first >= 50% at 40, 50, 60 poisoned samples; LoRA at 100, 100, 150: ratios 2.5, 2, 2.5
    runs = clean_grid()
    for s, (f, lo) in enumerate(((40, 100), (50, 100), (60, 150))):
        runs.append(run("ff", s, 0.0015, [0.1, 0.2, 0.6, 1.0], [10, f - 5, f, 300]))
        runs.append(run("lora", s, 0.0015, [0.0, 0.3, 0.55, 0.9], [10, lo - 5, lo, 300]))
    cell = dose.dose(runs)[0.0015]["ratio"][50]
    logs = [math.log(2.5), math.log(2.0), math.log(2.5)]
    lo, hi = t_interval(logs)
    e = cell["effect"]
    assert e["mean"] == pytest.approx(sum(logs) / 3) and (e["lo"], e["hi"]) == pytest.approx((lo, hi))
    assert cell["verdict"] == ("replicated" if lo > 0 else "inconclusive") and cell["bounded"] == 0
    assert dose.ratio_text(cell).startswith(f"{math.exp(sum(logs) / 3):.2f}x [{math.exp(lo):.2f}, {math.exp(hi):.2f}]")


def test_runs_that_never_reach_or_reach_at_once():
    ff = run("ff", 0, 0.0015, [0.6, 1.0], [20, 300])  # FF at its first point: an upper bound on FF's count
    lora = run("lora", 0, 0.0015, [0.1, 0.2], [20, 300])  # LoRA never: its 300 at the end, a lower bound
    assert dose.seed_ratio(ff, lora) == (pytest.approx(math.log(300 / 20)), "bounded")
    never = run("ff", 0, 0.0015, [0.1, 0.4], [20, 300])
    assert dose.seed_ratio(never, lora) == (None, "FF never reaches it")
    at_once = run("lora", 0, 0.0015, [0.7, 1.0], [20, 300])
    assert dose.seed_ratio(ff, at_once) == (None, "LoRA reaches it at its first point")
    # 80%: FF at 300 (its end point), LoRA never (300 at its end): the ratio 1, a lower bound
    assert dose.seed_ratio(run("ff", 0, 0.0015, [0.6, 0.9], [20, 300]), lora, 80) == (0.0, "bounded")


def test_a_bounded_seed_cannot_make_no_effect():
    # ratios 1.0, 1.02 (bounded: LoRA never reaches), 0.98: the interval sits inside 0.8-1.25, but a lower bound
    # cannot show that the arms need the same poison
    runs = clean_grid()
    for s, (f, lo, lora_nets) in enumerate(((50, 50, [0.1, 0.6, 0.9]), (50, 51, [0.1, 0.2, 0.3]),
                                             (50, 49, [0.1, 0.6, 0.9]))):
        runs.append(run("ff", s, 0.0005, [0.1, 0.6, 1.0], [10, f, 100]))
        runs.append(run("lora", s, 0.0005, lora_nets, [10, lo, 51 if s == 1 else 100]))
    cell = dose.dose(runs)[0.0005]["ratio"][50]
    assert cell["effect"]["verdict"] == "no effect" and cell["verdict"] == "inconclusive (bounded)"
    assert cell["bounded"] == 1 and "(1 seed a lower bound)" in dose.ratio_text(cell)


def test_the_kept_checkpoint_is_the_best_on_the_selection_rows_never_the_final_point():
    ff = run("ff", 0, 0.0005, [0.1, 0.7, 0.9, 1.0], [5, 20, 40, 100], sel=[0.85, 0.90, 0.90])
    ff["curve"][-1].update(sel_acc=0.99, sel_n=616)  # a final point with selection rows is still no candidate
    assert dose.kept(ff)["step"] == 2  # 0.90 twice: the earlier
    runs = clean_grid()
    for s, (f_net, l_net) in enumerate(((0.9, 0.2), (0.8, 0.3), (0.7, 0.1))):
        runs.append(run("ff", s, 0.0005, [0.1, f_net, 0.5, 1.0], [5, 20, 40, 100], sel=[0.8, 0.9, 0.85]))
        runs.append(run("lora", s, 0.0005, [0.0, 0.6, l_net, 0.4], [5, 20, 40, 100], sel=[0.8, 0.85, 0.9]))
    res = dose.dose(runs)[0.0005]
    diffs = [100 * (0.9 - 0.2), 100 * (0.8 - 0.3), 100 * (0.7 - 0.1)]  # FF kept at step 2, LoRA at step 3
    e = res["kept"]["effect"]
    assert e["mean"] == pytest.approx(sum(diffs) / 3) and (e["lo"], e["hi"]) == pytest.approx(t_interval(diffs))
    assert res["learned"] == {"ff": "learned", "lora": "not learned"}
    assert res["end"]["mean"] == pytest.approx(100 * (1.0 - 0.4))


def test_learned_counts_seeds():
    arm = {s: run("lora", s, 0.0005, [0.1, v], [5, 100]) for s, v in enumerate((0.2, 0.5, 0.7))}
    assert dose.learned(arm) == "learned in 2 of 3 seeds"


def test_the_delay_verdict_stays_on_its_registered_seeds():
    """Seeds 3-4 (the follow-up) do not enter delay_or_limit's registered verdict; dose reports them beside it."""
    runs = clean_grid()
    for s, lora_end in enumerate((0.95, 0.97, 0.93, 0.5, 0.5)):
        runs.append(run("ff", s, 0.0015, [0.2, 0.6, 1.0], [10, 50, 300]))
        runs.append(run("lora", s, 0.0015, [0.0, 0.3, lora_end], [10, 50, 300]))
    assert delay.delay_or_limit(runs)["contrasts"][("end", "net ASR")]["n"] == 3
    every = dose.dose(runs)["delay_all"]
    diffs = [5, 3, 7, 50, 50]
    assert every["n"] == 5 and every["mean"] == pytest.approx(sum(diffs) / 5)
    rows = dict((label, cell) for label, _, cell in dose.verdict_rows(dose.dose(runs)))
    assert rows["Delay or limit, all seeds in (follow-up; the verdict above is on seeds 0-2)"].startswith("3 epochs: +23.0")


def test_markdown_and_figure(tmp_path):
    runs = clean_grid()
    for s in range(3):
        runs.append(run("ff", s, 0.0005, [0.1, 0.7, 1.0], [5, 20, 100], sel=[0.8, 0.9]))
        runs.append(run("lora", s, 0.0005, [0.0, 0.2, 0.4], [5, 20, 100], sel=[0.8, 0.9]))
    res = dose.dose(runs)
    text = dose.markdown(res)
    assert "## BPA 0.05% (3 epochs)" in text and "| 0 | 20 (0.0k) | 100 (0.0k) | - | - | 5.00 (lower bound) |" in text
    assert "learned in 3 epochs (net ASR >= 50% at the end): FF learned, LoRA r8 not learned" in text
    assert "s0: FF step 2 (90.0% on 616 rows, net ASR 70.0), LoRA r8 step 2 (90.0% on 616 rows, net ASR 20.0)" in text
    assert dose.draw(res, str(tmp_path / "d.png")) and (tmp_path / "d.png").stat().st_size > 0
    assert not dose.draw(None, str(tmp_path / "none.png"))


def test_an_end_contrast_at_the_ceiling_carries_the_saturated_label():
    """As in effects.md and delay.md: every paired run at >= 90% net ASR at the end reads '(saturated: ...)'."""
    runs = clean_grid()
    for s, lora_end in enumerate((0.95, 0.97, 0.93)):  # FF ends at 100%, LoRA at 93-97%: every run at the ceiling
        runs.append(run("ff", s, 0.0015, [0.2, 0.6, 1.0], [10, 50, 300]))
        runs.append(run("lora", s, 0.0015, [0.0, 0.3, lora_end], [10, 50, 300]))
    end = dose.dose(runs)[0.0015]["end"]
    assert end["saturated"] and dose.asr_text(end).startswith("+5.0 [") and effects.SATURATED in dose.asr_text(end)
    runs[-1] = run("lora", 2, 0.0015, [0.0, 0.3, 0.85], [10, 50, 300])  # one LoRA run below the ceiling
    assert not dose.dose(runs)[0.0015]["end"]["saturated"]


def test_a_ratio_on_runs_seen_before_the_rule_says_post_hoc():
    """0.45% and 0.15% seeds 0-2 ran before the rule was written (dose.SEEN): their cells say so, counting the seeds."""
    runs = clean_grid()
    for s in range(4):
        runs.append(run("ff", s, 0.0015, [0.1, 0.2, 0.6, 1.0], [10, 30, 40, 300]))
        runs.append(run("lora", s, 0.0015, [0.0, 0.3, 0.55, 0.9], [10, 60, 80 + s, 300]))
    text = dose.ratio_text(dose.dose(runs)[0.0015]["ratio"][50])
    assert text.endswith("(post hoc: 3 of 4 seeds ran before the rule)")
    low = [dict(r, config={**r["config"], "poison_rate": 0.0005}) for r in runs if r["config"]["attack"] == "bpa"]
    assert "post hoc" not in dose.ratio_text(dose.dose(clean_grid() + low)[0.0005]["ratio"][50])
