"""study/report.py's "The answer" (REPORT.md's first section): one row per question, one column per task (and model),
each cell from the same effects rows, delay rule and defence contrasts as the rest of the report, worked out by hand."""
from study import delay, effects, report

BASE = dict(task="sst2", steps=300, batch_size=16, max_len=64, mode="lora", lr=5e-4, rank=8, alpha=16.0, rslora=False,
            init="kaiming_uniform", init_scale=1 / 3, attack="none", poison_rate=0.0)
FF = dict(mode="ff", lr=3e-5)


def run(seed, acc, task="sst2", **cfg):
    return {"config": {**BASE, **cfg, "task": task, "seed": seed}, "metrics": {"clean": {"acc": acc}}}


def upa_runs(task="sst2", seeds=range(3)):
    # LoRA drops 5, 7, 9 points, FF 2, 3, 4: LoRA's extra drop 3, 4, 5 -> +4.0 [+1.5, +6.5], n = 3
    rows = []
    for s, (ld, fd) in zip(seeds, ((5, 2), (7, 3), (9, 4))):
        rows += [run(s, 0.80, task), run(s, 0.80 - ld / 100, task, attack="upa", poison_rate=0.3),
                 run(s, 0.82, task, **FF), run(s, 0.82 - fd / 100, task, attack="upa", poison_rate=0.3, **FF)]
    return rows


def cells(table, label):
    """The cells of the row whose question starts with label."""
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_each_cell_is_its_tasks_effect_and_a_task_not_run_is_named_under_the_table():
    runs = upa_runs() + upa_runs("qnli", seeds=range(2))  # QNLI: seeds 0-1 only -> 3 and 4, +3.5 [-2.9, +9.9]
    table = report.answer_table({"conv": effects.effects(runs)}, {"conv": runs}, ())
    assert table.splitlines()[0] == "| question | SST-2 | QNLI |"
    assert cells(table, "F1") == ["+4.0 [+1.5, +6.5], n=3, **replicated**", "+3.5 [-2.9, +9.9], n=2, **inconclusive**"]
    assert all(c == "-" for label, _ in report.ANSWER_ROWS[1:] for c in cells(table, label))
    assert table.splitlines()[2 + len(report.ANSWER_ROWS):] == \
        ["", "Not run yet (pre-registered in this report): CoLA, QQP, MRPC, RTE, SST-2 (MPNet)."]


def test_a_column_with_runs_but_no_interval_yet_stays_with_dashes_and_calibration_runs_alone_make_none():
    runs = upa_runs() + upa_runs("cola", seeds=(0,))  # CoLA: one seed, no interval
    calib = [dict(run(0, 0.9, "qnli", steps=5000), curve=[{"step": 250, "acc": 0.8}, {"step": 500, "acc": 0.9}])]
    table = report.answer_table({"conv": effects.effects(runs)}, {"conv": runs + calib}, ())
    assert table.splitlines()[0] == "| question | SST-2 | CoLA |" and cells(table, "F1")[1] == "-"
    assert "QNLI" in table.splitlines()[-1]  # named under the table: not run yet


def test_a_second_model_is_one_more_column():
    sst2, other = upa_runs(), upa_runs(seeds=(5, 6, 7))
    table = report.answer_table({"conv": effects.effects(sst2), "conv-mpnet": effects.effects(other[:8])},
                                {"conv": sst2, "conv-mpnet": other[:8]}, ())
    assert table.splitlines()[0] == "| question | SST-2 | SST-2 (MPNet) |"
    assert cells(table, "F1")[0] == "+4.0 [+1.5, +6.5], n=3, **replicated**"
    assert cells(table, "F1")[-1] == "+3.5 [-2.9, +9.9], n=2, **inconclusive**"  # its own runs, seeds 5-6


def test_the_delay_row_gives_the_delay_rules_verdict_on_sst2_only(monkeypatch):
    # the end-of-training contrast +5.0 [+0.03, +9.97] is "delay" by the delay rule (the conv rule would say
    # "replicated"), every paired run at the ceiling
    e = dict(mean=5.0, lo=0.03, hi=9.97, n=3, verdict="replicated", saturated=True)
    monkeypatch.setattr(delay, "delay_or_limit", lambda runs: {"contrasts": {("end", "net ASR"): e}, "verdict": "delay"})
    runs = upa_runs() + upa_runs("qnli")  # a second column, where these rows must stay '-'
    table = report.answer_table({"conv": effects.effects(runs)}, {"conv": runs}, ())
    assert cells(table, "Delay or limit") == ["+5.0 [+0.0, +10.0], n=3, **delay** (saturated)", "-"]


def test_defence_contrasts_are_points_in_the_column_of_the_runs_they_ran_on():
    dan = dict(mean=-0.059, lo=-0.112, hi=-0.006, n=5, verdict="opposite", saturated=False)
    one_seed = dict(mean=0.2, lo=0.2, hi=0.2, n=1, verdict="inconclusive", saturated=False)
    defended = [("ASR after, FRR 0.05", "dan", 0.0015, dan), ("ASR after retraining", "bki", 0.0045, one_seed),
                ("ASR after, FRR 0.05", "dan", 0.0045, dict(dan, mean=1.0))]  # another rate: not this row
    runs = upa_runs() + upa_runs("qnli")  # a second column, where these rows must stay '-'
    table = report.answer_table({"conv": effects.effects(runs)}, {"conv": runs}, defended)
    assert cells(table, "DAN: ASR after, FF - LoRA, FRR 5%") == ["-5.9 [-11.2, -0.6], n=5, **opposite**", "-"]
    assert cells(table, "BKI") == ["-"] * 2  # one paired seed: no interval yet
    assert cells(table, "DAN: detection AUROC") == ["-"] * 2


def test_the_dose_rows_give_the_dose_rules_ratio_on_sst2_only(monkeypatch):
    # log-ratios with mean log 2 and interval [log 1.5, log 3], as study/dose.py's ratio_cell returns them
    import math
    from study import dose
    cell = dict(effect=dict(mean=math.log(2), lo=math.log(1.5), hi=math.log(3), n=3), verdict="replicated", bounded=1,
                post_hoc=2)
    monkeypatch.setattr(dose, "dose", lambda runs: {0.0015: {"ratio": {50: cell}}})
    runs = upa_runs() + upa_runs("qnli")  # a second column, where these rows must stay '-'
    table = report.answer_table({"conv": effects.effects(runs)}, {"conv": runs}, ())
    assert cells(table, "How much poison: LoRA / FF, poisoned samples to 50% net ASR, BPA 0.15%") == \
        ["2.00x [1.50, 3.00], n=3, **replicated** (1 seed a lower bound) (post hoc: 2 of 3 seeds ran before the rule)",
         "-"]
    assert cells(table, "How much poison: LoRA / FF, poisoned samples to 50% net ASR, BPA 0.45%") == ["-"] * 2
