"""study/defend.py: which source runs it plans, and the paired contrasts on a results file whose answer is known."""
import argparse
import json
import math
import os
import time

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


def test_a_contrast_of_one_paired_seed_has_no_interval_yet(tmp_path):
    # seed 0 alone: FF's AUROC 0.9, LoRA's 0.6, so +30.0 points, and no t-interval (one difference has no spread)
    path, runs = tmp_path / "d.jsonl", defend.source_runs((0.0015,), (0,), str(tmp_path))
    for folder, flags in runs:
        auroc = 0.6 if flags[flags.index("--mode") + 1] == "lora" else 0.9
        ledger.append(str(path), result_line(flags, "dan", {"auroc": auroc, "frr0.01": {"asr": 0.5},
                                                            "frr0.05": {"asr": 0.5}, "before": {"asr": 1.0}}))
    text = defend.markdown(defend.contrasts(*defend.measurements(str(path), str(tmp_path / "none.jsonl"), runs)))
    assert "| detection AUROC | dan | 0.15% | +30.0 (one seed) | 1 of 5 | no interval yet (under 2 paired seeds) |" \
        in text and "inf" not in text
    assert defend.figure(*defend.measurements(str(path), str(tmp_path / "none.jsonl"), runs), str(tmp_path / "f.png"))


def test_every_inconclusive_contrast_states_the_seeds_its_mean_would_need():
    # the defences' rule: an inconclusive cell states how many seeds the observed mean would need, saturated or not,
    # and over 1,000 when stats.seeds_needed finds none within its limit
    cell = lambda **e: dict(dict(mean=0.02, lo=-0.05, hi=0.09, n=3, registered=3, verdict="inconclusive",
                                 saturated=False, seeds_needed=14), **e)
    text = defend.markdown([("ASR after retraining", "spectral", 0.0045, cell(saturated=True)),
                            ("filter recall", "bki", 0.0045, cell(seeds_needed=None)),
                            ("detection AUROC", "dan", 0.0045, cell(verdict="no effect", saturated=True))])
    assert "| +2.0 [-5.0, +9.0] | 3 of 3 | inconclusive (saturated: every run >= 90% ASR) (about 14 seeds for this " \
           "mean) |" in text
    assert "| bki | 0.45% | +2.0 [-5.0, +9.0] | 3 of 3 | inconclusive (over 1,000 seeds for this mean) |" in text
    assert text.endswith("| 3 of 3 | no effect (saturated: every run >= 90% ASR) |")


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
    same, differ, missing = defend.reproduced(str(mine), str(committed))
    assert (same, differ, missing) == ([runs[0][0]], [runs[1][0]], [runs[2][0]])


def test_retrain_plan_has_one_run_per_drop_file_until_its_line_is_in(tmp_path):
    # a source run with an AC line: one retraining on the drop file that line names, until its results line is in;
    # a new AC measurement dropping other rows names a new drop file, which needs its own retraining. The source
    # run's folder is not needed (it is not on this machine)
    runs = defend.source_runs(defend.FILTER["rates"], (0,), str(tmp_path))
    folder, flags = runs[0]
    results, retrained = tmp_path / "d.jsonl", tmp_path / "retrain.jsonl"
    for dropped in ([1, 2], [3]):
        drop = defend.drop_file(str(tmp_path / "drops"), folder, "ac", dropped)
        os.makedirs(os.path.dirname(drop), exist_ok=True)
        with open(drop, "w") as f:
            json.dump({"dropped": dropped}, f)
        if results.exists():
            results.unlink()
        ledger.append(str(results), result_line(flags, "ac", {"recall": 0.5, "n_dropped": len(dropped)}, drop_rows=drop))
        plan = defend.retrain_plan(runs, str(results), str(retrained))
        assert [name for name, _ in plan] == [os.path.join("defend", os.path.splitext(os.path.basename(drop))[0])]
        assert plan[0][1][-2:] == ["--drop-rows", drop]
        ledger.append(str(retrained), {"config": sweep.resolve(plan[0][1]), "metrics": {"asr": 0.1}})
        assert defend.retrain_plan(runs, str(results), str(retrained)) == []


