"""study/defend.py: which source runs it plans, and the paired contrasts on a results file whose answer is known."""
import math
import os

import ledger
from study import defend, sweep


def test_source_runs_are_the_f12_bpa_runs_of_both_modes():
    runs = defend.source_runs(defend.DETECT["rates"], defend.DETECT["seeds"], "R")
    assert len(runs) == 2 * 2 * 5  # rates x modes x seeds
    folders = {f for f, _ in runs}
    assert "R/f12/sst2-ff-bpa0.0015-s4" in {f.replace(os.sep, "/") for f in folders}
    assert all("--poison-pool" in flags and flags[flags.index("--attack") + 1] == "bpa" for _, flags in runs)
    filt = defend.source_runs(defend.FILTER["rates"], defend.FILTER["seeds"], "R")
    assert len(filt) == 2 * 3 and {f for f, _ in filt} <= folders
    assert all(flags[flags.index("--steps") + 1] == str(sweep.PROTOCOLS["conv"]["steps"]["sst2"]) for _, flags in runs)


def test_effects_pair_ff_and_lora_by_seed(tmp_path):
    # FF's AUROC exceeds LoRA's by exactly 0.2 in every seed: mean +0.2, zero-width interval, "replicated"
    path = tmp_path / "d.jsonl"
    for seed in range(3):
        for mode, auroc in (("ff", 0.9), ("lora", 0.7)):
            m = {"defence": "dan", "auroc": auroc, "frr0.01": {"asr": 0.5}, "frr0.05": {"asr": 0.5}}
            m["before"] = {"asr": 1.0}
            ledger.append(str(path), {"config": {"mode": mode, "seed": seed, "poison_rate": 0.0015}, "metrics": m})
    rows = defend.contrasts(str(path), str(tmp_path / "none.jsonl"))
    auroc = [e for what, name, rate, e in rows if what == "detection AUROC"]
    assert len(rows) == 3 and len(auroc) == 1
    assert abs(auroc[0]["mean"] - 0.2) < 1e-12 and auroc[0]["n"] == 3 and auroc[0]["verdict"] == "replicated"
    asr = [e for what, name, rate, e in rows if what.startswith("ASR")]
    assert all(e["mean"] == 0 and e["verdict"] == "no effect" and not e["saturated"] for e in asr)
    assert "| detection AUROC | dan | 0.15% | +20.0 [+20.0, +20.0] | 3 | replicated |" in defend.markdown(rows)
    assert defend.figure(str(path), str(tmp_path / "none.jsonl"), str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 0


def test_source_runs_are_checked_bit_for_bit_against_the_committed_lines(tmp_path):
    # three source runs: one equal to its committed line, one whose accuracy differs in the last bit, one never
    # committed; the wall time and the folder may differ without counting
    runs = defend.source_runs(defend.DETECT["rates"], (0,), str(tmp_path))[:3]
    committed, mine = tmp_path / "committed.jsonl", tmp_path / "defend-sources.jsonl"
    for i, (folder, flags) in enumerate(runs):
        line = {"config": sweep.resolve(flags), "metrics": {"clean": {"acc": 0.9}, "asr": 0.5},
                "curve": [{"step": 1, "acc": 0.8}], "wall_s": 10.0, "out": "/elsewhere"}
        if i < 2:
            ledger.append(str(committed), line)
        ledger.append(str(mine), dict(line, wall_s=99.0, out=folder,
                                      metrics={"clean": {"acc": math.nextafter(0.9, 1) if i == 1 else 0.9},
                                               "asr": 0.5}))
    same, differ, missing = defend.reproduced(str(tmp_path), str(committed))
    assert (same, differ, missing) == ([runs[0][0]], [runs[1][0]], [runs[2][0]])


def test_retrain_plan_has_one_run_per_drop_file_until_its_line_is_in(tmp_path):
    runs = defend.source_runs(defend.FILTER["rates"], (0,), str(tmp_path))
    drops, retrained = tmp_path / "drops", tmp_path / "retrain.jsonl"
    drops.mkdir()
    folder, flags = runs[0]
    (drops / f"{os.path.basename(folder)}-ac.json").write_text('{"dropped": [1, 2]}')
    plan = defend.retrain_plan(runs, str(drops), str(retrained))
    assert [name for name, _ in plan] == [os.path.join("defend", os.path.basename(folder) + "-ac")]
    ledger.append(str(retrained), {"config": sweep.resolve(plan[0][1]), "metrics": {"asr": 0.1}})
    assert defend.retrain_plan(runs, str(drops), str(retrained)) == []
