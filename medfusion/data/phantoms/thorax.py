"""Thorax: lungs, pulmonary vessel and airway trees, heart and aorta.

The lungs are ellipses above the diaphragm that taper towards the apices, inflated with the breathing state.
Vessels and airways are dichotomous branching trees of straight tubes from each hilum (three to four lobar
roots per lung), plus peripheral small vessels where two smooth random fields both vanish. The heart is
epicardial fat, myocardium and blood pool (rotated ellipsoids) above the left dome; the aorta is three tubes
(ascending, arch, descending beside the spine).
"""

from __future__ import annotations

import numpy as np

from medfusion.data.phantoms.model import LABEL_IDS, Anatomy, Segment
from medfusion.data.phantoms.raster import Canvas, ellipse_rho, ellipsoid, empty, field, segments, soft, tube
from medfusion.data.phantoms.torso import Torso


def draw_lungs(rng: np.random.Generator, torso: Torso) -> tuple:
    """Per lung (right, then left): centre and semi-axes ``(cx, cy, ax, ay)`` in mm."""
    u = rng.uniform
    cx, cy = torso.center
    tax, tay = torso.thorax_cavity()
    infl = 1.0 + 0.05 * torso.breath
    lungs = []
    for side in (-1.0, 1.0):  # -1 = right lung (image left), +1 = left lung
        lungs.append(
            (
                cx + side * tax * u(0.46, 0.52),
                cy - 0.05 * tay + u(-4, 4),
                tax * u(0.40, 0.46) * infl,
                tay * u(0.80, 0.88) * infl,
            )
        )
    return tuple(lungs)


def draw_heart(rng: np.random.Generator, torso: Torso) -> tuple:
    """``(cx, cy, cz, ax, ay, az, angle)``: left of the midline, anterior, above the diaphragm."""
    u = rng.uniform
    cx, cy = torso.center
    tax, tay = torso.thorax_cavity()
    return (
        cx + u(0.08, 0.16) * tax,
        cy + u(0.15, 0.3) * tay,
        torso.diaphragm_z + u(30, 40),
        u(55, 66),
        u(44, 54),
        u(48, 58),
        np.deg2rad(u(25, 45)),
    )


def draw_aorta(
    rng: np.random.Generator, torso: Torso, heart: tuple, spine_cy: float, spine_r: float
) -> tuple[Segment, ...]:
    """Ascending aorta (anterior-right of the descending), arch, descending aorta next to the spine."""
    u = rng.uniform
    cx, _ = torso.center
    r_ao = u(10.0, 13.5)
    desc_x, desc_y = cx + spine_r + u(3, 9), spine_cy + spine_r * 0.7 + u(0, 6)
    asc_x, asc_y = cx + u(-18, -8), heart[1] + u(8, 18)
    arch_z = 0.83 * torso.length + u(-8, 8)
    return (
        Segment((asc_x, asc_y, heart[2]), (asc_x, asc_y, arch_z), r_ao * 1.1),
        Segment((asc_x, asc_y, arch_z), (desc_x, desc_y, arch_z + 5.0), r_ao),
        Segment((desc_x, desc_y, arch_z + 5.0), (desc_x, desc_y, -20.0), r_ao * 0.9),
    )


def _tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    generations: int,
    *,
    shrink: float = 0.78,
    radius_shrink: float = 0.72,
    angle_deg: tuple[float, float] = (22.0, 40.0),
) -> list[Segment]:
    """A dichotomous branching tree (parent -> two children, each turned by a random angle)."""
    out: list[Segment] = []
    stack = [(start, direction / np.linalg.norm(direction), length, radius, 0)]
    while stack:
        p, d, ln, r, g = stack.pop()
        q = p + d * ln
        out.append(Segment(tuple(p), tuple(q), float(r)))
        if g + 1 >= generations:
            continue
        # a random axis perpendicular to d; children turn by +-angle around it
        helper = rng.normal(size=3)
        axis = np.cross(d, helper)
        axis /= np.linalg.norm(axis) + 1e-12
        for sign in (1.0, -1.0):
            theta = np.deg2rad(rng.uniform(*angle_deg)) * sign
            # Rodrigues rotation of d around axis
            child = (
                d * np.cos(theta)
                + np.cross(axis, d) * np.sin(theta)
                + axis * np.dot(axis, d) * (1 - np.cos(theta))
            )
            stack.append((q, child, ln * shrink * rng.uniform(0.85, 1.15), r * radius_shrink, g + 1))
    return out


