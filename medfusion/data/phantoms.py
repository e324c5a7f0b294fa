"""Procedural torso phantoms in Hounsfield units with a ground-truth label map.

A "patient" is a set of anatomical parameters drawn from a seed (:func:`draw_anatomy`: body size and shape,
fat and muscle thickness, breathing state, organ sizes and positions, vessel / airway trees, lesions); a
deterministic renderer (:func:`render`) evaluates that anatomy on any grid. Everything is defined in
millimetres in a continuous patient frame, so the same patient can be rendered as a 2D slice or a 3D volume at
any size and spacing, and a 2D slice equals the matching plane of the 3D volume. Structures are painted with
one-pixel partial-volume edges (soft occupancy), later structures over earlier ones.

Coordinate frame (mm): ``x`` to the patient's left (image right), ``y`` anterior (image up), ``z`` along the
torso from its inferior end (0, about L3) to the lung apices (``length_mm``). Array axes: ``(H, W[, D])`` =
(rows anterior -> posterior, columns patient right -> left, slices inferior -> superior); :func:`affine` gives
the matching RAS+ voxel -> world matrix.

Label table (:data:`LABELS`), with the HU the renderer uses (non-contrast CT, typical adult values; e.g.
Hofer, *CT Teaching Manual*; Lamba et al. 2014):

====  ===============  ==========================================================================
  0   background       air outside the body, -1000
  1   fat              subcutaneous, visceral, mediastinal and epicardial fat, -120..-80
  2   muscle           body-wall, paraspinal and psoas muscle, 40..60
  3   soft_tissue      mediastinum, bowel, discs, spinal canal, airway walls, 15..90
  4   lung             lung parenchyma, -900..-780 (breathing dependent) with fine texture
  5   airway           trachea and bronchial lumen (air), -1000
  6   lung_vessel      pulmonary vessel tree, 30..50 (partial volume with lung at small calibre)
  7   heart            myocardium and blood pool, 35..50
  8   aorta            ascending aorta, arch and descending aorta, 35..50
  9   liver            40..70 (fatty to normal), texture SD 2..10 per patient
 10   spleen           40..55
 11   kidney_left      parenchyma 25..40
 12   kidney_right     parenchyma 25..40
 13   spine            vertebrae: cortical shell 1000..1300, trabecular core 150..300
 14   ribs             ribs (cortical shell and marrow) and sternum
 15   lung_nodule      solid 0..60 or ground glass -650..-350
 16   liver_lesion     hypodense 5..40
====  ===============  ==========================================================================

Why hand-written: skimage/phantominator give Shepp-Logan-type ellipse phantoms without anatomy, breathing or
vessel trees, and XCAT-style anatomical phantoms are licensed and need downloads. The numpy renderer below
is vectorised (full-grid ellipsoids and bounding-box rasterised tube segments): a 64^3 volume takes well under
a second on one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

LABELS: dict[int, str] = {
    0: "background",
    1: "fat",
    2: "muscle",
    3: "soft_tissue",
    4: "lung",
    5: "airway",
    6: "lung_vessel",
    7: "heart",
    8: "aorta",
    9: "liver",
    10: "spleen",
    11: "kidney_left",
    12: "kidney_right",
    13: "spine",
    14: "ribs",
    15: "lung_nodule",
    16: "liver_lesion",
}
LABEL_IDS: dict[str, int] = {name: idx for idx, name in LABELS.items()}

#: field of view (mm) of the default in-plane spacing: ``FOV_MM / max(H, W)``; the body fits the inscribed circle
FOV_MM = 400.0
#: z extent (mm) covered by a 3D volume with default spacing
Z_EXTENT_MM = 340.0


class Phantom(NamedTuple):
    """A rendered phantom.

    Attributes:
        hu: ``(H, W)`` or ``(H, W, D)`` float32 Hounsfield units.
        labels: same shape, uint8 label map (:data:`LABELS`).
        spacing: voxel size in mm per array axis (2 or 3 values).
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]


