"""``medfusion.eval.report``: scoring, summary with intervals, files; synthetic cases with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfusion.eval import report as R
from medfusion.eval.ct_protocol import CASE_METRICS, Case, CTProtocol

LIVER, SOFT = 9, 3
PROTO = CTProtocol.for_label_ids({"liver": LIVER, "muscle": 2, "soft_tissue": SOFT})


def _cases(n_patients=6, protocols=("low_dose", "sharp")) -> list[Case]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    out = []
    for p in range(n_patients):
        label = np.zeros((40, 40), np.int32)
        body = np.hypot(yy - 20, xx - 20) < 16 + p % 3
        label[body] = SOFT
        label[(np.abs(yy - 20) < 7) & (np.abs(xx - 17) < 7)] = LIVER
        ref = np.where(body, 40.0 + 10 * p, -900.0) + rng.normal(0, 5, label.shape)  # inside the window: no clipping
        for i, proto in enumerate(protocols):
            src = ref + rng.normal(0, 20 + 10 * i, ref.shape)
            out.append(Case(f"case_{p:03d}", proto, src.astype(np.float32), ref.astype(np.float32), label, np.eye(4)))
    return out


def _half_way(case: Case, sample: int) -> np.ndarray:
    return (case.source + case.reference) / 2  # halves the error: +6.02 dB PSNR on every case


def test_summary_matches_rows_and_known_gains(tmp_path):
    cases = _cases()
    methods = [R.Method("half", _half_way)]
    summary = R.evaluate(cases, methods, PROTO, tmp_path / "out", seed=3, n_boot=400, header={"task": "t"})
    rows = R.read_cases_csv(tmp_path / "out" / "cases.csv")
    assert [r["method"] for r in rows[:2]] == ["identity", "half"]  # identity is added first
    assert len(rows) == 2 * len(cases)
    for m in ("identity", "half"):
        for k in CASE_METRICS:
            vals = [r[k] for r in rows if r["method"] == m]
            assert summary["methods"][m]["metrics"][k]["mean"] == pytest.approx(np.mean(vals), rel=1e-12)
    gain = summary["methods"]["half"]["vs_identity"]
    for k in ("psnr", "psnr_body"):  # the error halves inside [-1000, 1000]: exactly 20 log10(2) dB per case
        assert gain[k]["mean"] == pytest.approx(20 * np.log10(2), abs=2e-3)
        assert gain[k]["ci"] == pytest.approx([20 * np.log10(2)] * 2, abs=2e-3)
    assert summary["methods"]["half"]["metrics"]["noise_sd"]["mean"] < summary["methods"]["identity"]["metrics"]["noise_sd"]["mean"]
    assert summary["n_patients"] == 6 and summary["bootstrap"]["seed"] == 3
    assert set(summary["methods"]["half"]["per_protocol"]) == {"low_dose", "sharp"}
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["methods"]["half"]["metrics"]["psnr"] == summary["methods"]["half"]["metrics"]["psnr"]
    assert on_disk["run"] == {"task": "t"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Protocol sharp" in report and "figures/box_plots.png" in report
    with pytest.raises(FileExistsError):  # before any work
        R.evaluate(cases, methods, PROTO, tmp_path / "out")


def test_same_seed_same_intervals_other_seed_other_intervals():
    scores = R.score(_cases(), [R.Method("half", _half_way)], PROTO)
    a, b = (R.summarize(scores, seed=s, n_boot=300) for s in (0, 0))
    c = R.summarize(scores, seed=1, n_boot=300)
    assert a == b
    ci = lambda s: s["methods"]["identity"]["metrics"]["psnr_body"]["ci"]  # noqa: E731
    assert ci(a) != ci(c)
    tex = a["methods"]["half"]["texture_ccc"]
    assert tex["n_patients"] == 6 and tex["ci"][0] <= tex["mean"] <= tex["ci"][1]


def test_samples_are_rows_and_bad_methods_are_refused():
    draws = R.Method("noisy", lambda case, s: case.source + np.random.default_rng(s).normal(0, 5, case.source.shape), 3)
    scores = R.score(_cases(3, ("low_dose",)), [draws], PROTO)
    assert sorted({r["sample"] for r in scores.rows if r["method"] == "noisy"}) == [0, 1, 2]
    summary = R.summarize(scores, n_boot=50)
    assert summary["methods"]["noisy"]["samples"] == 3 and summary["methods"]["noisy"]["metrics"]["psnr"]["n"] == 9
    with pytest.raises(ValueError, match="unique"):
        R.score(_cases(2), [R.Method("a", _half_way), R.Method("a", _half_way)], PROTO)
    with pytest.raises(ValueError, match="shape"):
        R.score(_cases(2), [R.Method("crop", lambda c, s: c.source[1:])], PROTO)


def test_append_jsonl_adds_one_line_each(tmp_path):
    path = tmp_path / "log.jsonl"
    R.append_jsonl(path, {"a": 1, "x": float("nan")})
    R.append_jsonl(path, {"a": 2})
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines == [{"a": 1, "x": None}, {"a": 2}]
