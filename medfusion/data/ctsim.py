"""CT acquisition simulation: HU image -> sinogram -> photon noise -> filtered back-projection -> HU.

The physics (parallel-beam, monoenergetic, e.g. Kak & Slaney, *Principles of Computerized Tomographic Imaging*,
ch. 3 and 4; Hsieh, *Computed Tomography*, ch. 3 and 5):

1. attenuation: ``mu = mu_water(kVp) * (1 + HU / 1000)`` per mm (HU clipped at -1000, zero outside the scan circle);
2. slice thickness: the detector row integrates attenuation along z, so a 3D volume is averaged along z over
   the nominal thickness (rectangular slice-sensitivity profile, :func:`thickness_blur`);
3. forward projection: ``p = integral mu dl`` (scikit-image ``radon``, parallel beam, ``circle=True``);
4. detection: counts ``N ~ Poisson(I0 exp(-p)) + Normal(0, sigma_e)`` (Beer-Lambert, quantum + electronic noise),
   ``p_noisy = -log(max(N, 1) / I0)``;
5. reconstruction: filtered back-projection (``iradon``) whose filter is the protocol's "kernel"
   (``ramp`` sharpest, then ``shepp-logan``, ``cosine``, ``hamming``, ``hann`` smoothest);
6. back to HU: ``HU = 1000 (mu / mu_water - 1)``.

Incident flux. ``I0`` photons per ray is proportional to the protocol's relative ``dose`` (mAs) and to its slice
thickness (detector row width). It is also scaled with the grid so that a protocol gives the same image noise
(in HU) at any matrix size: FBP noise variance goes as ``1 / (I0 * n_views * pixel^2)``, so
``I0 = I0_REF * dose * (thickness / 2.5 mm) * (PIXEL_REF / pixel)^2 * (N_VIEWS_REF / n_views)``.
``I0_REF`` is set so that the standard protocol gives ~12 HU noise in soft tissue (a standard-dose abdomen);
at the reference grid (128^2 over 400 mm, 202 views) it is 1.4e5 photons per ray.

One raw acquisition, several reconstructions (:func:`scan_protocols`). Real protocol pairs come from one raw scan:
kernels are different filters of the same projections; a thick slice combines thin detector rows; a lower dose is
simulated by noise insertion into the full-dose projections (the Mayo/AAPM low-dose challenge recipe; Yu et al.,
Med Phys 39:2012). Here each thin detector row is counted once at the highest dose of the protocol set,
``N_k ~ Poisson(I0_row exp(-p_k))``, and every lower (dose x row-overlap) fraction ``f`` is a binomial thinning of
it, chained from the largest fraction down so that smaller ones are subsets of larger ones
(``Binomial(Poisson(l), f) = Poisson(f l)``, so each protocol's counts are exactly Poisson at its own flux). A
protocol's line integral is the overlap-weighted mean of its rows' ``-log(N_k(f) / (f I0_row))`` (image-domain z
combination, as multi-slice scanners form thick slices; its variance is ``1 / (dose * I0 per mm * thickness)``, the
same flux rule as below). So protocols of equal dose and thickness share their noise exactly (only the kernel
differs), a low-dose scan's noise is the standard's plus independent extra noise, and the repeat scan (another
seed) shares nothing. Independent acquisitions per protocol would make any generator of standard texture lose
PSNR against the standard scan by construction (its noise realisation cannot be predicted), which is not how
paired kernel data behave.

Why hand-written: no maintained library simulates a protocol (kernel, dose, thickness) end to end on CPU; ASTRA
and TIGRE need GPUs or compiled extensions. scikit-image provides the projector and FBP; the rest is the few
lines of physics above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

#: reconstruction filters scikit-image's ``iradon`` implements, sharpest first
KERNELS: tuple[str, ...] = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
#: linear attenuation of water (1/mm) at the effective energy of each tube voltage (NIST XCOM, ~ kVp / 2.2)
MU_WATER: dict[int, float] = {80: 0.0224, 100: 0.0206, 120: 0.0195, 140: 0.0187}
#: incident photons per ray of the standard protocol on the reference grid (sets the noise level)
I0_REF = 1.4e5
PIXEL_REF_MM = 400.0 / 128
N_VIEWS_REF = 202
THICKNESS_REF_MM = 2.5
#: default field of view (mm) when no pixel size is given: pixel = FOV_MM / N
FOV_MM = 400.0


@dataclass(frozen=True)
class Protocol:
    """A CT acquisition + reconstruction protocol.

    Attributes:
        name: protocol id (file names, manifests).
        kernel: FBP filter, one of :data:`KERNELS` (the "reconstruction kernel").
        dose: incident photon flux relative to the standard protocol (1.0); proportional to mAs.
        slice_thickness_mm: nominal reconstructed slice thickness (z averaging; thicker = more photons).
        electronic_noise: SD of the additive Gaussian detector noise, in photon counts per ray.
        kvp: tube voltage (sets ``mu_water``; one of :data:`MU_WATER`).
        mas: tube current-time product written to DICOM ``Exposure`` (= 200 * dose for the built-in set).
        description: one line for humans and DICOM ``SeriesDescription``.
    """

    name: str
    kernel: str
    dose: float
    slice_thickness_mm: float
    electronic_noise: float
    kvp: int
    mas: float
    description: str

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(
                f"protocol {self.name!r}: unknown kernel {self.kernel!r}; valid: {', '.join(KERNELS)}"
            )
        if self.kvp not in MU_WATER:
            raise ValueError(
                f"protocol {self.name!r}: kvp {self.kvp} not tabulated; valid: {sorted(MU_WATER)}"
            )
        if not (self.dose > 0 and self.slice_thickness_mm > 0 and self.electronic_noise >= 0):
            raise ValueError(
                f"protocol {self.name!r}: dose and slice thickness must be > 0, electronic noise >= 0"
            )


STANDARD = "standard"
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "standard",
            "shepp-logan",
            1.0,
            2.5,
            5.0,
            120,
            200.0,
            "reference: standard dose, medium kernel, 2.5 mm",
        ),
        Protocol("sharp", "ramp", 1.0, 1.0, 5.0, 120, 200.0, "sharp (bone/lung) kernel, thin 1 mm slices"),
        Protocol(
            "smooth",
            "hann",
            1.0,
            2.5,
            5.0,
            120,
            200.0,
            "smooth (soft-tissue) kernel, same dose and thickness",
        ),
        Protocol("low_dose", "shepp-logan", 0.1, 2.5, 5.0, 120, 20.0, "10% dose (20 mAs), medium kernel"),
        Protocol("thick", "shepp-logan", 1.0, 5.0, 5.0, 120, 200.0, "thick 5 mm slices, medium kernel"),
        Protocol(
            "sharp_low_dose", "ramp", 0.15, 1.0, 5.0, 120, 30.0, "hard case: sharp kernel, 1 mm, 15% dose"
        ),
    )
}


def _check_protocol(protocol: Protocol | str) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def default_n_views(n: int) -> int:
    """Views over 180 degrees for an ``n``-pixel slice: ``ceil(pi / 2 * n)`` (angular Nyquist for ``circle=True``)."""
    return int(math.ceil(math.pi / 2 * n))


def incident_flux(protocol: Protocol, pixel_size_mm: float, n_views: int) -> float:
    """Photons per ray ``I0`` for ``protocol`` on this grid (see the module docstring)."""
    return (
        I0_REF
        * protocol.dose
        * (protocol.slice_thickness_mm / THICKNESS_REF_MM)
        * (PIXEL_REF_MM / pixel_size_mm) ** 2
        * (N_VIEWS_REF / n_views)
    )


def thickness_blur(volume_hu: np.ndarray, slice_spacing_mm: float, thickness_mm: float) -> np.ndarray:
    """Average ``(H, W, D)`` along z over a rectangular slice profile of width ``thickness_mm`` (edge-replicated).

    Weight of neighbour ``k`` = overlap of ``[k - 1/2, k + 1/2] * spacing`` with ``[-t/2, t/2]``, normalised.
    Thickness at or below the spacing leaves the volume unchanged.
    """
    from scipy.ndimage import convolve1d

    volume_hu = np.asarray(volume_hu, dtype=np.float32)
    if volume_hu.ndim != 3:
        raise ValueError(f"thickness_blur needs an (H, W, D) volume, got shape {volume_hu.shape}")
    half = thickness_mm / (2.0 * slice_spacing_mm)  # half-width in voxels
    if half <= 0.5:
        return volume_hu.copy()
    n = int(math.ceil(half - 0.5))
    k = np.arange(-n, n + 1, dtype=float)
    weights = np.clip(np.minimum(k + 0.5, half) - np.maximum(k - 0.5, -half), 0.0, None)
    weights /= weights.sum()
    return convolve1d(volume_hu, weights.astype(np.float32), axis=2, mode="nearest")


def _circle(n: int) -> np.ndarray:
    """The scan circle as scikit-image defines it for ``circle=True`` (centre ``n // 2``, radius ``n // 2``)."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    return yy**2 + xx**2 <= (n // 2) ** 2


def project(image_hu: np.ndarray, *, pixel_size_mm: float, n_views: int) -> np.ndarray:
    """Water-equivalent path lengths (mm) of one square HU slice: ``radon(1 + HU/1000) * pixel``, shape ``(N, n_views)``.

    Multiply by ``mu_water`` to get line integrals; values outside the inscribed circle are treated as air.
    """
    from skimage.transform import radon

    image_hu = np.asarray(image_hu, dtype=np.float64)
    if image_hu.ndim != 2 or image_hu.shape[0] != image_hu.shape[1]:
        raise ValueError(f"project needs a square 2D slice, got shape {image_hu.shape}")
    rel = np.clip(1.0 + image_hu / 1000.0, 0.0, None) * _circle(image_hu.shape[0])
    theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
    return radon(rel, theta, circle=True) * pixel_size_mm


def reconstruct_noiseless(
    water_length: np.ndarray, protocol: Protocol | str, *, pixel_size_mm: float
) -> np.ndarray:
    """FBP of the noiseless sinogram with the protocol's kernel (the protocol's resolution without noise), HU."""
    from skimage.transform import iradon

    protocol = _check_protocol(protocol)
    n, n_views = water_length.shape
    theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
    rel = iradon(water_length / pixel_size_mm, theta, output_size=n, filter_name=protocol.kernel, circle=True)
    hu = 1000.0 * (rel - 1.0)
    hu[~_circle(n)] = -1000.0
    return hu.astype(np.float32)


def _row_weights(thickness_mm: float, row_mm: float) -> dict[int, float]:
    """Overlap (in row widths) of row ``k`` (``[k - 1/2, k + 1/2] * row_mm``) with ``[-t/2, t/2]``; sums to ``t / row_mm``
    (a protocol thinner than a row takes the fraction ``t / row_mm`` of the centre row's photons)."""
    half = thickness_mm / (2.0 * row_mm)
    n = max(0, int(math.ceil(half - 0.5)))
    out = {}
    for k in range(-n, n + 1):
        w = min(k + 0.5, half) - max(k - 0.5, -half)
        if w > 1e-9:
            out[k] = float(w)
    return out


def _scan_plan(
    group: Sequence[Protocol], out_slices: Sequence[int], n_rows: int, row_mm: float
) -> dict[tuple[str, int], dict[int, tuple[float, float]]]:
    """``(protocol, slice) -> {row: (fraction of the row's full-dose photons, its readout-noise SD)}``.

    The fraction is the protocol's dose relative to the group's highest dose times the row's overlap with the
    slice profile; the readout noise of a row is ``sigma_e * sqrt(w / sum w)``, so the combined slice has the
    protocol's ``sigma_e``.
    """
    d_max = max(p.dose for p in group)
    plan: dict[tuple[str, int], dict[int, tuple[float, float]]] = {}
    for p in group:
        weights = _row_weights(p.slice_thickness_mm, row_mm)
        for j in out_slices:
            have = {j + k: w for k, w in weights.items() if 0 <= j + k < n_rows}
            total = sum(have.values())
            plan[(p.name, j)] = {
                k: ((p.dose / d_max) * w, p.electronic_noise * math.sqrt(w / total)) for k, w in have.items()
            }
    return plan


def _noisy_line_integrals(
    rng: np.random.Generator,
    plan: Mapping[tuple[str, int], Mapping[int, tuple[float, float]]],
    water: Mapping[int, np.ndarray],
    *,
    i0_row: float,
    mu_w: float,
) -> dict[tuple[int, float, float], np.ndarray]:
    """``(row, fraction, readout SD) -> noisy line integral``: one Poisson count per row, nested thinnings.

    Each row is counted once at the full flux ``i0_row``; every smaller fraction is a binomial thinning of the
    next larger one, so smaller fractions are subsets of larger ones. The row's readout noise is one draw shared by
    its reconstructions, scaled per readout SD.
    """
    needed: dict[int, set[tuple[float, float]]] = {}
    for fr in plan.values():
        for k, fs in fr.items():
            needed.setdefault(k, set()).add(fs)
    line: dict[tuple[int, float, float], np.ndarray] = {}
    for k in sorted(needed):
        lam = i0_row * np.exp(-water[k] * mu_w)
        counts = rng.poisson(lam).astype(np.float64)
        e = rng.standard_normal(counts.shape)  # the row's readout noise, shared by its reconstructions
        prev = 1.0
        for f in sorted({f for f, _ in needed[k]}, reverse=True):  # nested: smaller fractions are subsets
            if f < prev:
                counts = rng.binomial(counts.astype(np.int64), f / prev).astype(np.float64)
                prev = f
            for s_e in sorted({s for g, s in needed[k] if g == f}):
                c = counts + s_e * e if s_e > 0 else counts
                line[(k, f, s_e)] = -np.log(np.maximum(c, 1.0) / (f * i0_row))
    return line


def _reconstruct_group(
    group: Sequence[Protocol],
    plan: Mapping[tuple[str, int], Mapping[int, tuple[float, float]]],
    line: Mapping[tuple[int, float, float], np.ndarray],
    out: dict[str, np.ndarray],
    *,
    out_slices: Sequence[int],
    mu_w: float,
    pixel_size_mm: float,
    n_views: int,
) -> None:
    """FBP of every (protocol, slice) of one kVp group into ``out``; the line integral of a slice is the
    photon-weighted mean of its rows' (protocols of equal dose, thickness and noise share one sinogram)."""
    from skimage.transform import iradon

    n = next(iter(out.values())).shape[0]
    theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
    circle = _circle(n)
    cache: dict[tuple, np.ndarray] = {}
    for p in group:
        for idx, j in enumerate(out_slices):
            fr = plan[(p.name, j)]
            key = tuple(sorted(fr.items()))
            if key not in cache:
                total = sum(f for f, _ in fr.values())
                cache[key] = sum(f * line[(k, f, s_e)] for k, (f, s_e) in fr.items()) / total
            mu = iradon(
                cache[key] / (mu_w * pixel_size_mm), theta, output_size=n, filter_name=p.kernel, circle=True
            )
            hu = 1000.0 * (mu - 1.0)  # iradon of the line integrals in units of mu_water * pixel
            hu[~circle] = -1000.0
            out[p.name][:, :, idx] = hu


def _check_scan(
    rows_hu: np.ndarray,
    protocols: Sequence[Protocol | str],
    *,
    pixel_size_mm: float,
    row_mm: float,
    slices: Sequence[int] | None,
    n_views: int | None,
) -> tuple[np.ndarray, list[Protocol], list[int], int]:
    """Validated ``(rows_hu as float32, protocols, output slices, views)`` of :func:`scan_protocols`."""
    protos = [_check_protocol(p) for p in protocols]
    names = [p.name for p in protos]
    if len(set(names)) != len(names):
        raise ValueError(f"protocol names must be unique, got {names}")
    rows_hu = np.asarray(rows_hu, dtype=np.float32)
    if rows_hu.ndim != 3 or rows_hu.shape[0] != rows_hu.shape[1]:
        raise ValueError(f"rows_hu must be (N, N, R), got shape {rows_hu.shape}")
    if pixel_size_mm <= 0 or row_mm <= 0:
        raise ValueError(f"pixel_size_mm and row_mm must be > 0, got {pixel_size_mm}, {row_mm}")
    n, _, n_rows = rows_hu.shape
    views = default_n_views(n) if n_views is None else int(n_views)
    if views < 1:
        raise ValueError(f"n_views must be >= 1, got {views}")
    out_slices = list(range(n_rows)) if slices is None else [int(j) for j in slices]
    if any(not 0 <= j < n_rows for j in out_slices):
        raise ValueError(f"slices must lie in [0, {n_rows}), got {out_slices}")
    return rows_hu, protos, out_slices, views


def scan_protocols(
    rows_hu: np.ndarray,
    protocols: Sequence[Protocol | str],
    *,
    seed: int,
    pixel_size_mm: float,
    row_mm: float,
    slices: Sequence[int] | None = None,
    n_views: int | None = None,
) -> dict[str, np.ndarray]:
    """One raw acquisition of ``rows_hu``, reconstructed with every protocol (see the module docstring).

    Args:
        rows_hu: ``(N, N, R)`` HU, one thin detector row per z index, each ``row_mm`` wide.
        protocols: :class:`Protocol` objects or names in :data:`PROTOCOLS`; protocols of one kVp share the photons.
        seed: noise seed (numpy ``default_rng``); the same seed reproduces every scan exactly.
        pixel_size_mm: in-plane pixel size.
        row_mm: detector row width (z spacing of ``rows_hu``).
        slices: z indices to reconstruct (default: all rows). Rows beyond the volume do not exist: a slice at the
            edge averages the rows it has (fewer photons, a little more noise).
        n_views: projections over 180 degrees; default :func:`default_n_views`.

    Returns:
        ``{protocol name: float32 HU (N, N, len(slices))}``.
    """
    rows_hu, protos, out_slices, views = _check_scan(
        rows_hu, protocols, pixel_size_mm=pixel_size_mm, row_mm=row_mm, slices=slices, n_views=n_views
    )
    n, _, n_rows = rows_hu.shape
    rng = np.random.default_rng(seed)
    out = {p.name: np.empty((n, n, len(out_slices)), dtype=np.float32) for p in protos}
    water: dict[int, np.ndarray] = {}  # water path lengths per row, shared by every kVp
    for kvp in sorted({p.kvp for p in protos}):
        # 1. which rows each (protocol, slice) combines, with which share of the photons and readout noise
        group = [p for p in protos if p.kvp == kvp]
        plan = _scan_plan(group, out_slices, n_rows, row_mm)
        # 2. photons per ray of one full-dose row: the flux rule with the row's width as thickness
        d_max = max(p.dose for p in group)
        i0_row = incident_flux(replace(group[0], dose=d_max, slice_thickness_mm=row_mm), pixel_size_mm, views)
        # 3. forward projection of the rows needed (once for every kVp), then counts and thinnings per row
        for k in sorted({k for fr in plan.values() for k in fr}):
            if k not in water:
                water[k] = project(rows_hu[:, :, k], pixel_size_mm=pixel_size_mm, n_views=views)
        line = _noisy_line_integrals(rng, plan, water, i0_row=i0_row, mu_w=MU_WATER[kvp])
        # 4. combine rows into slices and reconstruct with each protocol's kernel
        _reconstruct_group(
            group,
            plan,
            line,
            out,
            out_slices=out_slices,
            mu_w=MU_WATER[kvp],
            pixel_size_mm=pixel_size_mm,
            n_views=views,
        )
    return out


def simulate(
    volume_hu: np.ndarray,
    protocol: Protocol | str,
    *,
    seed: int,
    pixel_size_mm: float | None = None,
    slice_spacing_mm: float | None = None,
    n_views: int | None = None,
) -> np.ndarray:
    """Scan ``volume_hu`` with one ``protocol``: deterministic for a given ``seed`` (:func:`scan_protocols`).

    Args:
        volume_hu: ``(N, N)`` slice or ``(N, N, D)`` volume in HU (D along z; slices are scanned one by one).
        protocol: a :class:`Protocol` or a name in :data:`PROTOCOLS`.
        seed: noise seed (numpy ``default_rng``); the same seed reproduces the scan exactly.
        pixel_size_mm: in-plane pixel size; default ``400 mm / N``.
        slice_spacing_mm: z spacing of a volume (detector rows of this width, combined over the thickness);
            default = ``pixel_size_mm``. A 2D slice gets no z averaging (render a slab and use
            :func:`scan_protocols` for that); its thickness only sets the photon flux.
        n_views: projections over 180 degrees; default :func:`default_n_views`.

    Returns:
        float32 HU array of the input's shape.
    """
    protocol = _check_protocol(protocol)
    vol = np.asarray(volume_hu, dtype=np.float32)
    if vol.ndim not in (2, 3) or vol.shape[0] != vol.shape[1]:
        raise ValueError(f"volume_hu must be (N, N) or (N, N, D), got shape {vol.shape}")
    n = vol.shape[0]
    pixel = FOV_MM / n if pixel_size_mm is None else float(pixel_size_mm)
    if vol.ndim == 2:
        row = protocol.slice_thickness_mm  # one row as wide as the slice: the thickness sets the flux only
        return scan_protocols(
            vol[:, :, None], [protocol], seed=seed, pixel_size_mm=pixel, row_mm=row, n_views=n_views
        )[protocol.name][:, :, 0]
    dz = pixel if slice_spacing_mm is None else float(slice_spacing_mm)
    return scan_protocols(vol, [protocol], seed=seed, pixel_size_mm=pixel, row_mm=dz, n_views=n_views)[
        protocol.name
    ]


def dicom_meta(protocol: Protocol | str) -> Mapping[str, object]:
    """DICOM header fields describing ``protocol`` (keywords as in the standard)."""
    protocol = _check_protocol(protocol)
    return {
        "Modality": "CT",
        "Manufacturer": "medfusion-sim",
        "ManufacturerModelName": "parallel-beam FBP simulator",
        "ConvolutionKernel": protocol.kernel,
        "KVP": float(protocol.kvp),
        "Exposure": int(round(protocol.mas)),
        "SliceThickness": float(protocol.slice_thickness_mm),
        "ProtocolName": protocol.name,
        "SeriesDescription": f"{protocol.name}: {protocol.description}"[:64],  # VR LO: at most 64 characters
    }
