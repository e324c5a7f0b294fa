"""Rasterising primitives of the phantom renderer: the voxel grid, partial-volume occupancies and texture fields.

Every structure is painted as a soft occupancy in [0, 1] with a one-voxel partial-volume edge (:func:`soft`),
composited over what was painted before (:meth:`Canvas.paint`). Shapes are ellipses / ellipsoids with optional
rotation and angular harmonics, and straight tubes (:func:`segments`, rasterised in their bounding boxes only).
Tissue texture is a smooth random field made of random plane waves (:func:`field`), evaluated separably.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfusion.data.phantoms.model import Segment


class Grid:
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
        """Indices along array ``axis`` whose voxel centres lie in ``[lo, hi]`` mm."""
        coords = (self.y.ravel(), self.x.ravel(), self.z.ravel())[axis]
        inside = np.nonzero((coords >= lo) & (coords <= hi))[0]
        if inside.size == 0:
            return slice(0, 0)
        return slice(int(inside.min()), int(inside.max()) + 1)


class Canvas:
    """The HU image and label map being painted on ``grid`` (air, background label 0, to start with)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, occ: np.ndarray, value, label: int | None) -> None:
        """Composite ``value`` over the image with occupancy ``occ``; voxels over half covered get ``label``."""
        occ = np.broadcast_to(occ, self.hu.shape)
        self.hu += occ * (value - self.hu)
        if label is not None:
            self.labels[occ > 0.5] = label


def soft(signed_distance: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (mm, negative inside) over an edge of width ``h``."""
    return np.clip(0.5 - signed_distance / h, 0.0, 1.0)


def tube(dist: np.ndarray, radius: float, h: float) -> np.ndarray:
    """Partial-volume occupancy of a tube: a tube thinner than a voxel is widened to ``h/2`` and dimmed by
    ``(r / (h/2))^2`` so that its cross-sectional area (the mean HU it adds) is kept."""
    r_eff = max(radius, h / 2.0)
    return soft(dist - r_eff, h) * min(1.0, (radius / r_eff) ** 2)


def ellipse_rho(dx, dy, ax, ay, harmonics=(), angle: float = 0.0):
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


def ellipsoid(grid: Grid, c, axes, harmonics=(), angle: float = 0.0) -> np.ndarray:
    """Soft occupancy of a (rotated, harmonically perturbed) ellipsoid."""
    cx, cy, cz = c
    ax, ay, az = axes
    rho_xy = ellipse_rho(grid.x - cx, grid.y - cy, ax, ay, harmonics, angle)
    rho = np.sqrt(rho_xy**2 + ((grid.z - cz) / az) ** 2)
    return soft((rho - 1.0) * min(ax, ay), grid.h)


def fourier_field_params(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> tuple:
    """Random plane waves (k vectors in rad/mm, phases) for a unit-variance smooth random field."""
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, size=n)
    k = directions * (2 * np.pi / wavelengths)[:, None]
    phases = rng.uniform(0, 2 * np.pi, size=n)
    return (k, phases)


def field(grid: Grid, params) -> np.ndarray:
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


def segments(grid: Grid, tubes: Sequence[Segment], out: np.ndarray, radius_scale: float = 1.0) -> np.ndarray:
    """Rasterise tubes into ``out`` (max of soft occupancies), each within its bounding box only."""
    for seg in tubes:
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
        occ = tube(dist, r, grid.h)
        view = out[sy, sx, sz]
        np.maximum(view, occ, out=view)
    return out


def empty(grid: Grid) -> np.ndarray:
    """A zero occupancy on ``grid`` (float32), to rasterise tubes into."""
    return np.zeros(grid.shape, dtype=np.float32)
