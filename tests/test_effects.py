"""study/effects.py: paired effects on hand-made results whose differences are worked out by hand."""
import json
import math

import pytest

from study import effects

BASE = dict(task="sst2", steps=300, batch_size=16, max_len=64, mode="lora", lr=5e-4, rank=8, alpha=16.0, rslora=False,
            init="kaiming_uniform", init_scale=1 / 3, attack="none", poison_rate=0.0)


def run(seed, acc, asr=None, asr_net=None, **cfg):
    metrics = {"clean": {"acc": acc}}
    if asr is not None:
        metrics.update(asr=asr, asr_net=asr_net)
    return {"config": {**BASE, **cfg, "seed": seed}, "metrics": metrics}


FF = dict(mode="ff", lr=3e-5)


def upa_runs():
    # LoRA drops 5, 7, 9 points; FF drops 2, 3, 4 -> extra drop 3, 4, 5: mean 4, sd 1, CI 4 +- 4.303 / sqrt(3)
    rows = []
    for s, (ld, fd) in enumerate(((5, 2), (7, 3), (9, 4))):
        rows += [run(s, 0.80), run(s, 0.80 - ld / 100, attack="upa", poison_rate=0.3),
                 run(s, 0.82, **FF), run(s, 0.82 - fd / 100, attack="upa", poison_rate=0.3, **FF)]
    return rows


def test_f1_extra_drop_by_hand():
    (row,) = [r for r in effects.effects(upa_runs()) if r["finding"] == "F1"]
    assert row["mean"] == pytest.approx(4.0) and row["n"] == 3
    assert row["lo"] == pytest.approx(4 - 4.303 / 3 ** 0.5, abs=1e-3)
    assert row["verdict"] == "replicated"


