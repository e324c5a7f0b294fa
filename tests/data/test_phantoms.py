"""Procedural torso phantoms: label table, HU per tissue, seeding, 2D/3D consistency, z-consistency."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from medfusion.data.phantoms import LABEL_IDS, LABELS, Phantom, affine, draw_anatomy, render, torso_phantom


def _interior(labels: np.ndarray, name: str, iterations: int = 1) -> np.ndarray:
    return ndi.binary_erosion(labels == LABEL_IDS[name], iterations=iterations)


def test_label_table_is_complete_and_contiguous():
    assert LABELS[0] == "background"
    assert sorted(LABELS) == list(range(len(LABELS)))
    for structure in (
        "fat",
        "muscle",
        "lung",
        "airway",
        "lung_vessel",
        "heart",
        "aorta",
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "spine",
        "ribs",
        "lung_nodule",
        "liver_lesion",
    ):
        assert structure in LABEL_IDS


@pytest.fixture(scope="module")
def vol():
    return torso_phantom((48, 48, 40), seed=3)


def test_3d_volume_contains_every_structure_with_realistic_hu(vol):
    hu, lab = vol.hu, vol.labels
    assert hu.dtype == np.float32 and lab.dtype == np.uint8 and hu.shape == lab.shape == (48, 48, 40)
    present = set(np.unique(lab).tolist())
    # every structure except possibly the (random, small) lesions is present in a whole-torso volume
    assert set(range(15)) <= present, sorted(set(range(15)) - present)
    ranges = {  # median HU in the structure interior
        "fat": (-130, -70),
        "muscle": (35, 65),
        "lung": (-920, -740),
        "heart": (25, 60),
        "liver": (40, 80),
        "spleen": (30, 65),
        "kidney_left": (15, 50),
        "kidney_right": (15, 50),
        "spine": (150, 1400),
    }
    for name, (lo, hi) in ranges.items():
        m = _interior(lab, name) if name not in ("spine",) else lab == LABEL_IDS[name]
        assert m.any(), name
        med = float(np.median(hu[m]))
        assert lo <= med <= hi, (name, med)
    assert np.all(hu[lab == 0][:10] == -1000.0)
    assert hu.min() >= -1000.0 and hu.max() < 1600.0
    # cortical bone is much denser than trabecular bone: spine HU spans both
    spine = hu[lab == LABEL_IDS["spine"]]
    assert np.percentile(spine, 95) > 700 and np.percentile(spine, 5) < 400


def test_3d_is_consistent_along_z_with_organs_starting_and_ending(vol):
    lab = vol.labels
    z_of = {
        name: np.nonzero((lab == LABEL_IDS[name]).any(axis=(0, 1)))[0]
        for name in ("lung", "liver", "kidney_left", "heart")
    }
    # each organ occupies a contiguous z-range that neither starts at the first nor ends at the last slice
    for name in ("liver", "kidney_left", "heart"):
        z = z_of[name]
        assert z.size > 2 and z.min() > 0 and z.max() < lab.shape[2] - 1, (name, z.min(), z.max())
    assert z_of["kidney_left"].mean() < z_of["liver"].mean() < z_of["heart"].mean() < z_of["lung"].max()
    # neighbouring slices are similar but not copies
    a, b = vol.hu[..., 20], vol.hu[..., 21]
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def test_seeded_reproducible_and_varies_between_patients():
    a = torso_phantom((64, 64), seed=5)
    b = torso_phantom((64, 64), seed=5)
    c = torso_phantom((64, 64), seed=6)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.mean(a.labels != c.labels) > 0.05
    areas = [np.sum(torso_phantom((48, 48), seed=s).labels > 0) for s in range(6)]
    assert np.std(areas) > 20  # body size varies between patients


def test_2d_slice_equals_the_matching_plane_of_a_volume():
    anat = draw_anatomy(11)
    sl = render(anat, (40, 40), (10.0, 10.0), z_center_mm=150.0)
    vol = render(anat, (40, 40, 3), (10.0, 10.0, 4.0), z_center_mm=150.0)
    np.testing.assert_allclose(sl.hu, vol.hu[..., 1], atol=1e-3)
    np.testing.assert_array_equal(sl.labels, vol.labels[..., 1])


def test_default_2d_slice_is_lower_thorax_and_lesions_flag_only_removes_lesions():
    with_l = torso_phantom((96, 96), seed=2)
    without = torso_phantom((96, 96), seed=2, lesions=False)
    present = set(np.unique(with_l.labels).tolist())
    assert {LABEL_IDS["lung"], LABEL_IDS["heart"], LABEL_IDS["spine"], LABEL_IDS["ribs"]} <= present
    lesion = np.isin(with_l.labels, [LABEL_IDS["lung_nodule"], LABEL_IDS["liver_lesion"]])
    assert not np.isin(without.labels, [LABEL_IDS["lung_nodule"], LABEL_IDS["liver_lesion"]]).any()
    ndi_ring = ndi.binary_dilation(lesion, iterations=2)
    np.testing.assert_array_equal(with_l.labels[~ndi_ring], without.labels[~ndi_ring])


def test_lung_has_vessel_texture():
    p = torso_phantom((128, 128), seed=0)
    assert np.sum(p.labels == LABEL_IDS["lung_vessel"]) > 20
    lung = p.hu[_interior(p.labels, "lung")]
    assert lung.std() > 5.0  # parenchyma is not flat



def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="shape"):
        torso_phantom((64,), seed=0)
    with pytest.raises(ValueError, match="spacing"):
        torso_phantom((32, 32), (1.0,), seed=0)


def test_affine_is_ras_with_grid_centre_at_origin():
    a = affine((2.0, 3.0, 4.0), (10, 20, 5))
    centre = a @ np.array([4.5, 9.5, 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0)
    # rows go posterior (-y), columns to the patient's left (-x), slices superior (+z)
    np.testing.assert_allclose(a[:3, :3], [[0, -3.0, 0], [-2.0, 0, 0], [0, 0, 4.0]])
    assert isinstance(torso_phantom((16, 16), seed=0), Phantom)


def test_brain_phantom_without_nilearn_raises_a_clear_import_error(monkeypatch):
    from medfusion.data import brain

    brain._template.cache_clear()
    monkeypatch.setattr(brain, "available", lambda: False)
    with pytest.raises(ImportError, match="nilearn"):
        brain.brain_mr_phantom(seed=0)
    brain._template.cache_clear()


@pytest.mark.slow
def test_brain_phantom_from_mni152_is_seeded_and_labelled():
    pytest.importorskip("nilearn")
    from medfusion.data.brain import BRAIN_LABELS, brain_mr_phantom

    a = brain_mr_phantom((48, 56, 44), seed=0)
    b = brain_mr_phantom((48, 56, 44), seed=0)
    c = brain_mr_phantom((48, 56, 44), seed=1)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert not np.array_equal(a.labels, c.labels)  # a different deformation
    assert set(np.unique(a.labels).tolist()) == set(BRAIN_LABELS)
    wm, gm = a.hu[a.labels == 3].mean(), a.hu[a.labels == 2].mean()
    assert wm > gm  # T1: white matter brighter than grey matter
    s = brain_mr_phantom((64, 64), seed=0)
    assert s.hu.shape == (64, 64) and len(s.spacing) == 2
