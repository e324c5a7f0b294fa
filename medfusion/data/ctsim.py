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

Why hand-written: no maintained library simulates a protocol (kernel, dose, thickness) end to end on CPU; ASTRA
and TIGRE need GPUs or compiled extensions. scikit-image provides the projector and FBP; the rest is the few
lines of physics above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

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


def acquire_and_reconstruct(
    water_length: np.ndarray,
    protocol: Protocol | str,
    *,
    rng: np.random.Generator,
    pixel_size_mm: float,
) -> np.ndarray:
    """Steps 4-6 for one slice: photon counts at the protocol's flux, log, FBP with its kernel, HU.

    Args:
        water_length: ``(N, n_views)`` from :func:`project`.
        protocol: a :class:`Protocol` or a name in :data:`PROTOCOLS`.
        rng: numpy generator (the only randomness).
        pixel_size_mm: pixel size of the slice that was projected.
    """
    from skimage.transform import iradon

    protocol = _check_protocol(protocol)
    n, n_views = water_length.shape
    mu_w = MU_WATER[protocol.kvp]
    p = water_length * mu_w
    i0 = incident_flux(protocol, pixel_size_mm, n_views)
    counts = rng.poisson(i0 * np.exp(-p)).astype(np.float64)
    if protocol.electronic_noise > 0:
        counts += rng.normal(0.0, protocol.electronic_noise, size=counts.shape)
    p_noisy = -np.log(np.maximum(counts, 1.0) / i0)
    theta = np.linspace(0.0, 180.0, n_views, endpoint=False)
    mu = iradon(p_noisy / pixel_size_mm, theta, output_size=n, filter_name=protocol.kernel, circle=True)
    hu = 1000.0 * (mu / mu_w - 1.0)
    hu[~_circle(n)] = -1000.0
    return hu.astype(np.float32)


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


def simulate(
    volume_hu: np.ndarray,
    protocol: Protocol | str,
    *,
    seed: int,
    pixel_size_mm: float | None = None,
    slice_spacing_mm: float | None = None,
    n_views: int | None = None,
) -> np.ndarray:
    """Scan ``volume_hu`` with ``protocol``: deterministic for a given ``seed``.

    Args:
        volume_hu: ``(N, N)`` slice or ``(N, N, D)`` volume in HU (D along z; slices are scanned one by one).
        protocol: a :class:`Protocol` or a name in :data:`PROTOCOLS`.
        seed: noise seed (numpy ``default_rng``); the same seed reproduces the scan exactly.
        pixel_size_mm: in-plane pixel size; default ``400 mm / N``.
        slice_spacing_mm: z spacing of a volume (for the slice-thickness average); default = ``pixel_size_mm``.
            A 2D slice gets no z averaging (render a slab and use :func:`thickness_blur` for that); its
            thickness only sets the photon flux.
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
    views = default_n_views(n) if n_views is None else int(n_views)
    if pixel <= 0 or views < 1:
        raise ValueError(f"pixel_size_mm must be > 0 and n_views >= 1, got {pixel}, {views}")
    rng = np.random.default_rng(seed)
    if vol.ndim == 2:
        return acquire_and_reconstruct(
            project(vol, pixel_size_mm=pixel, n_views=views), protocol, rng=rng, pixel_size_mm=pixel
        )
    dz = pixel if slice_spacing_mm is None else float(slice_spacing_mm)
    vol = thickness_blur(vol, dz, protocol.slice_thickness_mm)
    out = np.empty_like(vol)
    for k in range(vol.shape[2]):
        sino = project(vol[:, :, k], pixel_size_mm=pixel, n_views=views)
        out[:, :, k] = acquire_and_reconstruct(sino, protocol, rng=rng, pixel_size_mm=pixel)
    return out


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