def test_runs_of_another_context_are_not_paired():
    rows = upa_runs()
    rows[1]["config"]["steps"] = 999  # seed 0's LoRA UPA run now belongs to another protocol: seed 0 drops out
    (row,) = [r for r in effects.effects(rows) if r["finding"] == "F1"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(4.5)


def test_a_longer_run_of_the_same_design_is_named_by_its_length():
    """The three-epoch runs sit beside the grid's: their cells must not share the grid's labels (the verdicts table
    picks cells by label)."""
    longer = [dict(r, config=dict(r["config"], steps=900)) for r in upa_runs()[:8]]  # seeds 0-1, three times longer
    rows = {r["condition"]: r for r in effects.effects(upa_runs() + longer) if r["finding"] == "F1"}
    assert set(rows) == {"UPA 0.3", "UPA 0.3, 900 steps"}
    assert rows["UPA 0.3"]["n"] == 3 and rows["UPA 0.3, 900 steps"]["mean"] == pytest.approx(3.5)


def test_e1_backdoors_are_f2_cells_under_their_own_names():
    rows = []
    for s, (f, l) in enumerate(((0.9, 0.3), (1.0, 0.5), (0.8, 0.4))):  # FF - LoRA: 60, 50, 40
        rows += [run(s, 0.8, asr=f, asr_net=f, attack="mt", poison_rate=0.0015, **FF),
                 run(s, 0.8, asr=l, asr_net=l, attack="mt", poison_rate=0.0015)]
    (row,) = [r for r in effects.effects(rows) if r["what"] == "ASR FF - LoRA"]
    assert row["finding"] == "F2" and row["condition"] == "MT 0.15%" and row["mean"] == pytest.approx(50.0)


def test_f2_raw_and_net_by_hand():
    rows = []
    for s, (f, l) in enumerate(((0.9, 0.3), (1.0, 0.5), (0.8, 0.4))):  # FF - LoRA: 60, 50, 40
        rows += [run(s, 0.8, asr=f, asr_net=f - 0.1, attack="bpa", poison_rate=0.0045, **FF),
                 run(s, 0.8, asr=l, asr_net=l, attack="bpa", poison_rate=0.0045)]  # net: 50, 40, 30
    f2 = {r["what"]: r for r in effects.effects(rows) if r["finding"] == "F2"}
    assert f2["ASR FF - LoRA"]["mean"] == pytest.approx(50.0)
    assert f2["net ASR FF - LoRA"]["mean"] == pytest.approx(40.0)
    assert f2["ASR FF - LoRA"]["condition"] == "BPA 0.45%"


def test_asr_contrast_at_the_ceiling_is_marked_saturated():
    from study import report
    def f2(lora_asrs):
        rows = []
        for s, (f, l) in enumerate(zip((0.97, 0.96, lora_asrs[-1]), lora_asrs)):  # FF - LoRA: 1, 2, 0
            rows += [run(s, 0.8, asr=f, asr_net=f, attack="bpa", poison_rate=0.0045, **FF),
                     run(s, 0.8, asr=l, asr_net=l, attack="bpa", poison_rate=0.0045)]
        return effects.effects(rows)
    rows = f2((0.96, 0.94, 0.90))  # every paired run at >= 90% ASR: the contrast measures the ceiling
    assert all(r["saturated"] for r in rows if r["finding"] == "F2")
    cell = report.headline_cell(rows, "F2", "sst2", "BPA 0.45%", "ASR FF - LoRA")
    assert cell.endswith("**no effect** (saturated: every run >= 90% ASR)")
    rows = f2((0.96, 0.94, 0.89))  # one seed's runs below the ceiling: not saturation
    assert not any(r["saturated"] for r in rows if r["finding"] == "F2")
    assert "saturated" not in effects.markdown(rows)


def test_f3_rank_contrast_uses_the_extremes():
    rows = []
    for s in range(3):
        for rank, a in ((4, 0.2), (64, 0.9), (384, 0.5 + 0.1 * s)):  # ASR(384) - ASR(4) = 30, 40, 50
            rows.append(run(s, 0.8, asr=a, asr_net=a, rank=rank, attack="bpa", poison_rate=0.0045))
    (row,) = [r for r in effects.effects(rows) if r["finding"] == "F3"]
    assert row["mean"] == pytest.approx(40.0) and "rank 4 vs 384" in row["condition"]


def test_two_runs_for_one_seed_is_an_error():
    rows = upa_runs() + [run(0, 0.5)]
    with pytest.raises(ValueError, match="two runs"):
        effects.effects(rows)


def test_curves_mean_over_seeds_and_incomplete_points_dropped():
    rows = []
    for s, accs in enumerate(((0.6, 0.7, 0.8), (0.8, 0.9))):  # seed 1 has no third point yet
        r = run(s, accs[-1], asr=0.5, asr_net=0.5, attack="bpa", poison_rate=0.0045)
        r["curve"] = [{"step": 10 * (i + 1), "samples": 160 * (i + 1), "poisoned_seen": i + s, "acc": a, "asr": 0.5}
                      for i, a in enumerate(accs)]
        rows.append(r)
    pts = effects.curves(rows, "sst2", "bpa", 0.0045, effects.BASELINE)
    assert [p["samples"] for p in pts] == [160, 320]
    assert pts[0]["acc"] == pytest.approx(70.0) and pts[0]["acc_sd"] == pytest.approx(2 ** 0.5 * 10)
    assert pts[1]["poisoned"] == pytest.approx(1.5)  # poisoned seen, mean of 1 and 2
    assert pts[0]["asr"] == pytest.approx(50.0) and math.isnan(pts[0]["asr_net"])  # no net ASR recorded


def test_verdicts_table_cells():
    from study import report
    rows = effects.effects(upa_runs())
    cell = report.headline_cell(rows, "F1", "sst2", "UPA 0.3", None)
    assert cell == "UPA 0.3: +4.0 [+1.5, +6.5], n=3, **replicated**"  # 4 +- 4.303 / sqrt(3) = 4 +- 2.48
    assert report.headline_cell(rows, "F2", "sst2", "BPA 1%", None) == effects.NO_INTERVAL
    table = report.verdicts({"cpu": rows})
    assert "| F1: UPA 0.3, LoRA's extra accuracy drop | UPA 0.3: +4.0" in table
    row = dict(finding="F1", task="sst2", condition="UPA 0.3", what="x", mean=-0.9, lo=-2.6, hi=0.9, n=5,
               verdict="inconclusive", saturated=False, seeds_needed=65, ref=0.5)
    assert report.headline_cell([row], "F1", "sst2", "UPA 0.3", None) == \
        "UPA 0.3: -0.9 [-2.6, +0.9], n=5, **inconclusive**; seeds for the reference effect: 65 (for 0.5)"
    assert report.headline_cell([dict(row, seeds_needed=None)], "F1", "sst2", "UPA 0.3", None).endswith(
        "> 1000 (for 0.5)")


def test_the_second_model_is_a_verdicts_column_of_its_own_rows():
    from study import report
    first, second = effects.effects(upa_runs()), effects.effects(upa_runs()[:8])  # n = 3 and n = 2 (seeds 0-1)
    lines = report.verdicts({"conv": first, "conv-mpnet": second}).splitlines()
    assert lines[0] == "| finding | `conv` | `conv-mpnet` |"
    f1 = next(ln for ln in lines if ln.startswith("| F1: UPA 0.3")).split(" | ")
    assert f1[1:] == ["UPA 0.3: +4.0 [+1.5, +6.5], n=3, **replicated**",
                      # sd 0.71, d = 0.5 / 0.71: (1.96 + 0.84)^2 / d^2 = 16 seeds by the normal approximation, t: more
                      "UPA 0.3: +3.5 [-2.9, +9.9], n=2, **inconclusive**; seeds for the reference effect: 18 (for 0.5) |"]
    assert next(ln for ln in lines if ln.startswith("| F1 on QNLI")).endswith(" | - |")  # SST-2's cells only


def test_splice_replaces_only_the_marked_table(tmp_path, capsys):
    from study import report
    path = tmp_path / "REPORT.md"
    (begin, end), (zoo_begin, zoo_end) = report.markers("verdicts"), report.markers("zoo")
    assert begin == "<!-- verdicts: regenerated by `python -m study.report all`; edits between these markers are overwritten -->"
    path.write_text(f"# R\n\n{begin}\n| old |\n{end}\n\n(State of then)\n\n{zoo_begin}\n| old zoo |\n{zoo_end}\n")
    report.splice(str(path), "| new |\n|---|")
    report.splice(str(path), "| new zoo |", "zoo")
    assert path.read_text() == (f"# R\n\n{begin}\n| new |\n|---|\n{end}\n\n(State of then)\n\n"
                                f"{zoo_begin}\n| new zoo |\n{zoo_end}\n")
    unmarked = tmp_path / "FORK.md"
    unmarked.write_text("# a fork's report\n")
    report.splice(str(unmarked), "| new |")
    assert unmarked.read_text() == "# a fork's report\n" and "no '<!-- verdicts" in capsys.readouterr().out


def test_compute_used_sums_each_runs_wall_time():
    from study import report
    assert report.compute_used([{"wall_s": 1800.0}, {"wall_s": 5400.0}, {}]).startswith("3 runs, 2.0 run-hours")


def test_thm36_rows_count_settings_over_all_their_draws(tmp_path):
    from study import report
    def pair(rank, ib_l, h_l, seed):  # FF: IB 10, H 2 at every alpha
        val = lambda ib, h: {"ib": ib, "ib_f64": ib, "h0.5": h, "h1": h, "h2": h}
        return {"rank": rank, "k": 1 / 3, "alpha": 16.0, "rslora": False, "seed": seed,
                "sets": {"adapted": {"lora": val(ib_l, h_l), "ff": val(10.0, 2.0)}}}
    rows = [pair(8, 9.0, 2.5, s) for s in range(4)]  # rank 8: IB below, H above, in all 4 draws
    rows += [pair(64, 9.0, 1.5, 0), pair(64, 11.0, 1.5, 1)]  # rank 64: H below in both, IB below in one only
    (tmp_path / "theory").mkdir()
    (tmp_path / "theory" / "runs.json").write_text(json.dumps({"rows": rows}))
    (ib_row, ib_cell), (h_row, h_cell) = [(r[0], r[2]) for r in report.thm36_rows(str(tmp_path))]
    assert ib_row == "Thm 3.6 after clean training: IB_LoRA < IB_FF"
    assert ib_cell == "below in every draw in 1/2 settings (2-4 draws each): **mixed** (float64 cutoff: 1/2)"
    assert h_cell == "below in every draw in 1/2 settings, above in every draw in 1/2 (2-4 draws each): **mixed**"


def test_curves_figure_ignores_runs_of_another_context(tmp_path):
    rows = []
    for s in range(2):
        for cfg in (dict(), dict(attack="upa", poison_rate=0.3), dict(FF), dict(FF, attack="upa", poison_rate=0.3)):
            r = run(s, 0.8, **cfg)
            r["curve"] = [{"step": 10, "samples": 160, "poisoned_seen": 0, "acc": 0.7},
                          {"step": 20, "samples": 320, "poisoned_seen": 0, "acc": 0.8}]
            rows.append(r)
    stray = run(0, 0.9, steps=5000, lr=1e-3)  # a calibration-like clean LoRA run: same seed, another context
    stray["curve"] = rows[0]["curve"]
    assert effects.draw_curves(rows + [stray], "sst2", str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").exists()


# -----------------------------------------------------------------------------
# the init zoo

ZOO = {  # init: (clean acc, UPA acc, BPA ASR) for seed 0; seed 1 adds 0.01 to the accuracies and 0.1 to the ASR
    "kaiming_uniform": (0.86, 0.83, 0.30), "gaussian": (0.85, 0.80, 0.40),
    "pissa": (0.87, 0.86, 0.60), "olora": (0.88, 0.86, 0.70),
}


def zoo_runs(low_rate=False):
    rows = []
    for s in range(2):
        for init, (c, u, b) in ZOO.items():
            rows += [run(s, c + s / 100, init=init), run(s, u + s / 100, init=init, attack="upa", poison_rate=0.3),
                     run(s, 0.8, asr=b + s / 10, asr_net=b, init=init, attack="bpa", poison_rate=0.0045)]
            if low_rate:  # a second BPA rate: the ASR halves
                rows.append(run(s, 0.8, asr=(b + s / 10) / 2, asr_net=b / 2, init=init, attack="bpa", poison_rate=0.0015))
        rows += [run(s, 0.9, **FF), run(s, 0.85, attack="upa", poison_rate=0.3, **FF),
                 run(s, 0.9, asr=1.0, asr_net=1.0, attack="bpa", poison_rate=0.0045, **FF)]
    return rows


def theory_rows(misalign):
    """study/ntk_study.py inits' row shape: two draws per init, the second 0.001 above the first."""
    return [{"init": i, "seed": d, "sets": {"layers": {"misalign": m + d / 1000, "norm_ratio": m, "lora": {"ib": -m, "h1": m}}}}
            for i, m in misalign.items() for d in range(2)]


MISALIGN = {"kaiming_uniform": 0.01, "gaussian": 0.02, "pissa": 0.07, "olora": 0.09}


def test_zoo_measurements_by_hand():
    measured, targets = effects.zoo_measurements(zoo_runs())
    assert [t["label"] for t in targets] == ["clean CACC", "UPA drop", "ASR 0.45%", "net ASR 0.45%"]
    assert list(measured) == ["kaiming_uniform", "gaussian", "olora", "pissa", "ff"]  # baseline first, FF last
    assert measured["gaussian"]["UPA drop"] == pytest.approx([5.0, 5.0])
    assert measured["pissa"]["ASR 0.45%"] == pytest.approx([60.0, 70.0])
    assert measured["pissa"]["net ASR 0.45%"] == pytest.approx([60.0, 60.0])
    assert measured["ff"]["clean CACC"] == pytest.approx([90.0, 90.0])
    assert effects.zoo_measurements([r for r in zoo_runs() if r["config"]["init"] in ("kaiming_uniform", "gaussian")])[0] == {}


def test_zoo_means_are_over_the_zoo_seeds_only():
    """The baseline and FF have extra seeds (F1/F2 ran 5); a seed no other init ran must not enter their means."""
    extra = [run(2, 0.50, init="kaiming_uniform"), run(2, 0.50, **FF),
             run(2, 0.8, asr=1.0, asr_net=1.0, init="kaiming_uniform", attack="bpa", poison_rate=0.0045)]
    measured, _ = effects.zoo_measurements(zoo_runs() + extra)
    assert measured["kaiming_uniform"]["clean CACC"] == pytest.approx([86.0, 87.0])
    assert measured["kaiming_uniform"]["ASR 0.45%"] == pytest.approx([30.0, 40.0])
    assert measured["ff"]["clean CACC"] == pytest.approx([90.0, 90.0])


def test_zoo_every_bpa_rate_is_a_target_highest_first():
    measured, targets = effects.zoo_measurements(zoo_runs(low_rate=True))
    assert [t["label"] for t in targets][2:] == ["ASR 0.45%", "net ASR 0.45%", "ASR 0.15%", "net ASR 0.15%"]
    assert measured["pissa"]["ASR 0.15%"] == pytest.approx([30.0, 35.0])
    assert measured["ff"]["ASR 0.15%"] == []  # FF has no run at that rate


def test_zoo_net_asr_during_training_by_hand():
    """Exploratory target: the mean net ASR over the intermediate evaluations; the last point (whole dev) is left out."""
    runs = zoo_runs()
    for r in runs:
        if r["config"]["attack"] == "bpa":
            b = r["metrics"]["asr_net"]
            r["curve"] = [{"samples": 160, "asr_net": b / 2}, {"samples": 320, "asr_net": b}, {"samples": 330, "asr_net": 0.99}]
    measured, targets = effects.zoo_measurements(runs)
    assert targets[-1]["label"] == "net ASR during training 0.45% (exploratory)"
    assert measured["pissa"][targets[-1]["label"]] == pytest.approx([45.0, 45.0])  # 100 * (b/2 + b) / 2, net b = 0.6 in both seeds
    assert measured["ff"][targets[-1]["label"]] == pytest.approx([75.0, 75.0])
    (row,) = [r for r in effects.effects(runs) if r["condition"] == "pissa, BPA 0.45%" and "during" in r["what"]]
    assert row["mean"] == pytest.approx(22.5) and row["n"] == 2  # the baseline's net b = 0.3: 22.5
    assert effects.asr_during(run(0, 0.8, asr=0.5, asr_net=0.5)) is None  # no curve: no value, not 0
    assert [t["label"] for t in effects.zoo_measurements(zoo_runs())[1]][-1] == "net ASR 0.45%"  # no curves: no target


def test_zoo_correlations_by_hand():
    measured, targets = effects.zoo_measurements(zoo_runs())
    # misalign ranks kaiming < gaussian < pissa < olora; mean ASR 35, 45, 65, 75: the same order, rho = +1
    predictors = effects.zoo_predictors(theory_rows(MISALIGN))
    rows = {(c["target"], c["predictor"]): c for c in effects.zoo_correlations(measured, targets, predictors)}
    c = rows[("ASR 0.45%", "1 - alignment with FF's NTK")]
    assert c["rho"] == pytest.approx(1.0) and c["n"] == 4 and c["seeds"] == 2
    assert c["p"] == pytest.approx(2 / 24)  # exact: 2 of the 4! orderings reach |rho| = 1
    assert c["predicted"] == -1  # the paper: further from FF's kernel, lower ASR
    assert rows[("UPA drop", "IB")]["predicted"] == -1 and rows[("clean CACC", "IB")]["predicted"] == 0
    # UPA drop 3, 5, 1, 2 against misalign ranks 1, 2, 3, 4: rho = Pearson of (3, 4, 1, 2) with (1, 2, 3, 4) = -0.6
    assert rows[("UPA drop", "1 - alignment with FF's NTK")]["rho"] == pytest.approx(-0.6)


def test_zoo_markdown_and_figure(tmp_path):
    runs = zoo_runs(low_rate=True)
    measured, targets = effects.zoo_measurements(runs)
    predictors = effects.zoo_predictors(theory_rows(MISALIGN))
    text = effects.zoo_markdown(measured, targets, effects.zoo_correlations(measured, targets, predictors),
                                effects.effects(runs))
    (pissa,) = [line for line in text.splitlines() if line.startswith("| pissa")]
    assert "65.0 ± 7.1 (n=2); +30.0 [+30.0, +30.0]" in pissa  # ASR 60, 70 against the baseline's 30, 40
    assert "32.5 ± 3.5 (n=2); +15.0 [+15.0, +15.0]" in pissa  # at 0.15%: half of that
    assert "| ff (reference) |" in text
    effects.draw_zoo(measured, targets, predictors, str(tmp_path / "zoo.png"))
    assert (tmp_path / "zoo.png").stat().st_size > 10_000


def test_zoo_verdict_follows_the_written_rule():
    c = dict(rho=0.9, p=0.01, predicted=+1)
    assert effects.zoo_verdict(c) == "predicts"
    assert effects.zoo_verdict(dict(c, predicted=-1)) == "opposite"
    assert effects.zoo_verdict(dict(c, predicted=0)) == "related"
    assert effects.zoo_verdict(dict(c, p=0.066)) == "no evidence either way"  # rho 0.75 at n = 7
    assert effects.zoo_verdict(dict(c, rho=math.nan, p=math.nan)) == "all inits equal"


def test_zoo_verdict_matrix():
    measured, targets = effects.zoo_measurements(zoo_runs())
    predictors = effects.zoo_predictors(theory_rows(MISALIGN))
    text = effects.zoo_verdict_matrix(effects.zoo_correlations(measured, targets, predictors))
    (asr,) = [line for line in text.splitlines() if line.startswith("| ASR 0.45%")]
    # rho = +1 at n = 4 has p = 2/24: too few inits for any verdict but "no evidence"
    assert asr.split(" | ")[1] == "+1.00 (p 0.08; paper: -): no evidence either way"
    assert "across 4 inits" in text and effects.zoo_verdict_matrix([]) == ""
    # 16 pre-registered cells, none below 0.05 at n = 4 (the smallest exact p is 2/24)
    assert "0 of the 16 pre-registered cells have p < 0.05, where chance alone gives about 0.8" in text


def test_zoo_multiplicity_counts_the_preregistered_family_only():
    cells = [dict(p=0.01, exploratory=False), dict(p=0.02, exploratory=False), dict(p=0.5, exploratory=False),
             dict(p=0.001, exploratory=True), dict(p=math.nan, exploratory=False)]
    # family 0.01, 0.02, 0.5: Holm 0.03, 0.04, 0.5 -> both small ones survive; the exploratory 0.001 is not counted
    assert effects.zoo_multiplicity(cells) == ("2 of the 3 pre-registered cells have p < 0.05, where chance alone "
                                               "gives about 0.2; after Holm's correction over those 3, 2 remain "
                                               "(smallest adjusted p 0.03).")
    # one of 0.01, 0.5: Holm 0.02, 0.5 -> one cell, in the singular
    assert effects.zoo_multiplicity(cells[:1] + cells[2:]) == (
        "1 of the 2 pre-registered cells has p < 0.05, where chance alone gives about 0.1; after Holm's correction "
        "over those 2, 1 remains (smallest adjusted p 0.02).")


def test_zoo_markdown_with_one_seed():
    one_seed = [r for r in zoo_runs(low_rate=True) if r["config"]["seed"] == 0]  # a partial zoo: no spread, no interval
    measured, targets = effects.zoo_measurements(one_seed)
    text = effects.zoo_markdown(measured, targets, [], effects.effects(one_seed))
    (pissa,) = [line for line in text.splitlines() if line.startswith("| pissa")]
    assert "| 60.0 (n=1) |" in pissa and "±" not in pissa and "[" not in pissa


def test_zoo_curves_follow_each_init(tmp_path):
    runs = zoo_runs()
    assert not effects.draw_zoo_curves(runs, str(tmp_path / "none.png"))  # no run has curves yet
    for r in runs:  # two points each: half-way the accuracy is 0.1 lower and the ASR half the final one
        acc, asr = r["metrics"]["clean"]["acc"], r["metrics"].get("asr", 0)
        r["curve"] = [{"step": 10, "samples": 160, "poisoned_seen": 0, "acc": acc - 0.1, "asr": asr / 2},
                      {"step": 20, "samples": 320, "poisoned_seen": 1, "acc": acc, "asr": asr}]
    group, arms, _ = effects.zoo_group(runs)
    assert list(arms)[0] == "kaiming_uniform" and list(arms)[-1] == "ff"
    first, last = effects.curves(group, "sst2", "upa", 0.3, arms["pissa"])
    assert (first["acc"], last["acc"]) == (pytest.approx(76.5), pytest.approx(86.5))  # pissa UPA: 0.86 and 0.87
    _, last = effects.curves(group, "sst2", "bpa", 0.0045, arms["olora"])
    ff = effects.curves(group, "sst2", "none", 0, arms["ff"])
    assert last["asr"] == pytest.approx(75.0) and ff[-1]["acc"] == pytest.approx(90.0)  # olora 0.7, 0.8; FF 0.9
    assert effects.draw_zoo_curves(runs, str(tmp_path / "zoo-curves.png"))
    assert (tmp_path / "zoo-curves.png").stat().st_size > 10_000


def test_zoo_ceiling_has_no_correlation_to_report():
    runs = zoo_runs()
    for r in runs:
        if r["config"]["attack"] == "bpa":
            r["metrics"].update(asr=1.0, asr_net=1.0)  # every init saturated
    measured, targets = effects.zoo_measurements(runs)
    predictors = effects.zoo_predictors(theory_rows(MISALIGN))
    text = effects.zoo_markdown(measured, targets, effects.zoo_correlations(measured, targets, predictors), [])
    assert "| ASR 0.45% | IB | + | - (all inits equal) | 4 | 2 | - | - |" in text


def test_curves_net_asr_skips_undefined_points():
    rows = []
    for s, net in enumerate((None, 0.3, 0.5)):  # seed 0's model got no triggered negative right: undefined (null)
        r = run(s, 0.8, asr=0.6, asr_net=net, attack="bpa", poison_rate=0.0045)
        r["curve"] = [{"step": 10, "samples": 160, "poisoned_seen": 1, "acc": 0.8, "asr": 0.6, "asr_net": net}]
        rows.append(r)
    (p,) = effects.curves(rows, "sst2", "bpa", 0.0045, effects.BASELINE)
    assert p["asr_net"] == pytest.approx(40.0) and p["asr_net_sd"] == pytest.approx(2 ** 0.5 * 10)
    assert p["asr"] == pytest.approx(60.0) and p["n"] == 3


def test_across_tasks_puts_each_tasks_cell_in_its_column(tmp_path):
    rows = effects.effects(upa_runs() + [dict(r, config=dict(r["config"], task="qnli")) for r in upa_runs()[:8]])
    table = effects.across_markdown(rows)
    f1 = next(ln for ln in table.splitlines() if ln.startswith("| F1"))
    assert table.splitlines()[0] == "| finding | sst2 | cola | qnli | qqp | mrpc | rte |"  # every task, run or not
    assert f1.split(" | ")[1:] == ["+4.0 [+1.5, +6.5], n=3, replicated", effects.NO_INTERVAL,
                                   "+3.5 [-2.9, +9.9], n=2, inconclusive", effects.NO_INTERVAL, effects.NO_INTERVAL,
                                   effects.NO_INTERVAL + " |"]
    assert effects.draw_forest(rows, tmp_path / "forest.png") and (tmp_path / "forest.png").stat().st_size > 0
    assert not effects.draw_forest(effects.effects(upa_runs()), tmp_path / "one.png")  # one task: nothing to set beside


def test_a_second_models_cells_come_after_the_tasks_from_its_own_rows(tmp_path):
    # the second model's SST-2 runs: seeds 0-1 of the same drops -> +3.5 [-2.9, +9.9], n = 2; the first model's: n = 3
    first, second = effects.effects(upa_runs()), effects.effects(upa_runs()[:8])
    table = effects.across_markdown(first, {"MPNet": second})
    assert table.splitlines()[0] == "| finding | sst2 | cola | qnli | qqp | mrpc | rte | sst2 (MPNet) |"
    f1 = next(ln for ln in table.splitlines() if ln.startswith("| F1")).split(" | ")
    assert f1[1] == "+4.0 [+1.5, +6.5], n=3, replicated" and f1[-1] == "+3.5 [-2.9, +9.9], n=2, inconclusive |"
    assert effects.draw_forest(first, tmp_path / "two.png", {"MPNet": second})  # one task on two models: two rows


def backdoor_grid(task, attack, asr, seeds=range(3), asr_net=None):
    """FF and LoRA r8 at both of the paper's BPA rates, every run at this ASR (and net ASR, by default the same)."""
    return [run(s, 0.8, asr=asr, asr_net=asr if asr_net is None else asr_net, task=task, attack=attack,
                poison_rate=rate, **arm) for s in seeds for rate in (0.0015, 0.0045) for arm in (FF, {})]


def test_saturation_follow_ups_follow_the_stated_rules():
    assert effects.follow_ups(backdoor_grid("qqp", "bpa", 0.95)) == [("qqp", "BPA", "ceiling", 0.0005)]
    assert effects.follow_ups(backdoor_grid("sst2", "mt", 0.05)) == [("sst2", "MT", "floor", 0.015)]
    assert effects.follow_ups(backdoor_grid("qnli", "bpa", 0.05)) == []  # the pair tasks' rule has no floor
    assert effects.follow_ups(backdoor_grid("cola", "bpa", 0.95)) == []  # CoLA's grid stated no follow-up
    assert effects.follow_ups(backdoor_grid("qqp", "bpa", 0.95, seeds=range(2))) == []  # judged on seeds 0-2
    one_below = backdoor_grid("qqp", "bpa", 0.95)
    one_below[5]["metrics"]["asr"] = 0.89
    assert effects.follow_ups(one_below) == []
    assert "add 0.05%, labelled follow-up" in effects.follow_ups_markdown(effects.follow_ups(backdoor_grid("qqp", "bpa", 0.95)))


def test_the_floor_is_judged_on_net_asr():
    # a backdoor that does nothing: raw ASR is the clean model's false-positive rate (13%), net ASR near 0
    assert effects.follow_ups(backdoor_grid("sst2", "sbpa", 0.13, asr_net=0.02)) == [("sst2", "S-BPA", "floor", 0.015)]
    assert effects.follow_ups(backdoor_grid("sst2", "sbpa", 0.05, asr_net=0.12)) == []
    undefined = backdoor_grid("sst2", "sbpa", 0.05, asr_net=0.02)
    undefined[0]["metrics"]["asr_net"] = None  # no correctly classified negative to count on: not below the floor
    assert effects.follow_ups(undefined) == []


def test_seeds_3_and_4_cannot_undo_a_follow_up_decision():
    late = backdoor_grid("qqp", "bpa", 0.95) + backdoor_grid("qqp", "bpa", 0.50, seeds=(3, 4))
    assert effects.follow_ups(late) == [("qqp", "BPA", "ceiling", 0.0005)]
    seed_2_missing = backdoor_grid("qqp", "bpa", 0.95, seeds=(0, 1, 3, 4))
    assert effects.follow_ups(seed_2_missing) == []
