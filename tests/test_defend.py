"""study/defend.py: which source runs it plans, and the paired contrasts on a results file whose answer is known."""
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
