"""``medfusion demo --quick``: the main job end to end at toy size."""

from __future__ import annotations

import json

import numpy as np

from medfusion.cli import main
from medfusion.io.nifti import read_nifti


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--quick", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test_entries = json.loads((out / "data" / "manifests" / "standardize.json").read_text())["test"]
    protocols = {e["protocol"] for e in test_entries}
    assert set(metrics["protocols"]) == protocols and "standard" not in protocols
    for res in metrics["protocols"].values():
        other = "latent" if metrics["budget"]["decode"] == "residual" else "residual"
        mean_row = {"diffusion_ct_mean"} if metrics["budget"]["regression"] else set()
        assert set(res) == {"identity", "passthrough", "diffusion_ct", f"diffusion_ct_{other}"} | mean_row
        assert metrics["budget"]["regression"]  # the default budget trains the regression U-Net (session 6)
        for m in res.values():
            assert {"psnr", "ssim", "noise_sd", "edge_sharpness", "texture_ccc"} <= set(m)
            assert np.isfinite(m["psnr"]) and 0 < m["noise_sd"]
    assert metrics["budget"]["ae_steps_done"] == 2 and metrics["budget"]["dm_steps_done"] == 2
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = sorted((out / "standardized").glob("*.nii.gz"))
    assert len(outputs) == len(test_entries)
    src = read_nifti(out / "data" / test_entries[0]["source"].replace("../", ""))
    std = read_nifti(
        out / "standardized" / f"{test_entries[0]['case_id']}_{test_entries[0]['protocol']}.nii.gz"
    )
    assert std.array.shape == src.array.shape and np.isfinite(std.array).all()
    assert "identity" in capsys.readouterr().out
    # the exported model is usable by `medfusion standardize`
    rc = main(["standardize", "--ckpt", str(out / "models" / "diffusion_ct"), "--input",
               str(out / "data" / test_entries[0]["source"].replace("../", "")), "--output",
               str(tmp_path / "again.nii.gz"), "--quiet"])  # fmt: skip
    assert rc == 0
    # a second run into the same, non-empty folder is refused
    assert main(["demo", "--output", str(out), "--quick"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_demo_trains_with_persistent_loader_workers(tmp_path, monkeypatch):
    """The CUDA budget feeds training from worker processes (session 7: on a GPU the crops bound the step)."""
    import dataclasses

    from medfusion.apps import demo

    assert demo.budget_for(quick=False, cuda=False).workers == 0
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    assert demo.budget_for(quick=False, cuda=True).workers == 6
    budget = dataclasses.replace(demo.budget_for(quick=True, cuda=False), workers=1)
    metrics = demo.run_demo(tmp_path / "demo", quick=True, device="cpu", budget=budget, log=lambda *a: None)
    assert metrics["budget"]["workers"] == 1
    assert metrics["budget"]["ae_steps_done"] == 2 and metrics["budget"]["dm_steps_done"] == 2
