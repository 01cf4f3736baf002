"""evaluate.py's metrics against hand-computed numbers; study/report.py's grouping/averaging and findings."""
import json

import pytest

import evaluate as E
import ledger
from study import report as R


def test_metrics_by_hand():
    # TP = 2 (0, 4), FP = 1 (1), FN = 1 (3), TN = 2 (2, 5)
    m = E.classification_metrics([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0])
    assert m == pytest.approx(dict(acc=4 / 6, precision=2 / 3, recall=2 / 3, f1=2 / 3, n=6))
    # TP = 1, FP = 2, FN = 1, TN = 0: P = 1/3, R = 1/2, F1 = 2 (1/6) / (5/6) = 0.4
    m = E.classification_metrics([1, 1, 1, 0], [1, 0, 0, 1])
    assert m == pytest.approx(dict(acc=0.25, precision=1 / 3, recall=0.5, f1=0.4, n=4))


def test_metrics_degenerate_cases():
    assert E.classification_metrics([0, 0], [1, 0]) == pytest.approx(dict(acc=0.5, precision=0, recall=0, f1=0, n=2))
    assert E.classification_metrics([1, 1], [0, 0]) == pytest.approx(dict(acc=0, precision=0, recall=0, f1=0, n=2))
    with pytest.raises(ValueError):
        E.classification_metrics([1], [1, 0])


def _line(seed, acc, mode="lora", attack="upa", rate=0.1, rank=8, asr=None, rslora=False, task="sst2"):
    cfg = dict(task=task, mode=mode, rank=rank, init="kaiming_uniform", init_scale=1 / 3, attack=attack,
               poison_rate=rate, seed=seed, steps=10, rslora=rslora)
    clean = dict(acc=acc, precision=acc, recall=1.0, f1=0.5, n=100)
    metrics = {"clean": clean}
    if asr is not None:
        metrics.update(asr=asr, triggered=clean)
    return json.dumps({"config": cfg, "metrics": metrics})


@pytest.fixture
def results(tmp_path):
    lines = [_line(0, 0.8), _line(1, 0.9), _line(2, 1.0), _line(2, 1.0),  # the last is a duplicate run
             _line(0, 0.7, mode="ff"), _line(0, 0.95, attack="none", rate=0.0),
             _line(0, 0.9, attack="bpa", rate=0.05, asr=0.2), _line(1, 0.9, attack="bpa", rate=0.05, asr=0.4)]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_groups_over_seeds(results):
    groups = R.group_runs(ledger.runs(results))
    assert len(groups) == 4
    upa = [ms for k, ms in groups.items() if json.loads(k)["attack"] == "upa" and json.loads(k)["mode"] == "lora"][0]
    assert sorted(m["clean_acc"] for m in upa) == [0.8, 0.9, 1.0]
    table = R.markdown_table(groups)
    assert "90.00 ± 10.00" in table  # mean 0.9, sample std 0.1
    bpa = [ln for ln in table.splitlines() if "| bpa |" in ln][0]
    assert "30.00 ± 14.14" in bpa  # ASR mean 0.3, sample std sqrt(0.02)


def test_figure_data_and_drawing(results, tmp_path):
    groups = R.group_runs(ledger.runs(results))
    fig1 = R.figure_data(groups, R.FIGURE_SPECS["fig1"])
    lora = fig1["clean_acc"]["lora"]
    assert [(x, n) for x, _, _, n in lora] == [(0.0, 1), (0.1, 3)]
    assert lora[1][1] == pytest.approx(0.9) and lora[1][2] == pytest.approx(0.1)
    assert [p[0] for p in fig1["clean_acc"]["ff"]] == [0.1]
    table = R.figure_table(fig1, R.FIGURE_SPECS["fig1"]).splitlines()
    assert table[2] == "| poison_rate | clean_acc · ff | clean_acc · lora | clean_f1 · ff | clean_f1 · lora |"
    row = [ln for ln in table if ln.startswith("| 0.1 |")][0].split(" | ")
    assert row[2] == "90.0 ± 10.0 (3)"  # LoRA at rate 0.1: accuracies 0.8, 0.9, 1.0
    assert [ln for ln in table if ln.startswith("| 0 |")][0].split(" | ")[1:3] == ["", "95.0 (1)"]  # one LoRA clean run (0.95), no FF one
    R.write_report(ledger.runs(results), str(tmp_path / "rep"))
    assert "90.0 ± 10.0 (3)" in (tmp_path / "rep" / "tables.md").read_text()
    assert (tmp_path / "rep" / "fig1.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "fig2.png").exists() and (tmp_path / "rep" / "table.md").exists()


def test_bad_results_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(_line(0, 0.5) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        ledger.runs(p)


def test_findings_effect_sizes_by_hand(tmp_path):
    lines = [_line(0, 0.90, attack="none", rate=0.0), _line(0, 0.80, rate=0.1),  # LoRA drop 0.10
             _line(0, 0.90, mode="ff", attack="none", rate=0.0), _line(0, 0.85, mode="ff", rate=0.1),  # FF drop 0.05
             _line(0, 0.9, attack="bpa", rate=0.01, asr=0.2), _line(0, 0.9, mode="ff", attack="bpa", rate=0.01, asr=0.5)]
    lines += [_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=a) for r, a in ((4, 0.1), (16, 0.3))]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    text = R.findings(ledger.runs(path))
    assert "- rate 0.1: +5.00 ± 0.00 (n=1)" in text      # (0.10 - 0.05) in points
    assert "- bpa rate 0.01: +30.00 ± 0.00 (n=1)" in text     # 0.5 - 0.2
    assert "Spearman of rank with BPA ASR at rate 0.01: +1.00 (n=3 runs, 3 values); within seeds: seed 0 +1.00" in text
    # Fig. 4 bands are per (attack, rate) sweeps over rank; the lone rank-8 UPA point belongs to Fig. 1 only
    fig4 = R.figure_data(R.group_runs(ledger.runs(path)), R.FIGURE_SPECS["fig4"])
    assert list(fig4["asr"]) == ["bpa 0.01"] and [p[0] for p in fig4["asr"]["bpa 0.01"]] == [4, 8, 16]
    assert "upa 0.1" not in fig4.get("clean_acc", {})


def test_rslora_rank_sweep_is_its_own_band_and_correlation(tmp_path):
    # alpha/r: ASR rises with the rank; rsLoRA: it falls. Pooled, the two sweeps would share x values and cancel.
    lines = [_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=a) for r, a in ((4, 0.1), (8, 0.2), (64, 0.3))]
    lines += [_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=a, rslora=True) for r, a in ((4, 0.6), (64, 0.5), (384, 0.4))]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    text = R.findings(ledger.runs(path))
    assert "F3 (rank): Spearman of rank with BPA ASR at rate 0.01: +1.00 (n=3 runs, 3 values)" in text
    assert "F3 (rank) with rsLoRA: Spearman of rank with BPA ASR at rate 0.01: -1.00 (n=3 runs, 3 values)" in text
    fig4 = R.figure_data(R.group_runs(ledger.runs(path)), R.FIGURE_SPECS["fig4"])["asr"]
    assert [(x, round(m, 2)) for x, m, *_ in fig4["bpa 0.01"]] == [(4, 0.1), (8, 0.2), (64, 0.3)]
    assert [(x, round(m, 2)) for x, m, *_ in fig4["bpa 0.01 rsLoRA"]] == [(4, 0.6), (64, 0.5), (384, 0.4)]


