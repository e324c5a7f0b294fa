"""The deformations the downstream evaluations compare, each ``deform(arrays, seed) -> Deformed``, reproducible
from its seed: ``elastic`` (MONAI ``Rand2DElasticd`` / ``Rand3DElasticd``, the classical augmentation),
``bspline`` (a random cubic B-spline displacement, SimpleITK ``BSplineTransform``: the random-B-spline baseline of
DRDM's registration experiment), ``drdm-random`` (DRDM's forward process alone: a random multi-scale field) and
``drdm:PATH`` (a trained DRDM recovery net, Zheng et al., arXiv 2407.07295, Algorithm 2).

Arrays are ``(1, *spatial)`` tensors (images in [-1, 1], labels integer-valued); images are warped bilinearly,
labels by nearest neighbour. Every deformer returns its field in voxels, ``(D, *spatial)``, channel ``d`` along array
axis ``d``, pull (``warped(x) = moving(x + u(x))``), with its folding fraction (det J <= 0), so that the arms'
strengths can be compared (MONAI's elastic field is recovered by passing the voxel coordinates through the same
draw, bilinearly, with the images).

Units of MONAI's elastic magnitude: in 2D (``Rand2DElasticd``) the control-grid offsets in voxels (``spacing`` in
voxels); in 3D (``Rand3DElasticd``) the factor on uniform noise in [-1, 1] smoothed by a Gaussian of ``sigma`` voxels,
so comparable displacements need far larger magnitudes (about 100-200 for ~1 voxel at sigma 5-8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

DEFORMERS = ("elastic", "bspline", "drdm-random", "drdm:PATH")


def _plain(x) -> torch.Tensor:
    """A float32 ``torch.Tensor`` (MONAI's transforms return ``MetaTensor``s, which do not collate with plain ones)."""
    return (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)).float()


class Deformed(NamedTuple):
    """A deformed copy: the arrays, the pull field in voxels (None where the method gives none) and the % of
    voxels where it folds (NaN without a field)."""

    arrays: dict[str, torch.Tensor]
    ddf: torch.Tensor | None
    folding_pct: float


def _elastic(image_keys: Sequence[str], label_keys: Sequence[str], dims: int, magnitude: tuple[float, float],
             spacing: float) -> Callable:  # fmt: skip
    from monai.transforms import Rand2DElasticd, Rand3DElasticd

    keys = [*image_keys, *label_keys]
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys) + ["bilinear"]
    if dims == 2:
        tf = Rand2DElasticd([*keys, "_ramps"], spacing=(spacing, spacing), magnitude_range=magnitude, prob=1.0,
                            mode=modes, padding_mode="border")  # fmt: skip
    else:
        tf = Rand3DElasticd([*keys, "_ramps"], sigma_range=(spacing, spacing), magnitude_range=magnitude, prob=1.0,
                            mode=modes, padding_mode="border")  # fmt: skip

    def deform(arrays: Mapping[str, torch.Tensor], seed: int) -> Deformed:
        from medfusion.fields import folding_fraction

        shape = tuple(arrays[keys[0]].shape[1:])
        ramps = torch.stack(
            torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
        )
        tf.set_random_state(
            seed
        )  # the ramps (voxel coordinates) go through the same draw: the field, in voxels
        out = tf({**{k: arrays[k] for k in keys}, "_ramps": ramps})
        ddf = _plain(out["_ramps"]) - ramps
        return Deformed({k: _plain(out[k]) for k in keys}, ddf,
                        100.0 * float(folding_fraction(ddf[None]).mean()))  # fmt: skip

    return deform


