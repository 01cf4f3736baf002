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
