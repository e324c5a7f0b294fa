"""``CheckScand``: refuse a loaded scan that no pipeline can use, naming its file.

Placed right after ``LoadImaged`` (``ensure_channel_first=True``) in :func:`medfusion.data.pipelines.build_transforms`,
it applies the shape and value rules of :func:`medfusion.io.checks.check_scan` (which the volume commands apply to a
plain ``(I, J[, K])`` array) to the channel-first tensors of a sample, so that ``fit`` stops on the first bad file
with one line instead of training to NaN weights or failing later in a crop or in collation:

* no voxels, or not one 2D / 3D scan: a 4D series (time points or channels; MONAI loads the fourth NIfTI axis as
  channels) or an array of another rank;
* a 2D image given to a 3D pipeline (a 2D pipeline slices 3D volumes, so that way round is fine);
* NaN or infinite voxels (IEEE 754 non-finite values; one NaN spreads through every convolution and the loss);
* the keys of one sample (``source`` and ``target``, ``image`` and ``label``) of different spatial ranks.

The HU-window rules of ``check_scan`` are not applied here: a pipeline also loads label maps and MR images.
Every error is a ``ValueError`` that starts with the file (``meta["filename_or_obj"]``) and the key.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


def _source(value: Any, key: Hashable) -> str:
    """``<file> (<key>)`` for a loaded MetaTensor, ``<key>`` when it has no file name."""
    meta = getattr(value, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f"{name} ({key})" if name else str(key)


def _original_shape(value: Any) -> tuple[int, ...]:
    """The shape as stored in the file: ``ensure_channel_first`` moved a stored last axis of channels to the front
    (``meta["original_channel_dim"] == -1``) or added a channel axis of 1 (``"no_channel"`` / NaN)."""
    shape = tuple(int(s) for s in value.shape)
    channel_dim = (getattr(value, "meta", None) or {}).get("original_channel_dim")
    if isinstance(channel_dim, (int, float)) and channel_dim == -1:
        return (*shape[1:], shape[0])
    return shape[1:] if shape and shape[0] == 1 else shape


def check_loaded_scan(value: Any, *, spatial_dims: int, source: str = "scan") -> int:
    """The spatial rank (2 or 3) of a loaded channel-first scan ``(1, *spatial)``; ``ValueError`` starting with
    ``source`` when it has no voxels, more than one channel, a rank other than 2 or 3 (or 2 given to a
    ``spatial_dims=3`` pipeline), or NaN / infinite voxels."""
    shape = tuple(int(s) for s in value.shape)
    stored = _original_shape(value)
    if int(np.prod(shape)) == 0:
        raise ValueError(f"{source}: empty image (shape {stored}): it has no voxels")
    rank = len(shape) - 1
    if shape[0] != 1 or rank not in (2, 3):
        what = "a 4D series (time points or channels)" if len(stored) == 4 else f"a {len(stored)}D array"
        raise ValueError(
            f"{source}: {what} of shape {stored}: one 2D or 3D scan per file expected "
            "(split it into 3D volumes first)"
        )
    if spatial_dims == 3 and rank == 2:
        raise ValueError(
            f"{source}: a 2D image of shape {stored} given to a 3D pipeline (spatial_dims=3): "
            "use spatial_dims=2 or a 3D volume"
        )
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise ValueError(
                f"{source}: {n_nan} NaN and {n_inf} infinite voxels of {tensor.numel()}: "
                "every voxel must be a finite value"
            )
    return rank


class CheckScand(MapTransform):
    """Check every loaded key of a sample with :func:`check_loaded_scan` and that all have one spatial rank.

    Args:
        keys: the loaded image / label keys (channel-first MetaTensors ``(1, *spatial)``).
        spatial_dims: 2 or 3, the pipeline's; a 2D image is refused by a 3D pipeline.
        allow_missing_keys: skip keys absent from a sample.

    Returns the sample unchanged; raises ``ValueError`` naming the file (and key) on the first problem.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        d = dict(data)
        ranks: dict[Hashable, int] = {}
        for key in self.key_iterator(d):
            ranks[key] = check_loaded_scan(
                d[key], spatial_dims=self.spatial_dims, source=_source(d[key], key)
            )
        if len(set(ranks.values())) > 1:
            parts = [f"{_source(d[k], k)} is {r}D {_original_shape(d[k])}" for k, r in ranks.items()]
            raise ValueError(
                f"the scans of one case must have the same rank (all 2D or all 3D): {'; '.join(parts)}"
            )
        return d