class Segment(NamedTuple):
    """A straight tube from ``a`` to ``b`` (mm, xyz) of radius ``radius`` mm."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class Anatomy:
    """All parameters of one phantom patient (mm / HU); drawn by :func:`draw_anatomy`, rendered by :func:`render`."""

    length_mm: float
    slice_z_mm: float  # default level of a 2D slice (lower thorax: lung bases, heart, liver dome, spleen)
    body_center: tuple[float, float]
    body_axes: tuple[float, float]  # abdomen semi-axes (x, y)
    chest_scale: float  # thorax / abdomen width ratio
    body_harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, 4
    fat_mm: float
    muscle_mm: float
    visceral_fat: float  # threshold quantile of visceral fat in the body cavity (0 = none)
    breath: float  # 0 = full expiration, 1 = full inspiration
    diaphragm_z: float  # left dome top
    right_dome_rise: float  # right dome is higher by this
    hu: dict = field(default_factory=dict)  # tissue -> HU
    lungs: tuple = ()  # per lung: (cx, cy, ax, ay)
    heart: tuple = ()  # (cx, cy, cz, ax, ay, az, angle)
    aorta: tuple[Segment, ...] = ()
    liver: tuple = ()  # (cx, cy, cz, ax, ay, az, harmonics)
    spleen: tuple = ()
    kidneys: tuple = ()  # ((cx, cy, cz, ax, ay, az), (...)) left, right
    spine: tuple = ()  # (cy, body_radius, period, disc, phase)
    ribs: tuple = ()  # (pitch, z0, slope, half_width, half_height)
    vessels: tuple[Segment, ...] = ()
    airways_central: tuple[Segment, ...] = ()
    airways: tuple[Segment, ...] = ()
    nodules: tuple = ()  # (x, y, z, r, hu)
    liver_lesions: tuple = ()  # (x, y, z, r, hu)
    texture: tuple = ()  # random Fourier-field parameters per tissue


# --------------------------------------------------------------------------------------------------------------
# drawing the patient


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
    segments: list[Segment] = []
    stack = [(start, direction / np.linalg.norm(direction), length, radius, 0)]
    while stack:
        p, d, ln, r, g = stack.pop()
        q = p + d * ln
        segments.append(Segment(tuple(p), tuple(q), float(r)))
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
    return segments


def _fourier_field_params(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> tuple:
    """Random plane waves (k vectors in rad/mm, phases) for a unit-variance smooth random field."""
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=n)
    k = directions * (2 * np.pi / wavelengths)[:, None]
    phases = rng.uniform(0, 2 * np.pi, size=n)
    return (k, phases)


def draw_anatomy(seed: int) -> Anatomy:
    """Draw one patient's anatomy from ``seed`` (numpy ``default_rng``); all randomness of a phantom is here."""
    rng = np.random.default_rng(seed)
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

    hu = {
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

    cx, cy = center
    # thorax inner cavity semi-axes (inside fat + muscle)
    tax, tay = ax * chest_scale - fat - muscle, ay - fat - muscle
    infl = 1.0 + 0.05 * breath
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
    spine_cy = cy - ay + fat + muscle + u(45.0, 55.0)
    spine_r = u(15.0, 20.0)
    heart = (
        cx + u(0.08, 0.16) * tax,
        cy + u(0.15, 0.3) * tay,
        diaphragm_z + u(30, 40),
        u(55, 66),
        u(44, 54),
        u(48, 58),
        np.deg2rad(u(25, 45)),
    )
    # aorta: ascending (anterior-right of the descending), arch, descending next to the spine
    r_ao = u(10.0, 13.5)
    desc_x, desc_y = cx + spine_r + u(3, 9), spine_cy + spine_r * 0.7 + u(0, 6)
    asc_x, asc_y = cx + u(-18, -8), heart[1] + u(8, 18)
    arch_z = 0.83 * length + u(-8, 8)
    aorta = (
        Segment((asc_x, asc_y, heart[2]), (asc_x, asc_y, arch_z), r_ao * 1.1),
        Segment((asc_x, asc_y, arch_z), (desc_x, desc_y, arch_z + 5.0), r_ao),
        Segment((desc_x, desc_y, arch_z + 5.0), (desc_x, desc_y, -20.0), r_ao * 0.9),
    )
    liver = (
        cx - u(0.30, 0.40) * tax,
        cy + u(-0.05, 0.12) * tay,
        diaphragm_z + right_dome_rise - u(75, 90),
        tax * u(0.62, 0.75),
        tay * u(0.70, 0.85),
        u(85, 100),
        tuple((u(0.0, 0.06), u(0, 2 * np.pi)) for _ in range(3)),
    )
    spleen = (
        cx + u(0.62, 0.72) * tax,
        cy - u(0.25, 0.4) * tay,
        diaphragm_z - u(35, 50),
        u(22, 30),
        u(42, 55),
        u(45, 60),
    )
    kz = 0.17 * length
    kidneys = tuple(
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
    spine = (spine_cy, spine_r, u(25.0, 30.0), u(4.5, 6.5), u(0, 1))
    ribs = (u(24.0, 30.0), u(0, 30.0), u(30.0, 45.0), u(4.0, 5.5), u(6.0, 8.0))

    # pulmonary vessel trees from each hilum: three lobar roots per lung
    vessels: list[Segment] = []
    airways: list[Segment] = []
    hilum_z = diaphragm_z + u(60, 75)
    carina_z = hilum_z + u(18, 28)
    trachea_y = spine_cy + spine_r + u(14, 22)
    trachea_r = u(7.0, 9.5)
    airways_central = [Segment((cx, trachea_y, length + 20.0), (cx, trachea_y, carina_z), trachea_r)]
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

    # lesions: drawn always (so lesions=False gives the same anatomy), placed near the 2D slice level half the time
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

    texture = {
        "lung": _fourier_field_params(rng, 16, (6.0, 20.0)),
        "soft": _fourier_field_params(rng, 12, (15.0, 60.0)),
        "visceral": _fourier_field_params(rng, 12, (18.0, 50.0)),
        "trabecular": _fourier_field_params(rng, 16, (3.0, 8.0)),
        "vessel_a": _fourier_field_params(rng, 16, (14.0, 26.0)),
        "vessel_b": _fourier_field_params(rng, 16, (14.0, 26.0)),
        "liver": _fourier_field_params(rng, 16, (5.0, 16.0)),
    }
    # tissue heterogeneity (HU SD of the texture fields): varies between patients, as radiomic features do
    hu.update(fat_tex=u(3.0, 9.0), muscle_tex=u(1.5, 6.0), lung_tex=u(6.0, 20.0), liver_tex=u(2.0, 10.0))
    return Anatomy(
        length_mm=length,
        slice_z_mm=slice_z,
        body_center=center,
        body_axes=(ax, ay),
        chest_scale=chest_scale,
        body_harmonics=harmonics,
        fat_mm=fat,
        muscle_mm=muscle,
        visceral_fat=visceral,
        breath=breath,
        diaphragm_z=diaphragm_z,
        right_dome_rise=right_dome_rise,
        hu=hu,
        lungs=tuple(lungs),
        heart=heart,
        aorta=aorta,
        liver=liver,
        spleen=spleen,
        kidneys=kidneys,
        spine=spine,
        ribs=ribs,
        vessels=tuple(vessels),
        airways_central=tuple(airways_central),
        airways=tuple(airways),
        nodules=tuple(nodules),
        liver_lesions=tuple(lesions),
        texture=tuple(sorted(texture.items())),
    )


# --------------------------------------------------------------------------------------------------------------
# rendering


class _Grid:
    """Voxel-centre coordinates (mm) of an ``(H, W, D)`` grid as broadcastable 1D axes."""

    def __init__(self, shape3: tuple[int, int, int], spacing3: tuple[float, float, float], z_center: float):
        h, w, d = shape3
        sy, sx, sz = spacing3
        self.y = (((h - 1) / 2.0 - np.arange(h)) * sy)[:, None, None]
        self.x = ((np.arange(w) - (w - 1) / 2.0) * sx)[None, :, None]
        self.z = (z_center + (np.arange(d) - (d - 1) / 2.0) * sz)[None, None, :]
        self.shape = shape3
        self.spacing = spacing3
        self.h = max(sx, sy)  # partial-volume edge width (mm)

    def index_range(self, axis: int, lo: float, hi: float) -> slice:
        coords = (self.y.ravel(), self.x.ravel(), self.z.ravel())[axis]
        inside = np.nonzero((coords >= lo) & (coords <= hi))[0]
        if inside.size == 0:
            return slice(0, 0)
        return slice(int(inside.min()), int(inside.max()) + 1)


def _soft(signed_distance: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm, negative inside) over an edge of width ``h``."""
    return np.clip(0.5 - signed_distance / h, 0.0, 1.0)


def _tube(dist: np.ndarray, radius: float, h: float) -> np.ndarray:
    """Partial-volume occupancy of a tube: a tube thinner than a voxel is widened to ``h/2`` and dimmed by
    ``(r / (h/2))^2`` so that its cross-sectional area (the mean HU it adds) is kept."""
    r_eff = max(radius, h / 2.0)
    return _soft(dist - r_eff, h) * min(1.0, (radius / r_eff) ** 2)


def _ellipse_rho(dx, dy, ax, ay, harmonics=(), angle: float = 0.0):
    """Normalised elliptic radius (1 on the boundary), optionally rotated and with angular harmonics."""
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    rho = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    if harmonics:
        theta = np.arctan2(dy, dx)
        wobble = 1.0
        for k, (amp, phase) in enumerate(harmonics, start=2):
            wobble = wobble + amp * np.cos(k * theta + phase)
        rho = rho / wobble
    return rho


def _ellipsoid(grid: _Grid, c, axes, harmonics=(), angle: float = 0.0) -> np.ndarray:
    """Soft occupancy of a (rotated, harmonically perturbed) ellipsoid."""
    cx, cy, cz = c
    ax, ay, az = axes
    rho_xy = _ellipse_rho(grid.x - cx, grid.y - cy, ax, ay, harmonics, angle)
    rho = np.sqrt(rho_xy**2 + ((grid.z - cz) / az) ** 2)
    return _soft((rho - 1.0) * min(ax, ay), grid.h)


def _field(grid: _Grid, params) -> np.ndarray:
    """Unit-variance smooth random field from random plane waves, evaluated at the voxel centres."""
    k, phases = params
    out = np.zeros(np.broadcast_shapes(grid.x.shape, grid.y.shape, grid.z.shape), dtype=np.complex64)
    for (kx, ky, kz), ph in zip(k, phases):
        # cos(k.p + phase) = Re(e^{i kx x} e^{i ky y} e^{i kz z} e^{i phase}): separable, no full-grid cos
        ex = np.exp(1j * (kx * grid.x + ph)).astype(np.complex64)
        ey = np.exp(1j * ky * grid.y).astype(np.complex64)
        ez = np.exp(1j * kz * grid.z).astype(np.complex64)
        out += (ey * ez) * ex
    return out.real * np.float32(np.sqrt(2.0 / len(phases)))


def _segments(
    grid: _Grid, segments: Sequence[Segment], out: np.ndarray, radius_scale: float = 1.0
) -> np.ndarray:
    """Rasterise tubes into ``out`` (max of soft occupancies), each within its bounding box only."""
    for seg in segments:
        a = np.asarray(seg.a, dtype=float)
        b = np.asarray(seg.b, dtype=float)
        r = seg.radius * radius_scale
        pad = r + grid.h
        lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
        sy = grid.index_range(0, lo[1], hi[1])
        sx = grid.index_range(1, lo[0], hi[0])
        sz = grid.index_range(2, lo[2], hi[2])
        if sy.stop == sy.start or sx.stop == sx.start or sz.stop == sz.start:
            continue
        px, py, pz = grid.x[:, sx] - a[0], grid.y[sy] - a[1], grid.z[:, :, sz] - a[2]
        ab = b - a
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
        dist = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        occ = _tube(dist, r, grid.h)
        view = out[sy, sx, sz]
        np.maximum(view, occ, out=view)
    return out


def _paint(hu: np.ndarray, labels: np.ndarray, occ: np.ndarray, value, label: int | None) -> None:
    """Composite ``value`` over ``hu`` with occupancy ``occ``; voxels more than half covered get ``label``."""
    occ = np.broadcast_to(occ, hu.shape)
    hu += occ * (value - hu)
    if label is not None:
        labels[occ > 0.5] = label


def _diaphragm(anat: Anatomy, grid: _Grid) -> np.ndarray:
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
        anat: patient parameters from :func:`draw_anatomy`.
        shape: ``(H, W)`` for a 2D axial slice or ``(H, W, D)`` for a volume (D along z).
        spacing: voxel size in mm per axis (default :func:`default_spacing`).
        z_center_mm: z (mm) of the slice (2D) or of the volume centre (3D). Default: ``anat.slice_z_mm`` for 2D
            (a lower-thorax level: lung bases, heart, liver dome), the torso middle for 3D.
        lesions: paint lung nodules and liver lesions.

    Returns:
        :class:`Phantom` (HU float32, labels uint8, spacing).
    """
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
    g = _Grid(shape3, spacing3, float(z_center_mm))
    tex = dict(anat.texture)
    H = anat.hu
    hu = np.full(shape3, -1000.0, dtype=np.float32)
    lab = np.zeros(shape3, dtype=np.uint8)
    cx, cy = anat.body_center
    ax, ay = anat.body_axes
    # body widens from abdomen to chest (above the diaphragm), and tapers at the lung apices / shoulders
    zt = np.clip((g.z - (anat.diaphragm_z - 40.0)) / 60.0, 0.0, 1.0)
    wide = 1.0 + (anat.chest_scale - 1.0) * zt
    soft_field = _field(g, tex["soft"])

    # 1. body outline: subcutaneous fat
    rho = _ellipse_rho(g.x - cx, g.y - cy, ax * wide, ay, anat.body_harmonics)
    body = _soft((rho - 1.0) * ay, g.h)
    _paint(hu, lab, body, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])
    # 2. muscle ring and 3. body cavity (soft tissue with visceral / mediastinal fat)
    fat, mus = anat.fat_mm, anat.muscle_mm
    rho_m = _ellipse_rho(g.x - cx, g.y - cy, ax * wide - fat, ay - fat, anat.body_harmonics)
    _paint(
        hu,
        lab,
        _soft((rho_m - 1.0) * (ay - fat), g.h),
        H["muscle"] + H["muscle_tex"] * soft_field,
        LABEL_IDS["muscle"],
    )
    cav_ax, cav_ay = ax * wide - fat - mus, ay - fat - mus
    rho_c = _ellipse_rho(g.x - cx, g.y - cy, cav_ax, cav_ay, anat.body_harmonics)
    cavity = _soft((rho_c - 1.0) * cav_ay, g.h)
    _paint(hu, lab, cavity, H["soft_tissue"] + 4.0 * soft_field, LABEL_IDS["soft_tissue"])
    visc = _field(g, tex["visceral"])
    thr = np.float32(1.2 - 2.0 * anat.visceral_fat)
    visc_occ = cavity * np.clip((visc - thr) * 2.0 + 0.5, 0.0, 1.0)
    _paint(hu, lab, visc_occ, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])

    # 4. paraspinal and psoas muscles
    spine_cy, spine_r, period, disc, phase = anat.spine
    for side in (-1.0, 1.0):
        para = _ellipse_rho(
            g.x - (cx + side * (spine_r + 16.0)), g.y - (spine_cy - spine_r - 28.0), 24.0, 22.0
        )
        _paint(
            hu,
            lab,
            _soft((para - 1.0) * 22.0, g.h) * body,
            H["muscle"] + H["muscle_tex"] * soft_field,
            LABEL_IDS["muscle"],
        )
        psoas_r = np.clip((anat.diaphragm_z - 60.0 - g.z) / 80.0, 0.0, 1.0) * 20.0 + 1e-3
        psoas = _ellipse_rho(
            g.x - (cx + side * (spine_r + 14.0)), g.y - (spine_cy + 4.0), psoas_r, psoas_r * 1.1
        )
        _paint(
            hu,
            lab,
            _soft((psoas - 1.0) * psoas_r, g.h),
            H["muscle"] + H["muscle_tex"] * soft_field,
            LABEL_IDS["muscle"],
        )

    # 5. lungs: above the diaphragm, tapering at the apices, inside the cavity
    dia = _diaphragm(anat, g)
    apex_scale = np.sqrt(np.clip((anat.length_mm - g.z) / (0.2 * anat.length_mm), 1e-4, 1.0))
    lung_occ = np.zeros(shape3, dtype=np.float32)
    for lx, ly, lax, lay in anat.lungs:
        r = _ellipse_rho(g.x - lx, g.y - ly, lax * apex_scale, lay * apex_scale)
        lung_occ = np.maximum(lung_occ, _soft((r - 1.0) * lax * apex_scale, g.h))
    lung_occ *= _soft(dia - g.z, g.h) * np.clip(cavity * 1.5 - 0.25, 0, 1)
    lung_tex = _field(g, tex["lung"])
    _paint(hu, lab, lung_occ, H["lung"] + H["lung_tex"] * lung_tex, LABEL_IDS["lung"])
    # 6. pulmonary vessels and airways (only inside the lungs; trachea and main bronchi everywhere)
    vessel_occ = _segments(g, anat.vessels, np.zeros(shape3, dtype=np.float32))
    # peripheral small vessels: curves where two smooth random fields both vanish (distance ~ |f| lambda / 2 pi)
    f_a, f_b = _field(g, tex["vessel_a"]), _field(g, tex["vessel_b"])
    small = _tube(np.sqrt(f_a**2 + f_b**2) * (20.0 / (2 * np.pi)), 1.2, g.h)
    vessel_occ = np.maximum(vessel_occ, small) * lung_occ
    _paint(hu, lab, vessel_occ, H["vessel"], LABEL_IDS["lung_vessel"])
    wall = _segments(g, anat.airways, np.zeros(shape3, dtype=np.float32), 1.25) * lung_occ
    wall = _segments(g, anat.airways_central, wall, 1.3)
    _paint(hu, lab, wall, H["soft_tissue"], LABEL_IDS["soft_tissue"])
    lumen = _segments(g, anat.airways, np.zeros(shape3, dtype=np.float32)) * lung_occ
    lumen = _segments(g, anat.airways_central, lumen)
    _paint(hu, lab, lumen, -1000.0, LABEL_IDS["airway"])

    # 7. heart (epicardial fat, myocardium, blood pool), above the left dome
    hx, hy, hz, hax, hay, haz, hang = anat.heart
    above = _soft(dia - 4.0 - g.z, g.h)
    _paint(
        hu,
        lab,
        _ellipsoid(g, (hx, hy, hz), (hax + 4, hay + 4, haz + 4), angle=hang) * above,
        H["fat"],
        LABEL_IDS["fat"],
    )
    _paint(
        hu,
        lab,
        _ellipsoid(g, (hx, hy, hz), (hax, hay, haz), angle=hang) * above,
        H["myocardium"],
        LABEL_IDS["heart"],
    )
    _paint(
        hu,
        lab,
        _ellipsoid(g, (hx, hy, hz + 4), (hax * 0.7, hay * 0.7, haz * 0.7), angle=hang) * above,
        H["blood"],
        LABEL_IDS["heart"],
    )
    # 8. aorta
    _paint(
        hu,
        lab,
        _segments(g, anat.aorta, np.zeros(shape3, dtype=np.float32)),
        H["blood"] + 4.0,
        LABEL_IDS["aorta"],
    )

    # 9. liver below the right dome, 10. spleen, 11-12. kidneys
    below = _soft(g.z - (dia - 3.0), g.h)
    lcx, lcy, lcz, lax, lay, laz, lh = anat.liver
    liver_occ = _ellipsoid(g, (lcx, lcy, lcz), (lax, lay, laz), lh) * below * cavity
    _paint(
        hu,
        lab,
        liver_occ,
        H["liver"] + H["liver_tex"] * (0.5 * soft_field + 0.87 * _field(g, tex["liver"])),
        LABEL_IDS["liver"],
    )
    scx, scy, scz, sax, say, saz = anat.spleen
    _paint(
        hu,
        lab,
        _ellipsoid(g, (scx, scy, scz), (sax, say, saz), angle=0.5) * below * cavity,
        H["spleen"],
        LABEL_IDS["spleen"],
    )
    for (kx, ky, kz, kax, kay, kaz), name in zip(anat.kidneys, ("kidney_left", "kidney_right")):
        perirenal = _ellipsoid(g, (kx, ky, kz), (kax + 7, kay + 7, kaz + 9), angle=0.4)
        _paint(hu, lab, perirenal, H["fat"] + H["fat_tex"] * soft_field, LABEL_IDS["fat"])
        _paint(hu, lab, _ellipsoid(g, (kx, ky, kz), (kax, kay, kaz), angle=0.4), H["kidney"], LABEL_IDS[name])
        sinus = _ellipsoid(g, (kx - np.sign(kx - cx) * 0.35 * kax, ky, kz), (kax * 0.4, kay * 0.4, kaz * 0.6))
        _paint(hu, lab, sinus, H["fat"] + 40.0, LABEL_IDS["fat"])

    # 13. spine: vertebral bodies (cortical shell + trabecular core) separated by discs, canal, neural arch
    zeta = ((g.z / period + phase) % 1.0) * period  # mm into the current vertebra+disc period
    in_disc = zeta < disc
    dz_end = np.minimum(np.abs(zeta - disc), np.abs(period - zeta))  # mm to the nearest endplate
    r_body = _ellipse_rho(g.x - cx, g.y - spine_cy, spine_r * 1.1, spine_r)
    body_occ = _soft((r_body - 1.0) * spine_r, g.h)
    trab = H["trabecular"] + 35.0 * _field(g, tex["trabecular"])
    cortical_w = 2.0
    is_cortex = ((1.0 - r_body) * spine_r < cortical_w) | (dz_end < cortical_w)
    vert_hu = np.where(is_cortex, np.float32(H["cortical"]), trab)
    _paint(hu, lab, body_occ * ~in_disc, vert_hu, LABEL_IDS["spine"])
    _paint(hu, lab, body_occ * in_disc, H["disc"], LABEL_IDS["soft_tissue"])
    canal_c = spine_cy - spine_r - 9.0
    arch_z = zeta > disc + 0.35 * (period - disc)  # spinous process: upper part of each vertebra
    r_arch = _ellipse_rho(g.x - cx, g.y - canal_c, 14.0, 12.0)  # neural arch and facets: every level
    _paint(
        hu,
        lab,
        _soft((r_arch - 1.0) * 12.0, g.h),
        H["cortical"] * 0.6 + 0.4 * trab,
        LABEL_IDS["spine"],
    )
    r_sp = _ellipse_rho(g.x - cx, g.y - (canal_c - 20.0), 4.5, 14.0)
    _paint(
        hu, lab, _soft((r_sp - 1.0) * 4.5, g.h) * arch_z, H["cortical"] * 0.6 + 0.4 * trab, LABEL_IDS["spine"]
    )
    r_canal = _ellipse_rho(g.x - cx, g.y - canal_c, 8.0, 7.0)
    _paint(hu, lab, _soft((r_canal - 1.0) * 7.0, g.h), H["canal"], LABEL_IDS["soft_tissue"])

    # 14. ribs: sloped bands just inside the muscle ring, from the spine round to the costal cartilages
    pitch, z0, slope, half_w, half_h = anat.ribs
    rib_ax, rib_ay = cav_ax + half_w * 0.6, cav_ay + half_w * 0.6
    rr = _ellipse_rho(g.x - cx, g.y - cy, rib_ax, rib_ay, anat.body_harmonics)
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
    rib_occ = _soft((dn - 1.0) * half_w, g.h) * in_range
    rib_hu = np.where(dn > 0.55, np.float32(H["cortical"] * 0.9), trab)
    _paint(hu, lab, rib_occ, rib_hu, LABEL_IDS["ribs"])
    sternum_z = (g.z > anat.diaphragm_z + 10.0) & (g.z < 0.92 * anat.length_mm)
    r_st = _ellipse_rho(g.x - cx, g.y - (cy + cav_ay + 2.0), 14.0, 6.0)
    st_occ = _soft((r_st - 1.0) * 6.0, g.h) * sternum_z
    _paint(hu, lab, st_occ, np.where(r_st > 0.6, np.float32(H["cortical"] * 0.8), trab), LABEL_IDS["ribs"])

    # 15-16. lesions
    if lesions:
        for x, y, z, r, val in anat.nodules:
            occ = _ellipsoid(g, (x, y, z), (r, r, r)) * lung_occ
            _paint(hu, lab, occ, val, LABEL_IDS["lung_nodule"])
        for x, y, z, r, val in anat.liver_lesions:
            occ = _ellipsoid(g, (x, y, z), (r, r * 0.9, r)) * liver_occ
            _paint(hu, lab, occ, val, LABEL_IDS["liver_lesion"])

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
