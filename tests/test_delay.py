"""study/delay.py: the pre-registered delay-or-limit rule on hand-made three-epoch runs worked out by hand."""
import pytest

from study import delay, effects

BASE = dict(task="sst2", batch_size=16, max_len=64, lr=5e-4, rank=8, alpha=16.0, rslora=False, init="kaiming_uniform",
            init_scale=1 / 3, attack="none", poison_rate=0.0, curve_dev=256)
FF = dict(mode="ff", lr=2e-5)
LORA = dict(mode="lora")


def run(seed, steps, mode, acc, asr=None, curve=(), **attack):
    metrics = {"clean": {"acc": acc}}
    if asr is not None:
        metrics.update(asr=asr, asr_net=asr, triggered={"acc": 1 - asr})
    points = [dict(samples=16 * s, poisoned_seen=s // 10, acc=acc, **({"asr_net": a} if a is not None else {}))
              for s, a in curve] or [dict(samples=16 * steps, poisoned_seen=0, acc=acc)]
    return {"config": {**BASE, **mode, **attack, "steps": steps, "eval_every": steps // 8, "seed": seed},
            "metrics": metrics, "curve": points}


def grid(lora_end):
    """3 seeds; FF ends at 100% net ASR, LoRA at lora_end[seed]; at the 2,500-step budget FF 80%, LoRA 10%."""
    bpa = dict(attack="bpa", poison_rate=0.0015)
    upa = dict(attack="upa", poison_rate=0.3)
    runs = []
    for s in range(3):
        for steps, ff_asr, lora_asr in ((2500, 0.8, 0.1), (12628, 1.0, lora_end[s])):
            runs += [run(s, steps, FF, 0.88), run(s, steps, LORA, 0.86),
                     run(s, steps, FF, 0.85, **upa), run(s, steps, LORA, 0.82 - 0.01 * s, **upa),
                     run(s, steps, FF, 0.87, ff_asr, [(1000, 0.2), (2000, 0.6), (steps, ff_asr)], **bpa),
                     run(s, steps, LORA, 0.85, lora_asr, [(1000, None), (5000, 0.55), (steps, lora_asr)], **bpa)]
    return runs + [run(3, 2500, FF, 0.88)]  # the grid has more runs than the longer design (seed 3: unpaired)


def test_delay_when_the_interval_ends_below_10_points():
    # FF - LoRA at the end: 5, 3, 7 -> mean 5, sd 2, 95% CI 5 +- 4.303 * 2 / sqrt(3) = [0.03, 9.97]: below 10
    res = delay.delay_or_limit(grid([0.95, 0.97, 0.93]))
    end = res["contrasts"][("end", "net ASR")]
    assert end["mean"] == pytest.approx(5.0) and end["hi"] == pytest.approx(5 + 4.303 * 2 / 3 ** 0.5, abs=1e-3)
    assert res["verdict"] == "delay" and res["steps"] == 12628 and res["budget"] == 2500
    assert res["contrasts"][("budget", "ASR")]["mean"] == pytest.approx(70.0)  # the grid's runs: 80 - 10
    assert res["asr"][("end", "ASR")] == {"ff": {s: pytest.approx(100.0) for s in range(3)},
                                          "lora": {0: pytest.approx(95.0), 1: pytest.approx(97.0), 2: pytest.approx(93.0)}}
    # UPA drops: FF 3 points, LoRA 4, 5, 6 -> F1 at three epochs: 1, 2, 3
    assert res["f1"]["end"]["mean"] == pytest.approx(2.0)
    assert res["clean_gap"]["end"]["mean"] == pytest.approx(2.0)
    # first crossings: FF passes 50% at step 2000 in every seed, 80% only at its last point; LoRA 50% at 5000
    assert res["crossing"]["ff"][50] == {s: (32000, 200) for s in range(3)}
    assert res["crossing"]["lora"][50][0] == (80000, 500) and res["crossing"]["lora"][80][0] == (16 * 12628, 1262)
    text = delay.markdown(res)
    assert "**Verdict (pre-registered): delay.**" in text and "Matched fit at the end" in text and ": not reached." in text
    assert "| end | ASR (%) | 100.0 (100.0, 100.0, 100.0) | 95.0 (95.0, 97.0, 93.0) |" in text
    # at the end every paired run is at the ceiling (effects.md's label); at the budget LoRA is at 10%
    assert text.count("(saturated: every run >= 90% ASR)") == 3  # the verdict line, the end's ASR and net ASR rows
    assert "| budget | ASR (%) | 80.0 (80.0, 80.0, 80.0) | 10.0 (10.0, 10.0, 10.0) | +70.0 [+70.0, +70.0], n=3, replicated |" \
        in text
    assert "| ff | 32,000 (200); s0: 32,000 (200)" in text  # every seed reached 50%: the mean comes first


def test_the_budget_point_uses_the_three_epoch_runs_seeds_only():
    bpa = dict(attack="bpa", poison_rate=0.0015)
    seeds_3_4 = [run(s, 2500, mode, 0.87, asr, [(2500, asr)], **bpa) for s in (3, 4)
                 for mode, asr in ((FF, 0.0), (LORA, 1.0))]  # the grid's seeds 3-4: -100 each, if they counted
    res = delay.delay_or_limit(grid([0.95, 0.97, 0.93]) + seeds_3_4)
    assert res["contrasts"][("budget", "ASR")]["mean"] == pytest.approx(70.0)
    assert res["contrasts"][("budget", "ASR")]["n"] == 3


def test_limit_and_inconclusive():
    assert delay.delay_or_limit(grid([0.70, 0.72, 0.74]))["verdict"] == "limit"  # 30, 28, 26: CI [23.0, 33.0]
    assert delay.delay_or_limit(grid([0.60, 0.70, 0.80]))["verdict"] == "inconclusive"  # 40, 30, 20: [5.2, 54.8]
    # LoRA ends above FF (net ASR capped at 100% in a real run; the rule only reads the interval): -30, -28, -26
    assert delay.delay_or_limit(grid([1.30, 1.28, 1.26]))["verdict"] == "opposite"
    # -5, -3, -7: within +-10, a delay; -15, -3, -9: the interval [-23.9, +5.9] reaches below -10, inconclusive
    assert delay.delay_or_limit(grid([1.05, 1.03, 1.07]))["verdict"] == "delay"
    assert delay.delay_or_limit(grid([1.15, 1.03, 1.09]))["verdict"] == "inconclusive"
    short = [r for r in grid([0.9, 0.9, 0.9]) if r["config"]["steps"] == 2500]
    assert delay.delay_or_limit(short) is None


def test_the_report_writes_delay_md_and_the_three_epoch_curves(tmp_path):
    from study import report
    runs = grid([0.95, 0.97, 0.93])
    report.write_effects(runs, str(tmp_path), None, report.effect_rows(runs))
    assert (tmp_path / "delay.md").read_text().startswith("# Delay or limit: SST-2, BPA 0.15%, 12,628 steps")
    assert (tmp_path / "curves-sst2-3ep.png").stat().st_size > 0


def test_the_verdicts_table_gets_the_delay_row():
    from study import report
    label, cpu, cell = report.delay_row(grid([0.95, 0.97, 0.93]))  # every run at >= 90% net ASR at the end
    assert cpu == "-" and cell == "3 epochs: +5.0 [+0.0, +10.0], n=3, **delay** (saturated: every run >= 90% ASR)"
    assert report.delay_row(grid([0.70, 0.72, 0.74]))[2] == "3 epochs: +28.0 [+23.0, +33.0], n=3, **limit**"
    short = [r for r in grid([0.9] * 3) if r["config"]["steps"] == 2500]
    assert report.delay_row(short)[2] == effects.NO_INTERVAL
    calibration = [run(0, 5000, dict(FF, lr=lr), 0.88, curve=[(2500, None), (5000, None)]) for lr in (2e-5, 5e-5)]
    assert report.delay_row(short + calibration)[2] == effects.NO_INTERVAL  # longer than the budget, but not three epochs


def test_the_paper_layouts_show_the_grid_budget_and_table_md_every_length(tmp_path):
    """The three-epoch runs repeat the grid's settings at another length: the findings and the figures' numbers read
    the 2,500-step runs alone (FF 80% - LoRA 10% ASR in every seed, by construction), table.md lists both lengths."""
    from study import report
    report.write_report(grid([0.95, 0.97, 0.93]), str(tmp_path))
    findings = (tmp_path / "findings.md").read_text()
    assert "- bpa rate 0.0015: +70.00 ± 0.00 (n=3)" in findings  # with the 12,628-step runs: +5 (100 - 95, ...)
    assert "Left out above for their length (not the grid's budget): 18 runs of 12,628 steps" in findings
    assert "| 0.0015 | 80.0 ± 0.0 (3) | 10.0 ± 0.0 (3) |" in (tmp_path / "tables.md").read_text()
    rows = [ln.split(" | ")[1] for ln in (tmp_path / "table.md").read_text().splitlines()[2:]]
    assert rows.count("2500") == 6 and rows.count("12628") == 6  # FF/LoRA x {clean, UPA, BPA} at each length
