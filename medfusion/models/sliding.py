"""Sliding-window inference of a 3D restorer whose windows share one initial noise field.

A diffusion sampler run per window draws its own initial noise, so overlapping windows are independent samples and
the Gaussian blending of their overlaps averages them: the noise texture of the output is smoothed at every seam.
Here one noise field is drawn for the whole input (on the latent grid, ``factor`` times coarser than the image) and
every window gets its crop, so overlapping windows start from the same noise. With an ODE sampler (DDIM,
DPM-Solver++) the initial noise is the only randomness, and overlapping windows then agree wherever their networks
see the same context. Window starts are multiples of ``multiple`` (a multiple of ``factor``), so each crop lies on
the latent grid.

Windows and blending are MONAI's ``sliding_window_inference`` (Gaussian importance weights, ``sigma_scale`` 0.125);
:func:`aligned_overlap` picks, per axis, the overlap nearest the requested one whose window step is a multiple of
``multiple``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

WindowFn = Callable[[Tensor, Tensor | None], Tensor]


def aligned_overlap(roi: Sequence[int], multiple: int, target: float = 0.25) -> tuple[float, ...]:
    """Per-axis overlap near ``target`` (a fraction of the window, in [0, 1)) whose window step
    ``roi (1 - overlap)`` is a multiple of ``multiple`` voxels (at least one ``multiple``, at most ``roi``)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {target}")
    out = []
    for r in roi:
        step = max(multiple, int(r * (1.0 - target)) // multiple * multiple)
        out.append(max(0.0, 1.0 - (min(step, r) + 1e-6) / r))  # + 1e-6: MONAI truncates r (1 - overlap)
    return tuple(out)


def window_size(images: Tensor, roi_size: Sequence[int], multiple: int) -> tuple[int, ...]:
    """``roi_size`` checked against ``images`` ``(B, C, *spatial)``: one size per spatial axis, each a positive
    multiple of ``multiple``; a window larger than the input along an axis is cut to the input's size."""
    spatial = tuple(images.shape[2:])
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial):
        raise ValueError(f"roi_size needs {len(spatial)} values (one per spatial axis), got {roi}")
    if any(r <= 0 or r % multiple for r in roi):
        raise ValueError(f"roi_size {roi} must be positive multiples of {multiple}")
    return tuple(min(r, s) for r, s in zip(roi, spatial))


def latent_crop(field: Tensor, where: Sequence[slice], factor: int) -> Tensor:
    """The crop of a latent ``field`` ``(B, C, *spatial / factor)`` under the image window ``where`` (MONAI's
    ``[batch slice, channel slice, *spatial slices]``); ``ValueError`` when the window is off the latent grid."""
    batch, _, *spatial = where
    if any(s.start % factor or s.stop % factor for s in spatial):
        raise ValueError(f"window {tuple(spatial)} is not on the latent grid (factor {factor})")
    return field[(batch, slice(None), *(slice(s.start // factor, s.stop // factor) for s in spatial))]


def sliding_windows(
    images: Tensor,
    roi_size: Sequence[int],
    fn: WindowFn,
    *,
    multiple: int,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    field: Tensor | None = None,
    factor: int = 1,
) -> Tensor:
    """``fn`` over windows of ``images`` ``(B, C, *spatial)``, blended with Gaussian weights; same shape out.

    Args:
        roi_size: window size in voxels, multiples of ``multiple`` (:func:`window_size`).
        fn: ``fn(windows, noise)`` -> restored windows; ``noise`` is the windows' crops of ``field`` (None without).
        multiple: window starts are multiples of it (spatial sizes of ``images`` must be multiples of it too).
        sw_batch_size: windows per call of ``fn``.
        overlap: fraction of a window shared with its neighbour, aligned per axis by :func:`aligned_overlap`.
        field: one noise field for the whole input, ``(B, C_lat, *spatial / factor)``, or None.
        factor: the field's downsampling factor (divides ``multiple``).
    """
    from monai.inferers import sliding_window_inference

    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if multiple % factor:
        raise ValueError(f"multiple ({multiple}) must be a multiple of the latent factor ({factor})")
    bad = [s for s in images.shape[2:] if s % multiple]
    if bad:
        raise ValueError(f"spatial sizes {tuple(images.shape[2:])} must be multiples of {multiple}")
    roi = window_size(images, roi_size, multiple)
    if field is not None:
        want = (images.shape[0], *(s // factor for s in images.shape[2:]))
        if (field.shape[0], *field.shape[2:]) != want:
            raise ValueError(f"field must be (B, C, *spatial / {factor}) = {want} without C, got {tuple(field.shape)}")

    def predictor(windows: Tensor, where: Sequence[Sequence[slice]]) -> Tensor:
        noise = None
        if field is not None:
            noise = torch.cat([latent_crop(field, w, factor) for w in where]).to(windows.device)
        return fn(windows, noise)

    out = sliding_window_inference(
        images, roi, sw_batch_size, predictor, overlap=aligned_overlap(roi, multiple, overlap), mode="gaussian",
        padding_mode="replicate", with_coord=True,
    )  # fmt: skip
    return torch.as_tensor(out)
