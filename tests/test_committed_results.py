"""The committed report is what the committed results produce: `python -m study.report all` on a copy of results/
must rewrite every Markdown file (REPORT.md's generated blocks included) byte for byte. It fails when results lines
were committed without regenerating the report, or when the report code cannot read them (as a Tab. E.1 at two rates
once could not)."""
import shutil
from pathlib import Path

from study import report

RESULTS = Path(__file__).resolve().parent.parent / "results"


def markdown_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.md"))


def test_report_all_regenerates_the_committed_markdown(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    report.report_all(str(copy))
    assert markdown_files(copy) == markdown_files(RESULTS), "the report wrote Markdown files that are not committed"
    stale = [str(p) for p in markdown_files(RESULTS) if (copy / p).read_bytes() != (RESULTS / p).read_bytes()]
    assert not stale, f"run `python -m study.report all` and commit: these differ from what it writes: {stale}"


def test_the_answer_in_report_is_what_the_committed_results_give():
    """REPORT.md's first table, between its `answer` markers, is the one the report code computes from the committed
    JSONL; it opens the report (within its first screen), and every question has its SST-2 cell (a row whose name
    matches no effects row or defence contrast would read '-' there)."""
    text = (RESULTS / "REPORT.md").read_text()
    begin, end = report.markers("answer")
    assert text.count(begin) == 1 and text.count(end) == 1
    spliced = text.split(begin + "\n", 1)[1].split("\n" + end, 1)[0]
    assert spliced == report.answer(str(RESULTS)), "REPORT's answer drifted from the JSONL: run `python -m study.report all`"
    assert text[:text.index(begin)].count("\n") < 40, "The answer's table must open the report"
    sst2 = [line.split(" | ")[1] for line in spliced.splitlines()[2:] if line.startswith("|")]
    assert len(sst2) == len(report.ANSWER_ROWS) and "-" not in sst2