def test_f2_pairs_ff_with_the_alpha_over_r_default_only(tmp_path):
    lines = [_line(0, 0.9, mode="ff", attack="bpa", rate=0.01, asr=0.5), _line(0, 0.9, attack="bpa", rate=0.01, asr=0.2),
             _line(0, 0.9, attack="bpa", rate=0.01, asr=0.4, rslora=True)]  # rank 8 with rsLoRA: not the default arm
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert "- bpa rate 0.01: +30.00 ± 0.00 (n=1)" in R.findings(ledger.runs(path))


def test_spearman_of_a_constant_target_reads_undefined(tmp_path):
    lines = [_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=1.0) for r in (4, 8, 64)]  # every rank at 100% ASR
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert "with BPA ASR at rate 0.01: undefined (one value) (n=3 runs, 3 values); within seeds: seed 0 undefined" \
        in R.findings(ledger.runs(path))


def test_each_task_has_its_own_findings_tables_and_figures(tmp_path):
    # LoRA drops 10 points on SST-2 and 30 on CoLA, FF 5 on both: pooled by seed, one task would overwrite the other
    lines = []
    for task, drop in (("sst2", 0.10), ("cola", 0.30)):
        lines += [_line(0, 0.9, attack="none", rate=0.0, task=task), _line(0, 0.9 - drop, rate=0.1, task=task),
                  _line(0, 0.9, mode="ff", attack="none", rate=0.0, task=task), _line(0, 0.85, mode="ff", rate=0.1, task=task)]
    lines.append(_line(1, 0.9, attack="none", rate=0.0))  # one more SST-2 run: the main task, whose section comes first
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    R.write_report(ledger.runs(path), str(tmp_path / "rep"))
    found = (tmp_path / "rep" / "findings.md").read_text()
    assert found.startswith("## sst2")
    sst2, cola = found.split("## cola")
    assert "- rate 0.1: +25.00 ± 0.00 (n=1)" in cola and "- rate 0.1: +5.00 ± 0.00 (n=1)" in sst2
    tables = (tmp_path / "rep" / "tables.md").read_text()
    assert "## cola" in tables and tables.count("| 0.1 | 85.0 (1) | 80.0 (1) |") == 1  # SST-2's row only
    assert (tmp_path / "rep" / "fig1-cola.png").exists() and (tmp_path / "rep" / "fig1-sst2.png").exists()
    assert not (tmp_path / "rep" / "fig1.png").exists()


def test_table_e1_keeps_each_rate_apart(tmp_path):
    # conv runs Tab. E.1 at two rates: each (mode, rate) is its own column, never a 'duplicate' row
    lines = [_line(0, 0.9, mode=m, attack=a, rate=r, asr=asr)
             for m in ("ff", "lora") for a in ("mt", "sbpa") for r, asr in ((0.0015, 0.2), (0.0045, 0.6))]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    asr = R.figure_data(R.group_runs(ledger.runs(path)), R.TABLE_SPECS["tabE1"])["asr"]
    assert sorted(asr) == ["ff 0.0015", "ff 0.0045", "lora 0.0015", "lora 0.0045"]
    assert [(x, m) for x, m, *_ in asr["lora 0.0045"]] == [("mt", 0.6), ("sbpa", 0.6)]


def test_two_settings_at_one_figure_point_is_an_error_not_a_hidden_run(tmp_path):
    # two rank sweeps that differ only in a field Fig. 4 does not show (the learning rate): one would hide the other
    lines = [_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=0.5) for r in (4, 8, 64)]
    other = [json.loads(_line(0, 0.9, attack="bpa", rate=0.01, rank=r, asr=0.7)) for r in (4, 8, 64)]
    for d in other:
        d["config"]["lr"] = 1e-3
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines + [json.dumps(d) for d in other]) + "\n")
    with pytest.raises(ValueError, match="series 'bpa 0.01' at the same rank 4"):
        R.figure_data(R.group_runs(ledger.runs(path)), R.FIGURE_SPECS["fig4"])
