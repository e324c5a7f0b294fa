"""Rendering a drawn patient on a grid, and the grid's geometry (default spacing, RAS+ affine).

:func:`render` paints the structures in a fixed order, later ones over earlier ones: body wall, back muscles,
lungs, airways and vessels, heart and aorta, abdominal organs, spine, ribs and sternum, lesions. A 2D slice is
rendered as a one-slice volume, so it equals the matching plane of a 3D volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfusion.data.phantoms.abdomen import paint_abdomen
from medfusion.data.phantoms.anatomy import draw_anatomy
from medfusion.data.phantoms.lesions import paint_lesions
from medfusion.data.phantoms.model import FOV_MM, Z_EXTENT_MM, Anatomy, Phantom
from medfusion.data.phantoms.raster import Canvas, Grid, field
from medfusion.data.phantoms.skeleton import paint_ribs, paint_spine
from medfusion.data.phantoms.thorax import paint_airways_and_vessels, paint_heart_and_aorta, paint_lungs
from medfusion.data.phantoms.torso import diaphragm, paint_back_muscles, paint_body_wall


def affine(spacing: Sequence[float], shape: Sequence[int] | None = None) -> np.ndarray:
    """RAS+ voxel -> world (mm) affine of a phantom array with this spacing, centred on the grid.

    Rows run anterior -> posterior (-y), columns patient right -> left (-x), slices inferior -> superior (+z).
    A 2D spacing gives the 4x4 affine of a one-slice volume (what a 2D NIfTI stores). With ``shape`` the
    grid centre maps to world (0, 0, 0); without it voxel (0, 0, 0) does.
    """
    sp = [float(s) for s in spacing]
    if len(sp) not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 values, got {spacing!r}")
    if len(sp) == 2:
        sp.append(1.0)
    a = np.zeros((4, 4))
    a[1, 0] = -sp[0]
    a[0, 1] = -sp[1]
    a[2, 2] = sp[2]
    a[3, 3] = 1.0
    if shape is not None:
        centre = [(int(n) - 1) / 2.0 for n in shape] + [0.0] * (3 - len(shape))
        a[:3, 3] = -a[:3, :3] @ np.asarray(centre)
    return a


def default_spacing(shape: Sequence[int]) -> tuple[float, ...]:
    """In-plane ``FOV_MM / max(H, W)``; for 3D, ``Z_EXTENT_MM / D`` along z."""
    shape = tuple(int(s) for s in shape)
    inplane = FOV_MM / max(shape[0], shape[1])
    if len(shape) == 2:
        return (inplane, inplane)
    return (inplane, inplane, Z_EXTENT_MM / shape[2])


def _grid(anat: Anatomy, shape: Sequence[int], spacing: Sequence[float] | None, z_center_mm: float | None):
    """Check ``shape`` / ``spacing`` and return ``(shape, spacing, 3D grid)`` (a 2D slice is one z plane)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) or (H, W, D) with positive sizes, got {shape!r}")
    spacing = default_spacing(shape) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or min(spacing) <= 0:
        raise ValueError(f"spacing must have {len(shape)} positive values, got {spacing!r}")
    if z_center_mm is None:
        z_center_mm = anat.slice_z_mm if len(shape) == 2 else anat.length_mm / 2.0
    shape3 = shape if len(shape) == 3 else (*shape, 1)
    spacing3 = spacing if len(spacing) == 3 else (*spacing, 1.0)
    return shape, spacing, Grid(shape3, spacing3, float(z_center_mm))


def render(
    anat: Anatomy,
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    *,
    z_center_mm: float | None = None,
    lesions: bool = True,
) -> Phantom:
    """Render ``anat`` on a grid.

    Args:
        anat: patient parameters from :func:`~medfusion.data.phantoms.draw_anatomy`.
        shape: ``(H, W)`` for a 2D axial slice or ``(H, W, D)`` for a volume (D along z).
        spacing: voxel size in mm per axis (default :func:`default_spacing`).
        z_center_mm: z (mm) of the slice (2D) or of the volume centre (3D). Default: ``anat.slice_z_mm`` for 2D
            (a lower-thorax level: lung bases, heart, liver dome), the torso middle for 3D.
        lesions: paint lung nodules and liver lesions.

    Returns:
        :class:`~medfusion.data.phantoms.Phantom` (HU float32, labels uint8, spacing).
    """
    shape, spacing, g = _grid(anat, shape, spacing, z_center_mm)
    canvas = Canvas(g)
    soft_field = field(g, dict(anat.texture)["soft"])
    wall = paint_body_wall(canvas, anat, soft_field)
    paint_back_muscles(canvas, anat, wall.body, soft_field)
    dia = diaphragm(anat, g)
    lung_occ = paint_lungs(canvas, anat, dia, wall.cavity)
    paint_airways_and_vessels(canvas, anat, lung_occ)
    paint_heart_and_aorta(canvas, anat, dia)
    liver_occ = paint_abdomen(canvas, anat, dia, wall.cavity, soft_field)
    trab = paint_spine(canvas, anat)
    paint_ribs(canvas, anat, wall.cavity_axes, trab)
    if lesions:
        paint_lesions(canvas, anat, lung_occ, liver_occ)
    hu, lab = canvas.hu, canvas.labels
    if len(shape) == 2:
        hu, lab = hu[..., 0], lab[..., 0]
    return Phantom(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        labels=np.ascontiguousarray(lab),
        spacing=tuple(spacing),
    )


def torso_phantom(
    shape: Sequence[int],
    spacing: Sequence[float] | None = None,
    *,
    seed: int,
    lesions: bool = True,
    z_center_mm: float | None = None,
) -> Phantom:
    """A seeded torso phantom (HU + labels): ``render(draw_anatomy(seed), shape, spacing, ...)``.

    Args:
        shape: ``(H, W)`` axial slice or ``(H, W, D)`` volume with D along z (e.g. 128^2, 256^2; 64^3-128^3).
        spacing: mm per axis; default ``400 mm / max(H, W)`` in plane and ``340 mm / D`` along z (whole torso).
        seed: patient seed; the same seed gives the same patient at every size, spacing and dimension.
        lesions: include lung nodules and liver lesions (the rest of the anatomy is unchanged).
        z_center_mm: slice level (2D) or volume centre (3D) in mm from the torso's inferior end.

    Example:
        >>> p = torso_phantom((128, 128), seed=0)
        >>> p.hu.shape, p.labels.dtype, LABELS[int(p.labels[64, 64])]  # doctest: +SKIP
    """
    return render(draw_anatomy(seed), shape, spacing, z_center_mm=z_center_mm, lesions=lesions)
