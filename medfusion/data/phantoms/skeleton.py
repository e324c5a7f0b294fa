"""Skeleton: vertebrae with discs, neural arch and spinal canal; ribs and sternum.

The spine repeats a vertebra + disc period along z; a vertebral body has a cortical shell (HU of cortical bone)
around a trabecular core with its own fine texture. Ribs are sloped bands just inside the muscle ring, from the
spine round to the costal cartilages, over the thoracic z range; the sternum lies in front of the mediastinum.
"""

from __future__ import annotations

import numpy as np

from medfusion.data.phantoms.model import LABEL_IDS, Anatomy
from medfusion.data.phantoms.raster import Canvas, ellipse_rho, field, soft
from medfusion.data.phantoms.torso import Torso


def draw_spine_position(rng: np.random.Generator, torso: Torso) -> tuple[float, float]:
    """``(cy, radius)`` of the vertebral bodies (mm): in front of the back wall."""
    u = rng.uniform
    _, cy = torso.center
    _, ay = torso.axes
    spine_cy = cy - ay + torso.fat + torso.muscle + u(45.0, 55.0)
    spine_r = u(15.0, 20.0)
    return spine_cy, spine_r


def draw_spine(rng: np.random.Generator, spine_cy: float, spine_r: float) -> tuple:
    """``(cy, radius, period, disc, phase)``: the vertebra + disc period and disc height (mm), phase in [0, 1)."""
    u = rng.uniform
    return (spine_cy, spine_r, u(25.0, 30.0), u(4.5, 6.5), u(0, 1))


def draw_ribs(rng: np.random.Generator) -> tuple:
    """``(pitch, z0, slope, half_width, half_height)`` of the rib bands (mm)."""
    u = rng.uniform
    return (u(24.0, 30.0), u(0, 30.0), u(30.0, 45.0), u(4.0, 5.5), u(6.0, 8.0))


def paint_spine(canvas: Canvas, anat: Anatomy) -> np.ndarray:
    """13. vertebral bodies (cortical shell + trabecular core) separated by discs, canal, neural arch.

    Returns the trabecular HU field, which the ribs and sternum share.
    """
    g, H = canvas.grid, anat.hu
    cx, _ = anat.body_center
    spine_cy, spine_r, period, disc, phase = anat.spine
    zeta = ((g.z / period + phase) % 1.0) * period  # mm into the current vertebra+disc period
    in_disc = zeta < disc
    dz_end = np.minimum(np.abs(zeta - disc), np.abs(period - zeta))  # mm to the nearest endplate
    r_body = ellipse_rho(g.x - cx, g.y - spine_cy, spine_r * 1.1, spine_r)
    body_occ = soft((r_body - 1.0) * spine_r, g.h)
    trab = H["trabecular"] + 35.0 * field(g, dict(anat.texture)["trabecular"])
    cortical_w = 2.0
    is_cortex = ((1.0 - r_body) * spine_r < cortical_w) | (dz_end < cortical_w)
    vert_hu = np.where(is_cortex, np.float32(H["cortical"]), trab)
    canvas.paint(body_occ * ~in_disc, vert_hu, LABEL_IDS["spine"])
    canvas.paint(body_occ * in_disc, H["disc"], LABEL_IDS["soft_tissue"])
    canal_c = spine_cy - spine_r - 9.0
    arch_z = zeta > disc + 0.35 * (period - disc)  # spinous process: upper part of each vertebra
    r_arch = ellipse_rho(g.x - cx, g.y - canal_c, 14.0, 12.0)  # neural arch and facets: every level
    canvas.paint(soft((r_arch - 1.0) * 12.0, g.h), H["cortical"] * 0.6 + 0.4 * trab, LABEL_IDS["spine"])
    r_sp = ellipse_rho(g.x - cx, g.y - (canal_c - 20.0), 4.5, 14.0)
    canvas.paint(soft((r_sp - 1.0) * 4.5, g.h) * arch_z, H["cortical"] * 0.6 + 0.4 * trab, LABEL_IDS["spine"])
    r_canal = ellipse_rho(g.x - cx, g.y - canal_c, 8.0, 7.0)
    canvas.paint(soft((r_canal - 1.0) * 7.0, g.h), H["canal"], LABEL_IDS["soft_tissue"])
    return trab


def paint_ribs(canvas: Canvas, anat: Anatomy, cavity_axes: tuple, trab: np.ndarray) -> None:
    """14. ribs (sloped bands inside the muscle ring, spine to costal cartilages) and the sternum."""
    g, H = canvas.grid, anat.hu
    cx, cy = anat.body_center
    cav_ax, cav_ay = cavity_axes
    pitch, z0, slope, half_w, half_h = anat.ribs
    rib_ax, rib_ay = cav_ax + half_w * 0.6, cav_ay + half_w * 0.6
    rr = ellipse_rho(g.x - cx, g.y - cy, rib_ax, rib_ay, anat.body_harmonics)
    phi = np.arctan2(np.abs(g.x - cx) / rib_ax, -(g.y - cy) / rib_ay)  # 0 = posterior, pi = anterior
    radial = (rr - 1.0) * 0.5 * (rib_ax + rib_ay)
    u_rib = (g.z + slope * phi / np.pi - z0) / pitch
    dz_rib = (u_rib - np.round(u_rib)) * pitch
    dn = np.sqrt((radial / half_w) ** 2 + (dz_rib / half_h) ** 2)
    in_range = (
        (phi > 0.12 * np.pi)
        & (phi < 0.80 * np.pi)
        & (g.z > anat.diaphragm_z - 70.0)
        & (g.z < anat.length_mm - 10)
    )
    rib_occ = soft((dn - 1.0) * half_w, g.h) * in_range
    rib_hu = np.where(dn > 0.55, np.float32(H["cortical"] * 0.9), trab)
    canvas.paint(rib_occ, rib_hu, LABEL_IDS["ribs"])
    sternum_z = (g.z > anat.diaphragm_z + 10.0) & (g.z < 0.92 * anat.length_mm)
    r_st = ellipse_rho(g.x - cx, g.y - (cy + cav_ay + 2.0), 14.0, 6.0)
    st_occ = soft((r_st - 1.0) * 6.0, g.h) * sternum_z
    canvas.paint(st_occ, np.where(r_st > 0.6, np.float32(H["cortical"] * 0.8), trab), LABEL_IDS["ribs"])