def _bspline(
    image_keys: Sequence[str], label_keys: Sequence[str], dims: int, magnitude: float, mesh: int
) -> Callable:
    import numpy as np
    import SimpleITK as sitk

    from medfusion.fields import folding_fraction, warp

    def deform(arrays: Mapping[str, torch.Tensor], seed: int) -> Deformed:
        shape = tuple(arrays[image_keys[0]].shape[1:])
        ref = sitk.Image([int(s) for s in shape], sitk.sitkFloat32)  # index i <-> array axis 0 (x)
        tx = sitk.BSplineTransformInitializer(ref, [mesh] * dims, 3)
        rng = np.random.default_rng(seed)
        tx.SetParameters(rng.normal(0.0, magnitude, len(tx.GetParameters())).tolist())
        field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                                  ref.GetSpacing(), ref.GetDirection())  # fmt: skip
        # SimpleITK arrays are (z, y, x, d) for an image whose index is (x, y, z): back to (d, x, y, z)
        u = np.moveaxis(sitk.GetArrayFromImage(field), -1, 0)
        u = np.transpose(u, (0, *range(dims, 0, -1)))
        ddf = torch.from_numpy(np.ascontiguousarray(u)).float()
        out = {
            k: warp(arrays[k][None], ddf[None], mode="bilinear", padding_mode="border")[0] for k in image_keys
        }
        out.update(
            {
                k: warp(arrays[k][None], ddf[None], mode="nearest", padding_mode="border")[0]
                for k in label_keys
            }
        )
        return Deformed(out, ddf, 100.0 * float(folding_fraction(ddf[None]).mean()))

    return deform


def _drdm(image_keys: Sequence[str], label_keys: Sequence[str], net_path: str | None, t_range: tuple[int, int],
          recovery_steps: int | None) -> Callable:  # fmt: skip
    from medfusion.transforms.drdm import RandDRDMDeformd

    keys = [*image_keys, *label_keys]
    process = {}  # a trained model's forward process: the one it was trained with (its exported config)
    if net_path is not None and (Path(net_path) / "config.yaml").is_file():
        import yaml

        init = (yaml.safe_load((Path(net_path) / "config.yaml").read_text()) or {}).get("init_args") or {}
        process = {k: init[k] for k in ("sigma", "ctl_size", "legacy_scale") if k in init}
    tf = RandDRDMDeformd(
        keys, mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys), t_range=t_range,
        recovery_net=net_path, recovery_steps=recovery_steps, padding_mode="border", ddf_key="ddf", **process,
    )  # fmt: skip

    def deform(arrays: Mapping[str, torch.Tensor], seed: int) -> Deformed:
        tf.set_random_state(seed)
        out = tf({k: arrays[k] for k in keys})
        ddf = _plain(out["ddf"])
        return Deformed(
            {k: _plain(out[k]) for k in keys}, ddf, 100.0 * float(tf.last_folding)
        )

    return deform


def make_deformer(
    name: str,
    image_keys: Sequence[str],
    label_keys: Sequence[str],
    spatial_dims: int,
    *,
    elastic_magnitude: tuple[float, float] = (2.0, 4.0),
    elastic_spacing: float = 20.0,
    bspline_sigma: float = 4.0,
    bspline_mesh: int = 4,
    drdm_t_range: tuple[int, int] = (40, 48),
    drdm_steps: int | None = 8,
) -> Callable[[Mapping[str, torch.Tensor], int], Deformed]:
    """The deformer ``name`` (one of :data:`DEFORMERS`; ``drdm:PATH`` names an exported DRDM model folder, whose
    config gives the forward process it was trained with, or its ``.safetensors``). ``elastic_magnitude``: MONAI's
    magnitude range (units: module docstring); ``elastic_spacing``: the 2D control spacing / the 3D smoothing sigma,
    voxels; ``bspline_sigma``: SD of the B-spline coefficients (voxels) on a ``bspline_mesh`` mesh; ``drdm_*``: the
    level range T' and recovery steps."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if name == "elastic":
        return _elastic(image_keys, label_keys, spatial_dims, tuple(elastic_magnitude), elastic_spacing)
    if name == "bspline":
        return _bspline(image_keys, label_keys, spatial_dims, bspline_sigma, bspline_mesh)
    if name == "drdm-random":
        return _drdm(image_keys, label_keys, None, tuple(drdm_t_range), None)
    if name.startswith("drdm:"):
        path = Path(name.split(":", 1)[1])
        if not path.exists():
            raise FileNotFoundError(f"DRDM model not found: {path}")
        return _drdm(image_keys, label_keys, str(path), tuple(drdm_t_range), drdm_steps)
    raise ValueError(f"unknown deformation {name!r}; valid: {', '.join(DEFORMERS)}")
