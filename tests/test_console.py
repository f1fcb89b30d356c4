"""What bespoke prints reads well at 80 columns and in a log file (no "..." cuts, no sentences
wrapped at an assumed width)."""

from __future__ import annotations

import io

from rich.console import Console

from bespoke.console import make_console
from bespoke.report import ModelEntry, Report, StudentEntry, summary_legend, summary_table


def _report() -> Report:
    teacher = ModelEntry(name="tf_efficientnet_lite2", params=6_092_072, flops=1.7e9, latency_ms=31.94,
                         top1=0.915, top5=0.98, agreement=1.0)
    students = [StudentEntry(budget=b, budget_ms=b * 31.94, name=f"student-{b:g}", params=5_213_000, flops=1.1e9,
                             latency_ms_predicted=b * 31.0, latency_ms_measured=b * 32.5, top1=0.887,
                             agreement=0.912, latency_ratio=b * 1.01, over_budget=b > 0.8, input_size=224,
                             replaced=[{"segment": "1-5", "alternative": "1-5.pruned-self.pruned-error-25"}] * 3)
                for b in (0.584, 0.814, 0.7)]
    refs = [teacher.model_copy(update={"name": "tf_efficientnet_lite0", "latency_ms": 18.7})]
    return Report(bespoke_version="0", created="now", teacher=teacher, students=students, references=refs,
                  timings_s={"total": 1.0})


def test_the_run_table_fits_80_columns_without_cutting_anything():
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    report = _report()
    console.print(summary_table(report))
    console.print(summary_legend(report), highlight=False)
    text = buf.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for want in ("student-0.584", "0.814*", "0.590", "3@224px", "measured over its budget"):
        assert want in text, want


def test_a_log_file_gets_whole_lines():
    console = make_console()  # pytest captures stdout: not a terminal
    assert not console.is_terminal and console.soft_wrap
    buf = io.StringIO()
    console.file = buf
    sentence = "a sentence " * 20
    console.print(sentence.strip(), highlight=False)
    assert buf.getvalue().strip() == sentence.strip()
