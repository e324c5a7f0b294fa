"""The CT evaluation protocol: metrics against the standard scan, ROIs, per-protocol scoring and table rows."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.eval import ct_protocol as P
from medfusion.eval.image import edge_sharpness, noise_sd, psnr, ssim

LIVER, MUSCLE, SOFT = 9, 2, 3


def _case(rng, protocol: str, case_id: str, noise: float) -> P.Case:
    yy, xx = np.mgrid[:48, :48]
    label = np.zeros((48, 48), np.int32)
    body = np.hypot(yy - 24, xx - 24) < 20
    label[body] = SOFT
    label[(np.abs(yy - 24) < 8) & (np.abs(xx - 20) < 8)] = LIVER
    ref = np.where(body, 40.0, -1000.0) + rng.normal(0, 5, label.shape)
    src = ref + rng.normal(0, noise, ref.shape)
    return P.Case(case_id, protocol, src.astype(np.float32), ref.astype(np.float32), label, np.eye(4))


def test_image_metrics_use_the_stated_windows_and_roi(rng):
    proto = P.CTProtocol.for_label_ids({"liver": LIVER, "muscle": MUSCLE, "soft_tissue": SOFT})
    c = _case(rng, "low_dose", "a", 30.0)
    m = proto.image_metrics(c.source, c.reference, c.label)
    a, b = np.clip(c.source, -1000, 1000), np.clip(c.reference, -1000, 1000)
    assert m["psnr"] == pytest.approx(psnr(a, b, 2000.0))
    assert m["ssim"] == pytest.approx(ssim(a, b, 2000.0))
    assert m["psnr_soft"] == pytest.approx(psnr(np.clip(c.source, -160, 240), np.clip(c.reference, -160, 240), 400.0))
    body = c.label > 0
    assert m["psnr_body"] == pytest.approx(psnr(a[body], b[body], 2000.0))
    sa, sb = np.clip(c.source, -160, 240), np.clip(c.reference, -160, 240)
    assert m["psnr_soft_body"] == pytest.approx(psnr(sa[body], sb[body], 400.0))
    assert m["psnr_body"] < m["psnr"]  # the air outside the body agrees exactly and inflates the frame's PSNR
    assert tuple(m) == P.CASE_METRICS
    roi = proto.uniform_roi(c.label)
    assert roi.sum() >= 16 and np.all(c.label[roi] == LIVER)  # the eroded liver, not the soft tissue
    assert m["noise_sd"] == pytest.approx(noise_sd(c.source, roi))
    assert m["edge_sharpness"] == pytest.approx(edge_sharpness(c.source, c.label > 0))
    # no organ large enough: the eroded body
    no_liver = np.where(c.label == LIVER, SOFT, c.label)
    assert np.all(no_liver[proto.uniform_roi(no_liver)] == SOFT)
    with pytest.raises(ValueError, match="muscle"):
        P.CTProtocol.for_label_ids({"liver": 1})


def test_score_methods_orders_methods_and_writes_rows(rng):
    proto = P.CTProtocol(roi_labels=(LIVER,))
    cases = [_case(rng, p, f"c{i}", n) for i in range(3) for p, n in (("sharp", 40.0), ("smooth", 20.0))]
    grouped = P.by_protocol(cases)
    assert list(grouped) == ["sharp", "smooth"] and all(len(v) == 3 for v in grouped.values())
    methods = {"identity": lambda s, p: s, "oracle-ish": lambda s, p: s * 0.0 + 0.0}
    outputs = {p: P.run_methods(cs, methods) for p, cs in grouped.items()}
    outputs = {p: {"identity": o["identity"], "reference": [c.reference for c in grouped[p]]} for p, o in outputs.items()}
    res = P.score_methods(proto, outputs, grouped)
    for p in grouped:
        assert res[p]["reference"]["psnr"] == float("inf") and res[p]["reference"]["texture_ccc"] == 1.0
        assert res[p]["identity"]["psnr"] == pytest.approx(
            np.mean([proto.image_metrics(c.source, c.reference, c.label)["psnr"] for c in grouped[p]])
        )
    assert res["sharp"]["identity"]["psnr"] < res["smooth"]["identity"]["psnr"]  # more noise, lower PSNR
    mean = P.mean_over_protocols(res)
    assert mean["identity"]["ssim"] == pytest.approx(np.mean([res[p]["identity"]["ssim"] for p in res]))
    rows = P.markdown_rows(mean, extra={"time s": {"identity": "0.1"}})
    assert rows[0].startswith("| method | PSNR dB") and rows[0].endswith("time s |") and len(rows) == 4
    assert rows[2].startswith("| identity |") and rows[2].endswith("| 0.1 |")
    assert np.isnan(proto.texture_ccc([cases[0].source], [cases[0].reference], [cases[0].label]))
