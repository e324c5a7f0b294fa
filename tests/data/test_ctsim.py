"""CT acquisition simulator: physics checks (issue 3) and the protocol contract."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from medfusion.data import ctsim
from medfusion.data.ctsim import PROTOCOLS, STANDARD, Protocol, simulate
from medfusion.data.phantoms import LABEL_IDS, torso_phantom
from medfusion.eval.image import edge_sharpness, noise_sd

N = 64


def _water_phantom(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """A 300 mm water cylinder in air (FOV 400 mm) and its eroded interior mask."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) * (400.0 / n)
    img = np.where(r < 150.0, 0.0, -1000.0).astype(np.float32)
    return img, r < 100.0


@pytest.fixture(scope="module")
def torso():
    return torso_phantom((N, N), seed=1)


def test_protocol_table():
    assert STANDARD == "standard" and STANDARD in PROTOCOLS
    assert {"sharp", "smooth", "low_dose", "thick"} <= set(PROTOCOLS)
    for name, p in PROTOCOLS.items():
        assert p.name == name and p.kernel in ctsim.KERNELS and p.description
    with pytest.raises(ValueError, match="valid"):
        Protocol("x", "gaussian", 1.0, 2.5, 0.0, 120, 200.0, "bad kernel")
    with pytest.raises(ValueError, match="valid"):
        simulate(np.zeros((8, 8)), "nonexistent", seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROTOCOLS[STANDARD].dose = 2.0  # type: ignore[misc]


def test_noiseless_ramp_reconstruction_reproduces_the_phantom(torso):
    sino = ctsim.project(torso.hu, pixel_size_mm=400.0 / N, n_views=ctsim.default_n_views(N))
    rec = ctsim.reconstruct_noiseless(sino, "sharp", pixel_size_mm=400.0 / N)
    # uniform interiors are reproduced to a few HU; the global error is dominated by edges (discretisation)
    for name in ("liver", "heart", "lung"):
        m = ndi.binary_erosion(torso.labels == LABEL_IDS[name], iterations=1)
        assert m.sum() > 5
        assert abs(float(np.median(rec[m] - torso.hu[m]))) < 10.0, name
    body = torso.labels > 0
    assert np.corrcoef(rec[body], torso.hu[body])[0, 1] > 0.97
    water, inner = _water_phantom()
    rec_w = ctsim.reconstruct_noiseless(
        ctsim.project(water, pixel_size_mm=400.0 / N, n_views=101), "sharp", pixel_size_mm=400.0 / N
    )
    assert abs(float(rec_w[inner].mean())) < 5.0


def test_water_and_air_hu_are_preserved():
    water, inner = _water_phantom()
    img = simulate(water, STANDARD, seed=0)
    assert abs(float(img[inner].mean())) < 5.0  # water ~ 0 HU
    yy, xx = np.mgrid[:N, :N]
    r = np.hypot(yy - (N - 1) / 2, xx - (N - 1) / 2) * (400.0 / N)
    air = (r > 165) & (r < 190)
    assert abs(float(img[air].mean()) + 1000.0) < 10.0  # air ~ -1000 HU


def test_noise_sd_scales_as_inverse_sqrt_dose():
    water, inner = _water_phantom()
    base = PROTOCOLS[STANDARD]
    doses = np.array([0.25, 1.0, 4.0])
    sds = []
    for d in doses:
        p = dataclasses.replace(base, dose=float(d), electronic_noise=0.0)
        sds.append(np.mean([noise_sd(simulate(water, p, seed=s), inner) for s in range(2)]))
    slope = np.polyfit(np.log(doses), np.log(sds), 1)[0]
    assert -0.6 < slope < -0.4, (slope, sds)  # SD ~ dose^-1/2


def test_sharper_kernel_gives_more_noise_and_sharper_edges(torso):
    water, inner = _water_phantom()
    body = torso.labels > 0
    noise, sharp = {}, {}
    for kernel in ("ramp", "shepp-logan", "hann"):
        p = dataclasses.replace(PROTOCOLS[STANDARD], kernel=kernel)
        noise[kernel] = noise_sd(simulate(water, p, seed=0), inner)
        sharp[kernel] = edge_sharpness(simulate(torso.hu, p, seed=0), body)
    assert noise["ramp"] > noise["shepp-logan"] > noise["hann"]
    assert sharp["ramp"] > sharp["shepp-logan"] > sharp["hann"]


def test_simulate_is_deterministic_for_a_seed_and_differs_between_seeds(torso):
    a = simulate(torso.hu, "low_dose", seed=3)
    b = simulate(torso.hu, "low_dose", seed=3)
    c = simulate(torso.hu, "low_dose", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == torso.hu.shape


def test_3d_scans_slice_by_slice_and_thickness_blurs_along_z():
    vol = np.full((32, 32, 9), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:32, :32]
    disk = np.hypot(yy - 15.5, xx - 15.5) < 10
    vol[disk, 4] = 0.0  # one thin water slab at slice 4
    thin = dataclasses.replace(PROTOCOLS[STANDARD], slice_thickness_mm=1.0, electronic_noise=0.0, dose=100.0)
    thick = dataclasses.replace(thin, slice_thickness_mm=15.0)
    a = simulate(vol, thin, seed=0, slice_spacing_mm=5.0)
    b = simulate(vol, thick, seed=0, slice_spacing_mm=5.0)
    inner = np.hypot(yy - 15.5, xx - 15.5) < 6
    assert a.shape == vol.shape
    assert abs(a[inner, 4].mean()) < 20 and abs(a[inner, 3].mean() + 1000) < 20  # thin: no z spread
    assert -800 < b[inner, 3].mean() < -500 and b[inner, 4].mean() < -500  # thick: partial volume along z
    np.testing.assert_allclose(ctsim.thickness_blur(vol, 5.0, 15.0).sum(axis=2), vol.sum(axis=2), rtol=1e-5)


# --- one raw acquisition, several reconstructions (scan_protocols) ------------------------------------------------


def _water_rows(n_rows: int = 5):
    img, roi = _water_phantom()
    return np.repeat(img[:, :, None], n_rows, axis=2), roi


def _noise_field(scan: np.ndarray, protocol: Protocol, img: np.ndarray) -> np.ndarray:
    sino = ctsim.project(img, pixel_size_mm=400.0 / N, n_views=ctsim.default_n_views(N))
    return scan - ctsim.reconstruct_noiseless(sino, protocol, pixel_size_mm=400.0 / N)


def test_protocols_of_equal_dose_and_thickness_share_their_raw_data():
    rows, roi = _water_rows()
    std = PROTOCOLS[STANDARD]
    twin = dataclasses.replace(std, name="twin")
    smooth = PROTOCOLS["smooth"]
    out = ctsim.scan_protocols(
        rows, [std, twin, smooth], seed=0, pixel_size_mm=400.0 / N, row_mm=1.0, slices=[2]
    )
    np.testing.assert_array_equal(out[STANDARD], out["twin"])  # same photons, same kernel: the same image
    # same photons, another kernel: the smooth noise is a low-pass of the standard noise (strongly correlated)
    a = _noise_field(out[STANDARD][..., 0], std, rows[..., 2])[roi]
    b = _noise_field(out["smooth"][..., 0], smooth, rows[..., 2])[roi]
    assert np.corrcoef(a, b)[0, 1] > 0.6


def test_lower_dose_is_noise_insertion_into_the_standard_scan():
    """Nested photons: corr(noise_low, noise_std) = sqrt(dose_low / dose_std); an independent scan: 0."""
    rows, roi = _water_rows()
    std, low = (
        PROTOCOLS[STANDARD],
        dataclasses.replace(PROTOCOLS["low_dose"], dose=0.25, electronic_noise=0.0),
    )
    std = dataclasses.replace(std, electronic_noise=0.0)
    kw = dict(pixel_size_mm=400.0 / N, row_mm=1.0, slices=[2])
    out = ctsim.scan_protocols(rows, [std, low], seed=0, **kw)
    rep = ctsim.scan_protocols(rows, [std], seed=1, **kw)[STANDARD]
    n_std = _noise_field(out[STANDARD][..., 0], std, rows[..., 2])[roi]
    n_low = _noise_field(out["low_dose"][..., 0], low, rows[..., 2])[roi]
    n_rep = _noise_field(rep[..., 0], std, rows[..., 2])[roi]
    assert abs(np.corrcoef(n_std, n_low)[0, 1] - 0.5) < 0.08
    assert abs(np.corrcoef(n_std, n_rep)[0, 1]) < 0.08
    assert n_low.std() / n_std.std() == pytest.approx(2.0, rel=0.1)  # 1 / sqrt(0.25)


def test_thick_slices_from_thin_rows_follow_the_flux_rule():
    """Combining 5 one-mm rows gives the noise of one 5 mm detector row (variance 1 / (dose I0 thickness))."""
    rows, roi = _water_rows()
    thick = dataclasses.replace(PROTOCOLS["thick"], electronic_noise=0.0)
    combined = ctsim.scan_protocols(rows, [thick], seed=0, pixel_size_mm=400.0 / N, row_mm=1.0, slices=[2])
    single = simulate(rows[..., 2], thick, seed=0)  # one 5 mm row
    assert noise_sd(combined["thick"][..., 0], roi) == pytest.approx(noise_sd(single, roi), rel=0.1)


def test_scan_protocols_rejects_bad_arguments():
    rows, _ = _water_rows()
    kw = dict(seed=0, pixel_size_mm=400.0 / N, row_mm=1.0)
    with pytest.raises(ValueError, match="unique"):
        ctsim.scan_protocols(rows, [STANDARD, STANDARD], **kw)
    with pytest.raises(ValueError, match="slices"):
        ctsim.scan_protocols(rows, [STANDARD], slices=[5], **kw)
    with pytest.raises(ValueError, match="unknown protocol"):
        ctsim.scan_protocols(rows, ["nope"], **kw)
    with pytest.raises(ValueError, match="row_mm"):
        ctsim.scan_protocols(rows, [STANDARD], seed=0, pixel_size_mm=1.0, row_mm=0.0)
