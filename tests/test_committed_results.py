"""The committed report is what the committed results produce: `python -m study.report all` on a copy of results/
must rewrite every Markdown file (REPORT.md's generated blocks included) byte for byte. It fails when results lines
were committed without regenerating the report, or when the report code cannot read them (as a Tab. E.1 at two rates
once could not)."""
import os
import shutil

from study import report

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def markdown_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".md"))


def test_report_all_regenerates_the_committed_markdown(tmp_path, monkeypatch):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    report.report_all(str(copy))
    assert markdown_files(copy) == markdown_files(RESULTS), "the report wrote Markdown files that are not committed"
    stale = [p for p in markdown_files(RESULTS) if (copy / p).read_bytes() != open(os.path.join(RESULTS, p), "rb").read()]
    assert not stale, f"run `python -m study.report all` and commit: these differ from what it writes: {stale}"
