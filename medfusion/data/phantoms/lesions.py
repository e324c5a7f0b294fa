"""Lesions: solid or ground-glass lung nodules and hypodense liver lesions (spheres / near-spheres).

They are drawn for every patient, so that rendering with or without lesions shows the same anatomy; about half
of them lie near the default 2D slice level. Nodules are kept inside the lungs and liver lesions inside the liver.
"""

from __future__ import annotations

import numpy as np

from medfusion.data.phantoms.model import LABEL_IDS, Anatomy
from medfusion.data.phantoms.raster import Canvas, ellipsoid
from medfusion.data.phantoms.torso import Torso


def draw_lesions(
    rng: np.random.Generator, torso: Torso, lungs: tuple, liver: tuple
) -> tuple[float, list, list]:
    """``(slice_z, nodules, liver lesions)``: the default 2D slice level (mm) and lesions ``(x, y, z, r, hu)``."""
    u = rng.uniform
    diaphragm_z, length = torso.diaphragm_z, torso.length
    slice_z = diaphragm_z + u(0, 15)
    nodules = []
    for _ in range(int(rng.integers(1, 4))):
        lx, ly, lax, lay = lungs[int(rng.integers(0, 2))]
        rho, phi = np.sqrt(u(0, 1)) * 0.7, u(0, 2 * np.pi)
        near = u(0, 1) < 0.5
        z = slice_z + u(-8, 8) if near else u(diaphragm_z + 25, 0.9 * length)
        solid = u(0, 1) < 0.75
        nodules.append(
            (
                lx + rho * lax * np.cos(phi),
                ly + rho * lay * np.sin(phi),
                z,
                u(3.0, 10.0),
                u(0, 60) if solid else u(-650, -350),
            )
        )
    lesions = []
    for _ in range(int(rng.integers(0, 3))):
        lcx, lcy, lcz, lax_, lay_, laz, _h = liver
        rho, phi = np.sqrt(u(0, 1)) * 0.55, u(0, 2 * np.pi)
        near = u(0, 1) < 0.5
        z = slice_z - u(5, 25) if near else lcz + u(-0.5, 0.3) * laz
        lesions.append(
            (lcx + rho * lax_ * np.cos(phi), lcy + rho * lay_ * np.sin(phi), z, u(6.0, 18.0), u(5, 40))
        )
    return slice_z, nodules, lesions


def paint_lesions(canvas: Canvas, anat: Anatomy, lung_occ: np.ndarray, liver_occ: np.ndarray) -> None:
    """15. lung nodules inside the lungs, 16. liver lesions inside the liver."""
    g = canvas.grid
    for x, y, z, r, val in anat.nodules:
        canvas.paint(ellipsoid(g, (x, y, z), (r, r, r)) * lung_occ, val, LABEL_IDS["lung_nodule"])
    for x, y, z, r, val in anat.liver_lesions:
        canvas.paint(ellipsoid(g, (x, y, z), (r, r * 0.9, r)) * liver_occ, val, LABEL_IDS["liver_lesion"])
