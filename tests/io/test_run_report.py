"""Run reports: one row per input, atomic rewrite, resumed runs keep earlier rows as 'already done'."""

from __future__ import annotations

import pytest

from medfusion.io.run_report import ReportRow, RunReport, read_report, report_path


def test_rows_round_trip_and_a_resumed_run_marks_finished_inputs_already_done(tmp_path):
    path = report_path(tmp_path, "convert")
    assert path.name == "convert_report.csv"
    first = RunReport(path)
    first.add(ReportRow("a.dcm", "converted", series_uid="1.2.3", output="out/a.nii.gz", seconds=0.5))
    first.add(ReportRow("b.dcm", "failed", reason="missing slice"))
    rows = {r.input: r for r in read_report(path)}
    assert rows["a.dcm"].series_uid == "1.2.3" and rows["a.dcm"].seconds == 0.5 and rows["a.dcm"].time
    assert rows["b.dcm"].status == "failed" and rows["b.dcm"].reason == "missing slice"

    resumed = RunReport(path)  # reads the earlier report
    resumed.add(ReportRow("a.dcm", "already done"))
    resumed.add(ReportRow("b.dcm", "converted", output="out/b.nii.gz"))
    rows = {r.input: r for r in read_report(path)}
    assert len(rows) == 2  # every input exactly once
    assert rows["a.dcm"].status == "already done" and rows["a.dcm"].output == "out/a.nii.gz"
    assert rows["b.dcm"].status == "converted" and rows["b.dcm"].reason == ""
    assert resumed.counts()["already done"] == 1 and resumed.counts()["converted"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_bad_status_and_foreign_files_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="already done"):
        ReportRow("a", "ok")  # type: ignore[arg-type]
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="x.csv"):
        RunReport(bad)


def test_memory_columns_round_trip_and_old_reports_still_read(tmp_path):
    path = report_path(tmp_path, "restore")
    report = RunReport(path)
    report.add(ReportRow("a.nii.gz", "written", output="o/a.nii.gz", cpu_peak_mb=812.5, gpu_peak_mb=1024.0))
    report.add(ReportRow("b.nii.gz", "failed", reason="bad header"))
    rows = {r.input: r for r in read_report(path)}
    assert rows["a.nii.gz"].cpu_peak_mb == 812.5 and rows["a.nii.gz"].gpu_peak_mb == 1024.0
    assert rows["b.nii.gz"].cpu_peak_mb is None and rows["b.nii.gz"].gpu_peak_mb is None  # empty cells
    old = tmp_path / "old_report.csv"  # written before the memory columns existed
    old.write_text(
        "input,status,reason,series_uid,output,seconds,time\na,written,,,o/a,1.5,2026-01-01T00:00:00Z\n"
    )
    (row,) = read_report(old)
    assert row.seconds == 1.5 and row.cpu_peak_mb is None
    resumed = RunReport(old)
    resumed.add(ReportRow("a", "already done"))
    assert read_report(old)[0].status == "already done"  # rewritten with the new columns


def test_a_late_skipped_row_of_a_racing_run_does_not_hide_a_written_output(tmp_path):
    """Two runs on one OUTPUT: the one that found a series claimed by the other reports it 'skipped', possibly
    after the other has merged 'converted' into the report on disk; the report keeps 'converted'. A skipped input
    without an output, and a failure after a skip, are recorded as they come."""
    path = report_path(tmp_path, "convert")
    winner, loser = RunReport(path), RunReport(path)
    winner.add(ReportRow("s/1.dcm", "converted", output="out/s.nii.gz"))
    loser = RunReport(path)  # re-reads, as ReportWriter does under the folder lock
    loser.add(ReportRow("s/1.dcm", "skipped", reason="being converted by another process"))
    loser.add(ReportRow("x.txt", "skipped", reason="not DICOM"))
    loser.add(ReportRow("t/1.dcm", "skipped", reason="being converted by another process"))
    loser.add(ReportRow("t/1.dcm", "failed", reason="missing slice"))
    rows = {r.input: r for r in read_report(path)}
    assert rows["s/1.dcm"].status == "converted" and rows["s/1.dcm"].output == "out/s.nii.gz"
    assert rows["x.txt"].status == "skipped" and rows["t/1.dcm"].status == "failed"
