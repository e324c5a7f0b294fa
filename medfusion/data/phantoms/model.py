"""The phantom's data model: label table, the drawn patient (:class:`Anatomy`) and the rendered result.

Units: millimetres in the patient frame (``x`` to the patient's left, ``y`` anterior, ``z`` from the torso's
inferior end up), HU for intensities.
"""

from __future__ import annotations

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
    """All parameters of one phantom patient (mm / HU); drawn by ``draw_anatomy``, rendered by ``render``."""

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
    texture: tuple = ()  # random Fourier-field parameters per tissue, sorted by tissue name
