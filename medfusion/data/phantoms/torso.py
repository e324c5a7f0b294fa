"""Body outline and wall: the torso's size and shape, tissue HU, fat and muscle layers, back muscles, diaphragm.

The body is an ellipse with angular harmonics that widens from the abdomen to the chest above the diaphragm;
inside it lie subcutaneous fat, a muscle ring and the body cavity (soft tissue with visceral fat where a smooth
random field exceeds a per-patient threshold). The diaphragm is two paraboloid domes, the right one higher.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medfusion.data.phantoms.model import LABEL_IDS, Anatomy
from medfusion.data.phantoms.raster import Canvas, Grid, ellipse_rho, field, fourier_field_params, soft


class Torso(NamedTuple):
    """The first draws of a patient (mm): size, shape, wall thickness and breathing state."""

    length: float
    breath: float  # 0 = full expiration, 1 = full inspiration
    diaphragm_z: float
    right_dome_rise: float
    axes: tuple[float, float]  # abdomen semi-axes (x, y)
    center: tuple[float, float]
    chest_scale: float
    harmonics: tuple[tuple[float, float], ...]
    fat: float
    muscle: float
    visceral: float

    def thorax_cavity(self) -> tuple[float, float]:
        """Semi-axes (x, y) of the thoracic cavity, inside fat and muscle."""
        ax, ay = self.axes
        return ax * self.chest_scale - self.fat - self.muscle, ay - self.fat - self.muscle


def draw_torso(rng: np.random.Generator) -> Torso:
    """Body size and shape, wall thickness, breathing state and diaphragm level."""
    u = rng.uniform
    length = u(320.0, 360.0)
    breath = u(0.0, 1.0)
    # diaphragm: inspiration pushes it down (~ 15 mm between states at this scale)
    diaphragm_z = 0.47 * length + (0.5 - breath) * 16.0 + u(-8, 8)
    right_dome_rise = u(12.0, 22.0)
    ax, ay = u(145.0, 172.0), u(100.0, 125.0)
    center = (u(-8, 8), u(-8, 8))
    chest_scale = u(1.0, 1.06)
    harmonics = tuple((u(0.0, 0.025), u(0, 2 * np.pi)) for _ in range(3))
    fat = u(8.0, 28.0)
    muscle = u(9.0, 16.0)
    visceral = u(0.15, 0.6)
    return Torso(
        length=length,
        breath=breath,
        diaphragm_z=diaphragm_z,
        right_dome_rise=right_dome_rise,
        axes=(ax, ay),
        center=center,
        chest_scale=chest_scale,
        harmonics=harmonics,
        fat=fat,
        muscle=muscle,
        visceral=visceral,
    )


def draw_tissue_hu(rng: np.random.Generator, breath: float) -> dict[str, float]:
    """Mean HU per tissue (non-contrast CT, typical adult values; lung density follows the breathing state)."""
    u = rng.uniform
    return {
        "fat": u(-115, -90),
        "muscle": u(42, 56),
        "soft_tissue": u(28, 40),
        "lung": -780.0 - 100.0 * breath + u(-15, 15),
        "vessel": u(35, 48),
        "myocardium": u(42, 52),
        "blood": u(34, 44),
        "liver": u(40, 68),  # fatty liver (low) to normal
        "spleen": u(42, 52),
        "kidney": u(27, 38),
        "cortical": u(1000, 1300),
        "trabecular": u(150, 280),
        "disc": u(70, 90),
        "canal": u(15, 30),
    }


def draw_texture(rng: np.random.Generator) -> dict[str, tuple]:
    """Random-field parameters of every textured tissue (wavelength ranges in mm)."""
    return {
        "lung": fourier_field_params(rng, 16, (6.0, 20.0)),
        "soft": fourier_field_params(rng, 12, (15.0, 60.0)),
        "visceral": fourier_field_params(rng, 12, (18.0, 50.0)),
        "trabecular": fourier_field_params(rng, 16, (3.0, 8.0)),
        "vessel_a": fourier_field_params(rng, 16, (14.0, 26.0)),
        "vessel_b": fourier_field_params(rng, 16, (14.0, 26.0)),
        "liver": fourier_field_params(rng, 16, (5.0, 16.0)),
    }


def draw_texture_sd(rng: np.random.Generator) -> dict[str, float]:
    """Tissue heterogeneity (HU SD of the texture fields): varies between patients, as radiomic features do."""
    u = rng.uniform
    return dict(fat_tex=u(3.0, 9.0), muscle_tex=u(1.5, 6.0), lung_tex=u(6.0, 20.0), liver_tex=u(2.0, 10.0))


class BodyWall(NamedTuple):
    """What later structures need from the body wall: occupancies and the cavity's semi-axes (mm)."""

    body: np.ndarray  # inside the skin
    cavity: np.ndarray  # inside the muscle ring
    cavity_axes: tuple  # (x semi-axis, varying with z; y semi-axis)


