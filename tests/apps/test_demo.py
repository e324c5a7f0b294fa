"""``medfusion demo``: the main job end to end at toy size, and its budget files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medfusion.apps import demo
from medfusion.cli import main
from medfusion.data.manifest import load_manifest
from medfusion.eval.ct_protocol import CASE_METRICS
from medfusion.eval.image import psnr
from medfusion.io.nifti import read_nifti


def _hu(path: Path) -> np.ndarray:
    return np.clip(np.asarray(read_nifti(path).array, dtype=np.float64), -1000.0, 1000.0)


def test_demo_quick_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    budget = yaml.safe_load((demo.BUDGET_DIR / "quick.yaml").read_text())
    budget["data"]["workers"] = 1  # the training loader in worker processes (as the CUDA budget runs it)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)  # the cap (CPUs - 2) would allow none on 2 cores
    (tmp_path / "budget.yaml").write_text(yaml.safe_dump(budget))
    argv = ["demo", "--output", str(out), "--quick", "--device", "cpu", "--budget", str(tmp_path / "budget.yaml")]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test_entries = [dict(e) for e in load_manifest(out / "data" / "manifests" / "standardize.json").split("test")]
    protocols = {e["protocol"] for e in test_entries}
    assert set(metrics["protocols"]) == protocols and "standard" not in protocols
    assert metrics["budget"]["sampling"]["decode"] == "residual" and metrics["budget"]["stage2"]["regression"]
    assert metrics["budget"]["ae_steps_done"] == 2 and metrics["budget"]["dm_steps_done"] == 2
    assert metrics["budget"]["workers_used"] == 1
    assert metrics["budget"]["short"] is False and metrics["budget"]["guard_fired"] == []
    shown = metrics["shown"]["method"]
    assert shown in ("diffusion_ct", "diffusion_ct_mean") and "validation" in metrics["shown"]["why"]
    scores = metrics["shown"]["validation_psnr_body"]
    assert scores[shown] == max(scores[n] for n in ("diffusion_ct", "diffusion_ct_mean"))
    exported = yaml.safe_load((out / "models" / "diffusion_ct" / "config.yaml").read_text())["init_args"]
    assert exported["sampling"]["mean_only"] is (shown == "diffusion_ct_mean")  # standardize's default = shown
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    for m, v in metrics["intervals"].items():  # printed intervals are the evaluation's
        assert v["psnr_body"] == summary["methods"][m]["metrics"]["psnr_body"]
        assert v["psnr_body"]["ci"][0] <= v["psnr_body"]["mean"] <= v["psnr_body"]["ci"][1]
    assert metrics["intervals"]["identity"]["vs_identity"]["mean"] == 0.0
    rows = {"identity", "passthrough", "diffusion_ct", "diffusion_ct_latent", "diffusion_ct_mean"}

    for proto, res in metrics["protocols"].items():
        assert set(res) == rows
        for m in res.values():
            assert set(m) == {*CASE_METRICS, "texture_ccc"}
            assert np.isfinite(m["psnr"]) and 0 < m["noise_sd"]
        entries = [e for e in test_entries if e["protocol"] == proto]
        # metrics are against the standard scan: recomputed from the NIfTI files on disk
        src = [_hu(e["source"]) for e in entries]
        std = [_hu(e["target"]) for e in entries]
        outs = [_hu(out / "standardized" / f"{e['case_id']}_{proto}.nii.gz") for e in entries]
        assert res["identity"]["psnr"] == pytest.approx(np.mean([psnr(s, r, 2000.0) for s, r in zip(src, std)]))
        assert res[shown]["psnr"] == pytest.approx(
            np.mean([psnr(o, r, 2000.0) for o, r in zip(outs, std)]), abs=1e-3
        )
        # the standardized scans are not the input
        assert all(o.shape == s.shape and not np.allclose(o, s) for o, s in zip(outs, src))
    assert len(sorted((out / "standardized").glob("*.nii.gz"))) == len(test_entries)
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "identity" in printed and "chosen on validation" in printed and "95% patient-bootstrap" in printed
    assert "SHORT RUN" not in printed
    # the exported model is usable by `medfusion standardize`
    rc = main(["standardize", "--ckpt", str(out / "models" / "diffusion_ct"), "--input",
               str(test_entries[0]["source"]), "--output", str(tmp_path / "again.nii.gz"), "--quiet"])  # fmt: skip
    assert rc == 0
    # a second run into the same, non-empty folder is refused
    assert main(["demo", "--output", str(out), "--quick"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_budget_files_load_and_bad_ones_are_refused(tmp_path, monkeypatch):
    budgets = {name: demo.load_budget(demo.BUDGET_DIR / f"{name}.yaml") for name in demo.BUDGETS}
    assert demo.default_budget(quick=False, cuda=False).name == "cpu.yaml"
    assert demo.default_budget(quick=False, cuda=True).name == "cuda.yaml"
    assert demo.default_budget(quick=True, cuda=True).name == "quick.yaml"
    assert budgets["cuda"].stage2.steps > budgets["cpu"].stage2.steps > budgets["quick"].stage2.steps
    assert budgets["cpu"].stage1.channels == (32, 64, 64)  # YAML lists become tuples
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    assert demo.loader_workers(budgets["cuda"]) == 6 and demo.loader_workers(budgets["cpu"]) == 0
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 4)
    assert demo.loader_workers(budgets["cuda"]) == 2
    # the long CPU budget is the demo's networks and settings with more patients and steps, nothing else
    long, cpu = demo.load_budget(demo.BUDGET_DIR / "cpu_long.yaml"), budgets["cpu"]
    assert long.stage2.steps > cpu.stage2.steps and long.data.patients > cpu.data.patients
    same = lambda b: dataclasses.replace(  # noqa: E731
        b,
        data=dataclasses.replace(b.data, patients=0),
        stage1=dataclasses.replace(b.stage1, steps=0, minutes=0.0),
        stage2=dataclasses.replace(b.stage2, steps=0, minutes=0.0),
    )
    assert same(long) == same(cpu)
    doc = yaml.safe_load((demo.BUDGET_DIR / "cpu.yaml").read_text())
    doc["stage1"]["steps_typo"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="steps_typo.*valid keys"):
        demo.load_budget(tmp_path / "bad.yaml")
    doc["stage1"].pop("steps_typo")
    doc["sampling"]["decode"] = "both"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="residual"):
        demo.load_budget(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="does not exist"):
        demo.load_budget(tmp_path / "missing.yaml")


def test_guard_note_marks_a_short_stage():
    lines: list[str] = []
    assert demo._guard_note("stage 1", 10, 10, 3.0, lines.append) == [] and not lines
    assert demo._guard_note("stage 2", 7, 10, 3.0, lines.append) == ["stage 2"]
    assert "safety stop fired" in lines[0] and "7 of 10 steps" in lines[0]