def test_a_filter_that_dropped_nothing_is_not_retrained_and_its_source_run_stands_for_it(tmp_path):
    # seed 0 at 0.45%: AC drops nothing from FF's training set and rows 1-2 from LoRA's. Only LoRA's set changed, so
    # only LoRA is planned; FF's "after retraining" is its source run's own final evaluation (ASR 1.0, CACC 0.88)
    runs = defend.source_runs(defend.FILTER["rates"], (0,), str(tmp_path))
    results = tmp_path / "d.jsonl"
    source = {"cacc": 0.88, "asr": 1.0, "asr_net": 1.0}
    for folder, flags in runs:
        dropped = [1, 2] if flags[flags.index("--mode") + 1] == "lora" else []
        drop = defend.drop_file(str(tmp_path / "drops"), folder, "ac", dropped)
        os.makedirs(os.path.dirname(drop), exist_ok=True)
        with open(drop, "w") as f:
            json.dump({"dropped": dropped}, f)
        ledger.append(str(results), result_line(flags, "ac", {"recall": 0.0, "n_dropped": len(dropped)},
                                                drop_rows=drop, source=source))
    plan = defend.retrain_plan(runs, str(results), str(tmp_path / "none.jsonl"))
    assert [f[f.index("--mode") + 1] for _, f in plan] == ["lora"]
    _, after = defend.measurements(str(results), str(tmp_path / "none.jsonl"), runs)
    assert after == {("ac", 0.0045, "ff", 0): {"clean": {"acc": 0.88}, "asr": 1.0, "asr_net": 1.0}}


def test_all_until_starts_only_the_chunks_estimated_to_end_by_then(tmp_path, monkeypatch, capsys):
    # seed 0's four source runs, one chunk each (--jobs 1), none at hand. Upper estimates by hand, with training at
    # 0.1 s (LoRA) and 0.2 s (FF) a step for 2,500 steps and the guessed seconds of each defence (none measured yet):
    # LoRA 0.15%: 250 + 3 detectors x 600 = 2,050 s; FF 0.15%: 500 + 1,800 = 2,300 s; at 0.45% the filters add
    # 600 + 600 + 4,800 (BKI): LoRA 8,050 s, FF 8,300 s. Until an hour and a half from now: the 0.15% chunks start
    monkeypatch.setattr(defend, "training_speeds", lambda a: {("sst2", "lora"): 0.1, ("sst2", "ff"): 0.2})
    trained, measured = [], []
    monkeypatch.setattr(sweep, "run_all", lambda todo, jobs, runs_dir, results, deadline=None: trained.append(todo))
    monkeypatch.setattr(defend, "measure", lambda stage, todo, *rest: measured.append(todo))
    a = argparse.Namespace(runs_dir=str(tmp_path / "runs"), results=str(tmp_path / "d.jsonl"), seeds=1, jobs=1,
                           until=time.time() + 5400, committed=str(tmp_path / "c.jsonl"),
                           sources_results=str(tmp_path / "s.jsonl"), drops=str(tmp_path / "drops"),
                           scores=str(tmp_path / "scores"), data_dir=None)
    defend.pipeline(a)
    runs = defend.source_runs(defend.DETECT["rates"], (0,), a.runs_dir)
    names = [os.path.basename(folder) for folder, _ in runs]
    assert names == ["sst2-lora-r8-ku-k0.333-bpa0.0015-s0", "sst2-ff-bpa0.0015-s0",
                     "sst2-lora-r8-ku-k0.333-bpa0.0045-s0", "sst2-ff-bpa0.0045-s0"]
    assert [[os.path.basename(n) for n, _ in todo] for todo in trained] == [names[:1], names[1:2]]
    assert [[(os.path.basename(f), owe) for f, _, owe in todo] for todo in measured] == \
        [[(n, list(defences.DETECTORS))] for n in names[:2]]
    assert "--until: 2 source runs not started" in capsys.readouterr().err
    assert defend.measure_seconds(a.results)("bki", "ff") == 4800  # the guess, until BKI lines exist
    for seconds in (100.0, 900.0, 300.0):
        ledger.append(a.results, {"config": {"mode": "ff"}, "metrics": {"defence": "bki"}, "wall_s": seconds})
    assert defend.measure_seconds(a.results)("bki", "ff") == 900.0  # then the slowest of the latest ones
