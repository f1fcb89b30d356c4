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


def _at_80(*renderables) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    for r in renderables:
        console.print(r)
    return buf.getvalue()


def _fits(text: str) -> None:
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert not any(ch in text for ch in "─━│┃┏┓┗┛"), "box drawing"  # plain ASCII rules only


def test_the_house_table_fits_80_columns_and_folds_long_ids():
    from types import SimpleNamespace

    from bespoke.distill import HOUSE_LEGEND, summary_table
    from bespoke.house import AlternativeRecord
    from bespoke.types import AlternativeSpec

    long_id = "blocks.1.0-blocks.5.2.timm-donors.tf_efficientnet_lite0.blocks.1.0-blocks.5.2"
    alts = [AlternativeRecord(id=long_id if i == 0 else f"1-5.pruned-self.pruned-error-{i}", segment="1-5",
                              source="timm-donors" if i == 0 else "pruned-self",
                              spec=AlternativeSpec(source="pruned-self", kind="k", label="l"),
                              params=1_234_567, flops=345_000_000, status="trained", train_loss=0.01234,
                              distill_error=0.0567, agreement=0.953, top1=0.871) for i in range(3)]
    text = _at_80(summary_table(SimpleNamespace(manifest=SimpleNamespace(alternatives=alts)), title="model house"))
    _fits(text)
    width = text.splitlines()[2].index("-- ") if False else None  # noqa: F841
    first_col = "".join(line[:len(line) - len(line.lstrip())] or line.split(" ")[0]
                        for line in text.splitlines()[3:6])  # the id, folded over its first lines
    assert first_col.startswith("blocks.1.0-blocks.") and long_id.startswith(first_col[:18])
    assert "95.3" in text and "87.1" in text and "1.235" in text and "err" in text
    assert "held-out" in HOUSE_LEGEND


def test_the_search_table_fits_80_columns():
    from bespoke.search_report import SEARCH_LEGEND, BudgetResult, SearchReport, report_table

    results = [BudgetResult(budget=b, budget_ms=b * 44.3, feasible=b > 0.4, latency_ms=b * 43.0, loss=0.0123,
                            score=0.0, speedup=1 / b, fastest_ms=19.87, choices=[]) for b in (0.3, 0.604, 0.8)]
    report = SearchReport(strategy="optuna", proxy="replace-one-kl", lam=0.0, teacher_ms=44.28, n_candidates=30,
                          problem_fingerprint="x", results=results, front=[])
    text = _at_80(report_table(report))
    _fits(text)
    assert "fastest 19.87 ms" in text and "0.604" in text and "speedup" in SEARCH_LEGEND


def test_log_progress_prints_at_most_one_line_a_minute():
    from bespoke.console import LineProgress, progress

    now = [0.0]
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    with LineProgress(console, "{description}: step {completed}/{total}, loss {loss:.3f}, {elapsed:.0f} s",
                      clock=lambda: now[0]) as bar:
        task = bar.add_task("bunch 1", total=300, loss=float("nan"))
        for step in range(1, 301):
            now[0] += 1.0  # one step a second: five minutes
            bar.update(task, completed=step, loss=1.0 / step)
        left = bar.add_task("bunch 2", total=None, loss=0.5)
        bar.update(left, completed=3)
    lines = buf.getvalue().splitlines()
    assert lines[-2] == "bunch 1: step 300/300, loss 0.003, 300 s"
    assert lines[-1].startswith("bunch 2: step 3/?")  # unfinished, said once at the end
    assert 5 <= len(lines) <= 7  # one a minute, plus the ends
    assert not progress(None, line="x")  # no console: nothing
    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=80), "{completed}/{total} {eta} left", clock=lambda: now[0]) as bar:
        task = bar.add_task("t", total=100)
        now[0] += 90.0
        bar.update(task, completed=30)  # 3 s a step, 70 steps to go
    assert buf.getvalue().splitlines()[0] == "30/100 0:03:30 left"
    assert isinstance(progress(Console(file=io.StringIO()), line="x"), LineProgress)  # not a terminal


def test_unusable_and_unproven_students_are_marked_in_the_table():
    report = _report()
    report.students[0].usable = False
    report.students[1].usable = None
    report.students[2].usable = True
    text = _at_80(summary_table(report))
    _fits(text)
    assert "(unusable)" in text and "(unproven)" in text and text.count("(un") == 2


def test_usability_says_what_few_images_allow():
    from bespoke.evaluate import proportion_interval, usability
    from bespoke.stages.report import data_line

    lo, hi = proportion_interval(1 / 7, 7)
    assert 0.02 < lo < 0.03 and 0.5 < hi < 0.52
    assert usability(0.0, 7, 0.6)[0] is False and "--data" in usability(0.0, 7, 0.6)[1]
    assert usability(4 / 7, 7, 0.6)[0] is None  # 7 images cannot tell
    assert usability(0.9, 200, 0.6) == (True, None)
    assert usability(0.5, 1000, 0.6)[0] is False
    assert "--data DIR" in data_line(7, 7, 8) and "x8 views" in data_line(7, 7, 8)
    assert "--data" not in data_line(5000, 100)