def draw_airways_and_vessels(
    rng: np.random.Generator, torso: Torso, lungs: tuple, spine_cy: float, spine_r: float
) -> tuple[tuple[Segment, ...], tuple[Segment, ...], tuple[Segment, ...]]:
    """``(vessels, central airways, peripheral airways)``: trachea, main bronchi and trees from each hilum."""
    u = rng.uniform
    cx, _ = torso.center
    vessels: list[Segment] = []
    airways: list[Segment] = []
    hilum_z = torso.diaphragm_z + u(60, 75)
    carina_z = hilum_z + u(18, 28)
    trachea_y = spine_cy + spine_r + u(14, 22)
    trachea_r = u(7.0, 9.5)
    airways_central = [Segment((cx, trachea_y, torso.length + 20.0), (cx, trachea_y, carina_z), trachea_r)]
    for lx, ly, lax, lay in lungs:
        side = np.sign(lx - cx)
        hilum = np.array([cx + side * (abs(lx - cx) - lax * 0.55), ly + 0.15 * lay, hilum_z])
        airways_central.append(Segment((cx, trachea_y, carina_z), tuple(hilum), trachea_r * 0.75))
        lobar = (
            (side * 0.4, 0.2, 1.0),
            (side * 1.0, 0.5, 0.2),
            (side * 1.0, -0.4, -0.3),
            (side * 0.4, -0.6, -1.0),
        )
        for direction in lobar:
            d = np.asarray(direction) + rng.normal(scale=0.15, size=3)
            vessels += _tree(
                rng,
                hilum,
                d,
                u(22, 28),
                u(4.5, 5.5),
                7,
                shrink=0.8,
                radius_shrink=0.8,
                angle_deg=(20.0, 40.0),
            )
            airways += _tree(rng, hilum, d + rng.normal(scale=0.1, size=3), u(24, 30), trachea_r * 0.5, 4)
    return tuple(vessels), tuple(airways_central), tuple(airways)


def paint_lungs(canvas: Canvas, anat: Anatomy, dia: np.ndarray, cavity: np.ndarray) -> np.ndarray:
    """5. lungs: above the diaphragm, tapering at the apices, inside the cavity. Returns their occupancy."""
    g, H = canvas.grid, anat.hu
    apex_scale = np.sqrt(np.clip((anat.length_mm - g.z) / (0.2 * anat.length_mm), 1e-4, 1.0))
    lung_occ = empty(g)
    for lx, ly, lax, lay in anat.lungs:
        r = ellipse_rho(g.x - lx, g.y - ly, lax * apex_scale, lay * apex_scale)
        lung_occ = np.maximum(lung_occ, soft((r - 1.0) * lax * apex_scale, g.h))
    lung_occ *= soft(dia - g.z, g.h) * np.clip(cavity * 1.5 - 0.25, 0, 1)
    lung_tex = field(g, dict(anat.texture)["lung"])
    canvas.paint(lung_occ, H["lung"] + H["lung_tex"] * lung_tex, LABEL_IDS["lung"])
    return lung_occ


def paint_airways_and_vessels(canvas: Canvas, anat: Anatomy, lung_occ: np.ndarray) -> None:
    """6. pulmonary vessels and airways (only inside the lungs; trachea and main bronchi everywhere)."""
    g, H = canvas.grid, anat.hu
    tex = dict(anat.texture)
    vessel_occ = segments(g, anat.vessels, empty(g))
    # peripheral small vessels: curves where two smooth random fields both vanish (distance ~ |f| lambda / 2 pi)
    f_a, f_b = field(g, tex["vessel_a"]), field(g, tex["vessel_b"])
    small = tube(np.sqrt(f_a**2 + f_b**2) * (20.0 / (2 * np.pi)), 1.2, g.h)
    vessel_occ = np.maximum(vessel_occ, small) * lung_occ
    canvas.paint(vessel_occ, H["vessel"], LABEL_IDS["lung_vessel"])
    wall = segments(g, anat.airways, empty(g), 1.25) * lung_occ
    wall = segments(g, anat.airways_central, wall, 1.3)
    canvas.paint(wall, H["soft_tissue"], LABEL_IDS["soft_tissue"])
    lumen = segments(g, anat.airways, empty(g)) * lung_occ
    lumen = segments(g, anat.airways_central, lumen)
    canvas.paint(lumen, -1000.0, LABEL_IDS["airway"])


def paint_heart_and_aorta(canvas: Canvas, anat: Anatomy, dia: np.ndarray) -> None:
    """7. heart (epicardial fat, myocardium, blood pool) above the left dome, 8. aorta."""
    g, H = canvas.grid, anat.hu
    hx, hy, hz, hax, hay, haz, hang = anat.heart
    above = soft(dia - 4.0 - g.z, g.h)
    canvas.paint(
        ellipsoid(g, (hx, hy, hz), (hax + 4, hay + 4, haz + 4), angle=hang) * above,
        H["fat"],
        LABEL_IDS["fat"],
    )
    canvas.paint(
        ellipsoid(g, (hx, hy, hz), (hax, hay, haz), angle=hang) * above, H["myocardium"], LABEL_IDS["heart"]
    )
    canvas.paint(
        ellipsoid(g, (hx, hy, hz + 4), (hax * 0.7, hay * 0.7, haz * 0.7), angle=hang) * above,
        H["blood"],
        LABEL_IDS["heart"],
    )
    canvas.paint(segments(g, anat.aorta, empty(g)), H["blood"] + 4.0, LABEL_IDS["aorta"])
