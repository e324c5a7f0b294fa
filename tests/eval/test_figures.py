"""Figures: radiological orientation from the affine (oracle markers, any voxel order), PNG files written safely."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.eval.figures import axial_view, box_plots, example_panels, label_overlays


def _marked_volume(affine: np.ndarray, shape=(12, 10, 8)) -> np.ndarray:
    """A volume (voxel order of ``affine``) with 1 at the patient's right-anterior corner of every axial slice and
    2 at the left-posterior corner (found in world coordinates)."""
    idx = np.indices(shape).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:]).T  # RAS+: x right, y anterior, z superior
    vol = np.zeros(shape, np.float32).ravel()
    x, y = world[:, 0], world[:, 1]
    vol[(x == x.max()) & (y == y.max())] = 1.0  # most right, most anterior
    vol[(x == x.min()) & (y == y.min())] = 2.0  # most left, most posterior
    return vol.reshape(shape)


AFFINES = {
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
    "LPS": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "permuted": np.array([[0, -1.0, 0, 0], [0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]]),  # i->S, j->L, k->A
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_axial_view_puts_anterior_up_and_patient_right_on_the_left(name):
    aff = AFFINES[name]
    view = axial_view(_marked_volume(aff), aff)
    assert view[0, 0] == 1.0  # top-left: anterior and the patient's right
    assert view[-1, -1] == 2.0  # bottom-right: posterior and the patient's left
    assert np.count_nonzero(view) == 2


def test_axial_view_of_a_builtin_phantom_has_the_spine_at_the_bottom(tmp_path):
    from medfusion.data.builtin import make_dataset
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.io.nifti import read_nifti

    make_dataset(tmp_path, n_patients=3, dim=2, size=32, progress=False)
    lab = read_nifti(tmp_path / "case_000" / "label.nii.gz")
    view = axial_view(lab.array, lab.affine)
    rows, cols = np.nonzero(view == LABEL_IDS["spine"])
    assert rows.mean() > view.shape[0] / 2  # posterior = bottom
    liver_cols = np.nonzero(view == LABEL_IDS["liver"])[1]
    assert liver_cols.mean() < view.shape[1] / 2  # the liver (patient's right) on the image's left


def test_axial_view_rejects_bad_input():
    with pytest.raises(ValueError, match="affine"):
        axial_view(np.zeros((4, 4)), np.eye(3))
    with pytest.raises(ValueError, match="outside"):
        axial_view(np.zeros((4, 4, 3)), np.eye(4), index=3)


def test_panels_and_box_plots_write_png_and_refuse_to_overwrite(tmp_path):
    img = np.zeros((16, 16), np.float32)
    rows = [("low_dose", [("in", img), ("out", img + 100)], np.eye(4)), ("sharp", [("in", img)], np.eye(4))]
    p = example_panels(tmp_path / "a.png", rows, window=(-160, 240))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        example_panels(p, rows, window=(-160, 240))
    b = box_plots(tmp_path / "b.png", {"psnr": {"x": [1.0, 2.0, np.nan], "y": [3.0]}, "ssim": {"x": [0.5]}},
                  references={"psnr": 2.0})  # fmt: skip
    assert b.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="window"):
        example_panels(tmp_path / "c.png", rows, window=(10, 0))


def _marker_corner(png) -> tuple[str, str]:
    """Where the grey marker lies inside the black image of a one-panel overlay figure: (top|bottom, left|right)."""
    import matplotlib.image as mpimg

    rgb = mpimg.imread(png)[..., :3].mean(axis=-1)
    dark = np.argwhere(rgb < 0.05)
    (r0, c0), (r1, c1) = dark.min(axis=0), dark.max(axis=0)
    box = rgb[r0 : r1 + 1, c0 : c1 + 1]
    rows, cols = np.nonzero((box > 0.3) & (box < 0.7))
    vertical = "top" if rows.mean() < box.shape[0] / 2 else "bottom"
    return vertical, "left" if cols.mean() < box.shape[1] / 2 else "right"


def test_label_overlays_show_the_radiological_view_given_the_affine(tmp_path):
    """Voxel (0, 0) of a RAS+ image is the patient's left-most, posterior-most point: radiologically the bottom
    right. Without an affine, array axis 0 runs left to
    right and axis 1 top to bottom (the marker at the top left)."""
    image = -np.ones((40, 40), dtype=np.float32)
    image[:10, :10] = 0.0  # grey marker at the smallest voxel indices
    labels = [("reference", np.zeros((40, 40)))]
    plain = label_overlays(tmp_path / "plain.png", image, labels)
    ras = label_overlays(tmp_path / "ras.png", image, labels, affine=np.eye(4))
    lps = label_overlays(tmp_path / "lps.png", image, labels, affine=np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert _marker_corner(plain) == ("top", "left")
    assert _marker_corner(ras) == ("bottom", "right")
    assert _marker_corner(lps) == ("top", "left")  # voxel 0 is right-anterior in LPS
