"""Upper abdomen: liver below the right dome, spleen below the left, kidneys beside the spine.

Liver and spleen are (harmonically perturbed, rotated) ellipsoids cut by the diaphragm and kept inside the body
cavity; the liver carries its own fine texture. Each kidney is a parenchyma ellipsoid in perirenal fat with a
fatty renal sinus towards the midline.
"""

from __future__ import annotations

import numpy as np

from medfusion.data.phantoms.model import LABEL_IDS, Anatomy
from medfusion.data.phantoms.raster import Canvas, ellipsoid, field, soft
from medfusion.data.phantoms.torso import Torso


def draw_liver(rng: np.random.Generator, torso: Torso) -> tuple:
    """``(cx, cy, cz, ax, ay, az, harmonics)``: right upper abdomen, its dome under the right diaphragm dome."""
    u = rng.uniform
    cx, cy = torso.center
    tax, tay = torso.thorax_cavity()
    return (
        cx - u(0.30, 0.40) * tax,
        cy + u(-0.05, 0.12) * tay,
        torso.diaphragm_z + torso.right_dome_rise - u(75, 90),
        tax * u(0.62, 0.75),
        tay * u(0.70, 0.85),
        u(85, 100),
        tuple((u(0.0, 0.06), u(0, 2 * np.pi)) for _ in range(3)),
    )


def draw_spleen(rng: np.random.Generator, torso: Torso) -> tuple:
    """``(cx, cy, cz, ax, ay, az)``: left, posterior, below the left dome."""
    u = rng.uniform
    cx, cy = torso.center
    tax, tay = torso.thorax_cavity()
    return (
        cx + u(0.62, 0.72) * tax,
        cy - u(0.25, 0.4) * tay,
        torso.diaphragm_z - u(35, 50),
        u(22, 30),
        u(42, 55),
        u(45, 60),
    )


def draw_kidneys(rng: np.random.Generator, torso: Torso, spine_cy: float) -> tuple:
    """``((cx, cy, cz, ax, ay, az) left, (...) right)``: beside the spine, the left one a little higher."""
    u = rng.uniform
    cx, _ = torso.center
    tax, _ = torso.thorax_cavity()
    kz = 0.17 * torso.length
    return tuple(
        (
            cx + side * u(0.50, 0.58) * tax,
            spine_cy + u(0, 12),
            kz + u(-8, 8) + (10.0 if side > 0 else 0.0),
            u(24, 30),
            u(28, 34),
            u(50, 58),
        )
        for side in (1.0, -1.0)  # left, right
    )


def paint_abdomen(
    canvas: Canvas, anat: Anatomy, dia: np.ndarray, cavity: np.ndarray, soft_field: np.ndarray
) -> np.ndarray:
    """9. liver below the right dome, 10. spleen, 11-12. kidneys. Returns the liver's occupancy."""
    g, H = canvas.grid, anat.hu
    cx, _ = anat.body_center
    below = soft(g.z - (dia - 3.0), g.h)
    lcx, lcy, lcz, lax, lay, laz, lh = anat.liver
    liver_occ = ellipsoid(g, (lcx, lcy, lcz), (lax, lay, laz), lh) * below * cavity
    liver_hu = H["liver"] + H["liver_tex"] * (0.5 * soft_field + 0.87 * field(g, dict(anat.texture)["liver"]))
    canvas.paint(liver_occ, liver_hu, LABEL_IDS["liver"])
    scx, scy, scz, sax, say, saz = anat.spleen
    spleen = ellipsoid(g, (scx, scy, scz), (sax, say, saz), angle=0.5) * below * cavity
    canvas.paint(spleen, H["spleen"], LABEL_IDS["spleen"])
    for (kx, ky, kz, kax, kay, kaz), name in zip(anat.kidneys, ("kidney_left", "kidney_right")):
        perirenal = ellipsoid(g, (kx, ky, kz), (kax + 7, kay + 7, kaz + 9), angle=0.4)
        canvas.paint(perirenal, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])
        canvas.paint(ellipsoid(g, (kx, ky, kz), (kax, kay, kaz), angle=0.4), H["kidney"], LABEL_IDS[name])
        sinus = ellipsoid(g, (kx - np.sign(kx - cx) * 0.35 * kax, ky, kz), (kax * 0.4, kay * 0.4, kaz * 0.6))
        canvas.paint(sinus, H["fat"] + 40.0, LABEL_IDS["fat"])
    return liver_occ
