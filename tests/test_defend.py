"""study/defend.py: which source runs it plans, and the paired contrasts on a results file whose answer is known."""
import json
import math
import os

import pytest

import defences
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


def result_line(flags, name, metrics, **extra):
    """A results line of defence `name` on the run of these flags, as study/defend.py's measure writes it."""
    return {"run": "R", "config": sweep.resolve(flags), "settings": defences.settings(name),
            "metrics": dict(metrics, defence=name), **extra}


def test_effects_pair_ff_and_lora_by_seed(tmp_path):
    # FF's AUROC exceeds LoRA's by exactly 0.2 in every seed: mean +0.2, zero-width interval, "replicated"; a stray
    # line of another run (LoRA r16, seed 0, AUROC 0.1) must not take the place of LoRA r8's
    path, runs = tmp_path / "d.jsonl", defend.source_runs((0.0015,), (0, 1, 2), str(tmp_path))
    for folder, flags in runs:
        lora = flags[flags.index("--mode") + 1] == "lora"
        m = {"auroc": 0.7 if lora else 0.9, "frr0.01": {"asr": 0.5}, "frr0.05": {"asr": 0.5}, "before": {"asr": 1.0}}
        ledger.append(str(path), result_line(flags, "dan", m))
        if lora and "--seed 0" in " ".join(flags):
            r16 = flags[:flags.index("--rank") + 1] + ["16"] + flags[flags.index("--rank") + 2:]
            ledger.append(str(path), result_line(r16, "dan", dict(m, auroc=0.1)))
    rows = defend.contrasts(*defend.measurements(str(path), str(tmp_path / "none.jsonl"), runs))
    auroc = [e for what, name, rate, e in rows if what == "detection AUROC"]
    assert len(rows) == 3 and len(auroc) == 1
    assert abs(auroc[0]["mean"] - 0.2) < 1e-12 and auroc[0]["n"] == 3 and auroc[0]["verdict"] == "replicated"
    asr = [e for what, name, rate, e in rows if what.startswith("ASR")]
    assert all(e["mean"] == 0 and e["verdict"] == "no effect" and not e["saturated"] for e in asr)
    assert "| detection AUROC | dan | 0.15% | +20.0 [+20.0, +20.0] | 3 of 5 | replicated |" in defend.markdown(rows)
    lines, after = defend.measurements(str(path), str(tmp_path / "none.jsonl"), runs)
    assert defend.figure(lines, after, str(tmp_path / "f.png")) and (tmp_path / "f.png").stat().st_size > 0


def test_the_measures_beside_the_contrasts_are_mean_and_t_interval_per_mode(tmp_path):
    # FF's spectral precision 0.5, 0.7, 0.9 over seeds 0-2: mean 70.0, half-width t(0.975, 2) x 20 / sqrt(3) = 49.7;
    # LoRA's precision is undefined (nothing dropped) in seed 0, so its n is 2
    path, runs = tmp_path / "d.jsonl", defend.source_runs((0.0045,), (0, 1, 2), str(tmp_path))
    for folder, flags in runs:
        seed, lora = int(flags[flags.index("--seed") + 1]), flags[flags.index("--mode") + 1] == "lora"
        precision = (None if seed == 0 else 0.4) if lora else 0.5 + 0.2 * seed
        m = {"n_dropped": 10 * (seed + 1), "precision": precision, "recall": 0.5}
        ledger.append(str(path), result_line(flags, "spectral", m, source={"asr": 1.0, "asr_net": 0.9},
                                             drop_rows=f"d/x-spectral-{seed}{lora}.json"))
    text = defend.describe(*defend.measurements(str(path), str(tmp_path / "none.jsonl"), runs))
    assert "| spectral | 0.45% | precision | 70.0 [20.3, 119.7] (n=3) | 40.0 [40.0, 40.0] (n=2) |" in text
    assert "| spectral | 0.45% | rows dropped (count) | 20.0 [-4.8, 44.8] (n=3) |" in text
    assert "| spectral | 0.45% | source run: ASR / net ASR | 100.0 [100.0, 100.0] (n=3) / 90.0 [90.0, 90.0] (n=3) |" \
        in text


def test_a_line_measured_under_other_settings_stops_the_study_with_one_error(tmp_path, capsys):
    runs = defend.source_runs((0.0015,), (0,), str(tmp_path))
    path = tmp_path / "d.jsonl"
    line = result_line(runs[0][1], "dan", {"auroc": 0.9})
    ledger.append(str(path), dict(line, settings=dict(line["settings"], held_out=0.0)))  # as before the fix
    for stage in ("detect", "effects"):
        with pytest.raises(SystemExit) as e:
            defend.main([stage, "--results", str(path), "--runs-dir", str(tmp_path / "runs")])
        assert e.value.code == 2 and "measured under other settings" in capsys.readouterr().err
    path.unlink()
    ledger.append(str(path), line)
    ledger.append(str(path), line)
    with pytest.raises(SystemExit):
        defend.main(["effects", "--results", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert "two dan lines" in capsys.readouterr().err


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
    # a finished source run with an AC line: one retraining on the drop file that line names, until its results
    # line is in; a new AC measurement dropping other rows names a new drop file, which needs its own retraining
    runs = defend.source_runs(defend.FILTER["rates"], (0,), str(tmp_path))
    folder, flags = runs[0]
    os.makedirs(folder)
    for name, content in (("config.json", {"run": sweep.resolve(flags)}), ("metrics.json", {"final": {}})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    results, retrained = tmp_path / "d.jsonl", tmp_path / "retrain.jsonl"
    for dropped in ([1, 2], [3]):
        drop = defend.drop_file(str(tmp_path / "drops"), folder, "ac", dropped)
        os.makedirs(os.path.dirname(drop), exist_ok=True)
        with open(drop, "w") as f:
            json.dump({"dropped": dropped}, f)
        if results.exists():
            results.unlink()
        ledger.append(str(results), result_line(flags, "ac", {"recall": 0.5}, drop_rows=drop))
        plan = defend.retrain_plan(runs, str(results), str(retrained))
        assert [name for name, _ in plan] == [os.path.join("defend", os.path.splitext(os.path.basename(drop))[0])]
        assert plan[0][1][-2:] == ["--drop-rows", drop]
        ledger.append(str(retrained), {"config": sweep.resolve(plan[0][1]), "metrics": {"asr": 0.1}})
        assert defend.retrain_plan(runs, str(results), str(retrained)) == []
