"""``medfusion evaluate`` end to end on a tiny built-in dataset with tiny exported models.

Oracles: summary numbers recomputed from ``cases.csv``; identity's paired difference is exactly 0; a ReZero
supervised restorer at initialisation is the identity map; the same seed gives the same intervals; baselines never
read the split under evaluation or the test split; each test-split evaluation adds one line to ``test_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from medfusion.apps import evaluate as E
from medfusion.data.manifest import load_manifest
from medfusion.eval.ct_protocol import CASE_METRICS
from medfusion.eval.provenance import environment
from medfusion.eval.report import read_cases_csv
from medfusion.models.export import export_model, weights_sha256
from medfusion.models.supervised import SupervisedRestorer


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medfusion evaluate")
    E.add_arguments(parser)
    return E.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medfusion.data.builtin import make_dataset

    root = tmp_path_factory.mktemp("evaluate")
    manifests = make_dataset(
        root / "ds", n_patients=12, dim=2, size=32, split=(0.5, 0.2, 0.3), progress=False
    )
    torch.manual_seed(0)
    export_model(SupervisedRestorer(channels=(4, 8), strides=(2,), rezero=True), root / "rezero")
    export_model(SupervisedRestorer(channels=(4, 8), strides=(2,), rezero=False), root / "random")
    return root, manifests


def _argv(root, manifests, out, split="test", *extra):
    return ["--task", "standardize", "--manifest", str(manifests["standardize"]), "--split", split,
            "--model", str(root / "random"), "--baseline", "identity", "--baseline", "gaussian",
            "--baseline", "linear-filter", "--baseline", f"supervised:{root / 'rezero'}",
            "--baseline", f"noise-matched:{root / 'rezero'}", "--output", str(out),
            "--device", "cpu", "--n-boot", "300", "--quiet", *extra]  # fmt: skip


def test_evaluate_end_to_end(data, tmp_path, capsys):
    root, manifests = data
    out = tmp_path / "out"
    assert _run(_argv(root, manifests, out)) == 0, capsys.readouterr().err
    for name in (
        "summary.json",
        "cases.csv",
        "report.md",
        "test_log.jsonl",
        "figures/box_plots.png",
        "figures/examples.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["environment"]["source"] == environment()["source"]  # commit of the code that scored
    assert "Environment: medfusion" in (out / "report.md").read_text()
    rows = read_cases_csv(out / "cases.csv")
    test = load_manifest(manifests["standardize"]).split("test")
    methods = ["identity", "gaussian", "linear-filter", "random", "supervised:rezero", "noise-matched:rezero"]
    assert list(summary["methods"]) == methods
    assert len(rows) == len(test) * len(methods)  # case x protocol x method (one sample each)
    assert summary["n_patients"] == len({e["case_id"] for e in test}) >= 2
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        for k in CASE_METRICS:
            est = summary["methods"][m]["metrics"][k]
            assert est["mean"] == pytest.approx(np.mean([r[k] for r in mine]), rel=1e-12)
            assert est["n"] == len(mine) and est["ci"][0] <= est["mean"] <= est["ci"][1]
            for p, block in summary["methods"][m]["per_protocol"].items():
                assert block["metrics"][k]["mean"] == pytest.approx(
                    np.mean([r[k] for r in mine if r["protocol"] == p])
                )
        tex = summary["methods"][m]["texture_ccc"]
        assert -1.0 <= tex["mean"] <= 1.0 and tex["ci"][0] <= tex["mean"] <= tex["ci"][1]
    for k in CASE_METRICS:
        assert summary["methods"]["identity"]["vs_identity"][k] == {
            "mean": 0.0, "ci": [0.0, 0.0], "n": len(test), "n_patients": summary["n_patients"]}  # fmt: skip
        # a ReZero residual U-Net at initialisation is the identity map: same scores to float rounding
        d = summary["methods"]["supervised:rezero"]["vs_identity"][k]
        assert abs(d["mean"]) < 1e-3 * max(1.0, abs(summary["methods"]["identity"]["metrics"][k]["mean"]))
    sd = {n: summary["methods"][n]["metrics"]["noise_sd"]["mean"] for n in methods}
    assert sd["gaussian"] <= sd["identity"]  # a low-pass never adds noise in a uniform region
    assert sd["noise-matched:rezero"] > sd["supervised:rezero"]  # the same output plus standard-protocol noise
    assert summary["run"]["models"]["random"]["weights_sha256"] == weights_sha256(root / "random")
    report = (out / "report.md").read_text()
    assert "figures/examples.png" in report and "95% percentile bootstrap over patients" in report
    printed = capsys.readouterr().out
    assert "supervised:rezero" in printed and "report.md" in printed


def test_same_seed_same_intervals_and_test_log_lines(data, tmp_path, capsys):
    root, manifests = data
    out = tmp_path / "out"
    assert _run(_argv(root, manifests, out)) == 0
    first = json.loads((out / "summary.json").read_text())
    assert _run(_argv(root, manifests, out)) == 2  # outputs exist: nothing done, one line on stderr
    assert "already exists" in capsys.readouterr().err
    log = tmp_path / "bench_log.jsonl"
    assert _run(_argv(root, manifests, out, "test", "--overwrite", "--test-log", str(log))) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["methods"] == first["methods"]  # same seed: same means and intervals
    lines = [json.loads(s) for s in (out / "test_log.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(rec["split"] == "test" for rec in lines)
    assert lines[1]["models"]["random"]["weights_sha256"] == weights_sha256(root / "random")
    assert "--split test" in lines[1]["command"] and lines[1]["date"]
    assert len(log.read_text().splitlines()) == 1
    val = tmp_path / "val"
    assert _run(_argv(root, manifests, val, "validation")) == 0
    assert not (val / "test_log.jsonl").exists()  # only looks at the test split are logged


@pytest.mark.parametrize("split", ["test", "validation"])
def test_baselines_fit_without_reading_the_evaluated_or_test_split(data, split):
    from medfusion.eval.ct_protocol import read_case

    root, manifests = data
    man = load_manifest(manifests["standardize"])
    seen: list[tuple[str, str]] = []

    def spy(entry):
        seen.append((entry["case_id"], entry["source"]))
        return read_case(entry)

    methods = E.fit_baselines(["gaussian", "linear-filter"], man, split, read=spy)
    assert [m.name for m in methods] == ["gaussian", "linear-filter"]
    assert E.fit_noise(man, split, read=spy).nps.ndim == 2
    forbidden = {e["source"] for s in {"test", split} for e in man.split(s)}
    assert seen and not forbidden & {src for _, src in seen}
    assert {src for _, src in seen} == {e["source"] for s in E.fit_splits(split) for e in man.split(s)}


def test_samples_and_model_options(data, tmp_path):
    root, manifests = data
    out = tmp_path / "out"
    summary = E.evaluate(manifests["standardize"], out, split="validation", models=[f"{root / 'random'}@overlap=0.5"],
                         baselines=["identity"], samples=2, n_boot=50, device="cpu")  # fmt: skip
    assert summary["methods"]["random@overlap=0.5"]["samples"] == 2
    rows = read_cases_csv(out / "cases.csv")
    s0 = [r["psnr"] for r in rows if r["method"].startswith("random") and r["sample"] == 0]
    s1 = [r["psnr"] for r in rows if r["method"].startswith("random") and r["sample"] == 1]
    assert len(s0) == len(s1) > 0 and s0 == s1  # a deterministic model gives the same output for every seed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--baseline", "median"], "unknown baseline"),
        (["--model", "/nonexistent/model"], "model not found"),
        (["--model", "MODEL@bogus=1"], "bogus"),
        (["--window", "1000,-1000"], "--window must have HI > LO"),
        (["--soft-window", "0;1"], "--soft-window must be two numbers"),
    ],
)
def test_bad_arguments_print_one_line_and_write_nothing(data, tmp_path, capsys, extra, message):
    root, manifests = data
    out = tmp_path / "out"
    extra = [e.replace("MODEL", str(root / "random")) for e in extra]
    argv = ["--task", "standardize", "--manifest", str(manifests["standardize"]), "--split", "test",
            "--output", str(out), "--device", "cpu", *extra]  # fmt: skip
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_intensity_window_and_roi_label_set_the_metrics(data, tmp_path):
    """Non-CT data give their own range: PSNR over the body recomputed from the images with the given window, the
    noise SD taken in the given label, both written into the report."""
    from medfusion.eval.ct_protocol import CTProtocol, read_case
    from medfusion.eval.image import noise_sd, psnr

    root, manifests = data
    out = tmp_path / "mr"
    argv = ["--task", "standardize", "--manifest", str(manifests["standardize"]), "--split", "validation",
            "--output", str(out), "--device", "cpu", "--n-boot", "50", "--quiet", "--window=-200,300",
            "--soft-window=-100,100", "--roi-label", "1"]  # fmt: skip
    assert _run(argv) == 0
    rows = [r for r in read_cases_csv(out / "cases.csv") if r["method"] == "identity"]
    man = load_manifest(manifests["standardize"], task="standardize")
    entry = next(e for e in man.split("validation") if e["case_id"] == rows[0]["case_id"]
                 and e["protocol"] == rows[0]["protocol"])  # fmt: skip
    case = read_case(entry)
    a, b = np.clip(case.source, -200, 300), np.clip(case.reference, -200, 300)
    assert float(rows[0]["psnr_body"]) == pytest.approx(psnr(a, b, data_range=500, mask=case.label > 0), abs=1e-4)
    roi = CTProtocol(roi_labels=(1,)).uniform_roi(case.label)
    assert float(rows[0]["noise_sd"]) == pytest.approx(noise_sd(case.source, roi), abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["windows"] == {"metric": [-200.0, 300.0], "soft": [-100.0, 100.0], "texture": [-100.0, 100.0]}
    report = (out / "report.md").read_text()
    assert "PSNR/SSIM on [-200, 300], soft window [-100, 100], texture grey levels on [-100, 100]" in report
    assert "--roi-label 1" in report and "noise SD (HU)" in report  # a 500-unit window: CT numbers
    from medfusion.eval.report import report_markdown

    mr = report_markdown({**summary, "windows": {"metric": [0, 1], "soft": [0, 1], "texture": [0, 1]}}, {}, {})
    assert "noise SD (HU)" not in mr and "| noise SD |" in mr  # intensities in [0, 1] are not HU


def test_texture_features_quantise_in_the_protocols_texture_window():
    """Intensities in [0, 1] all fall in one grey level of the CT window, so every feature is constant and the CCC
    says nothing; in their own window the features see the difference between two images."""
    from medfusion.eval.ct_protocol import CTProtocol

    rng = np.random.default_rng(0)
    label = np.zeros((32, 32), np.uint8)
    label[4:28, 4:28] = 3
    refs = [0.5 + 0.1 * rng.normal(size=(32, 32)) for _ in range(6)]
    outs = [r * 0 + 0.5 + 0.02 * (i + 1) * rng.normal(size=r.shape) for i, r in enumerate(refs)]  # other texture
    ct = CTProtocol(roi_labels=(3,))
    mr = CTProtocol(roi_labels=(3,), texture_window=(0.0, 1.0))
    assert mr.texture_ccc(outs, refs, [label] * 6) < 0.9
    assert not ct.texture_ccc(outs, refs, [label] * 6) < 0.9  # 1 or NaN: one grey level