def paint_body_wall(canvas: Canvas, anat: Anatomy, soft_field: np.ndarray) -> BodyWall:
    """1. subcutaneous fat, 2. muscle ring, 3. body cavity with visceral / mediastinal fat."""
    g, H = canvas.grid, anat.hu
    cx, cy = anat.body_center
    ax, ay = anat.body_axes
    # body widens from abdomen to chest (above the diaphragm), and tapers at the lung apices / shoulders
    zt = np.clip((g.z - (anat.diaphragm_z - 40.0)) / 60.0, 0.0, 1.0)
    wide = 1.0 + (anat.chest_scale - 1.0) * zt
    rho = ellipse_rho(g.x - cx, g.y - cy, ax * wide, ay, anat.body_harmonics)
    body = soft((rho - 1.0) * ay, g.h)
    canvas.paint(body, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])
    fat, mus = anat.fat_mm, anat.muscle_mm
    rho_m = ellipse_rho(g.x - cx, g.y - cy, ax * wide - fat, ay - fat, anat.body_harmonics)
    canvas.paint(
        soft((rho_m - 1.0) * (ay - fat), g.h), H["muscle"] + H["muscle_tex"] * soft_field, LABEL_IDS["muscle"]
    )
    cav_ax, cav_ay = ax * wide - fat - mus, ay - fat - mus
    rho_c = ellipse_rho(g.x - cx, g.y - cy, cav_ax, cav_ay, anat.body_harmonics)
    cavity = soft((rho_c - 1.0) * cav_ay, g.h)
    canvas.paint(cavity, H["soft_tissue"] + 4.0 * soft_field, LABEL_IDS["soft_tissue"])
    visc = field(g, dict(anat.texture)["visceral"])
    thr = np.float32(1.2 - 2.0 * anat.visceral_fat)
    visc_occ = cavity * np.clip((visc - thr) * 2.0 + 0.5, 0.0, 1.0)
    canvas.paint(visc_occ, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])
    return BodyWall(body=body, cavity=cavity, cavity_axes=(cav_ax, cav_ay))


def paint_back_muscles(canvas: Canvas, anat: Anatomy, body: np.ndarray, soft_field: np.ndarray) -> None:
    """4. paraspinal muscles behind the spine and psoas muscles beside it (below the diaphragm)."""
    g, H = canvas.grid, anat.hu
    cx, _ = anat.body_center
    spine_cy, spine_r = anat.spine[0], anat.spine[1]
    for side in (-1.0, 1.0):
        para = ellipse_rho(
            g.x - (cx + side * (spine_r + 16.0)), g.y - (spine_cy - spine_r - 28.0), 24.0, 22.0
        )
        canvas.paint(
            soft((para - 1.0) * 22.0, g.h) * body,
            H["muscle"] + H["muscle_tex"] * soft_field,
            LABEL_IDS["muscle"],
        )
        psoas_r = np.clip((anat.diaphragm_z - 60.0 - g.z) / 80.0, 0.0, 1.0) * 20.0 + 1e-3
        psoas = ellipse_rho(
            g.x - (cx + side * (spine_r + 14.0)), g.y - (spine_cy + 4.0), psoas_r, psoas_r * 1.1
        )
        canvas.paint(
            soft((psoas - 1.0) * psoas_r, g.h),
            H["muscle"] + H["muscle_tex"] * soft_field,
            LABEL_IDS["muscle"],
        )


def diaphragm(anat: Anatomy, grid: Grid) -> np.ndarray:
    """Height (mm) of the diaphragm surface above (x, y): two paraboloid domes, the right one higher.

    The domes fall off laterally and posteriorly into the costophrenic recesses, where the lungs reach lowest.
    """
    cx, cy = anat.body_center
    ax, ay = anat.body_axes
    domes = []
    for side, rise in ((-1.0, anat.right_dome_rise), (1.0, 0.0)):
        r2 = ((grid.x - cx - side * 0.4 * ax) / (0.45 * ax)) ** 2 + (
            (grid.y - cy - 0.1 * ay) / (0.9 * ay)
        ) ** 2
        domes.append(anat.diaphragm_z + rise - 45.0 * r2)
    return np.maximum(domes[0], domes[1])
