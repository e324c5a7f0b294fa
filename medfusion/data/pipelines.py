"""MONAI dictionary-transform pipelines for 2D and 3D CT/MR data.

``build_transforms`` returns two ``Compose`` objects: the *deterministic* part (load, channel-first,
orientation, spacing, HU window, foreground crop), which a ``CacheDataset``/``PersistentDataset`` caches, and the
part that runs after the cache (random crops / 2D slice sampling for training; centre slice / centre crop for
evaluation). Every key of a sample (e.g. ``source`` and ``target``, ``image`` and ``label``) goes through the
same spatial transforms with the same random draws, so paired images stay voxel-aligned.

Intensity convention: image keys are windowed to ``hu_window`` (HU for CT) and scaled linearly to
**[-1, 1]** (values outside the window are clipped); ``hu_to_unit`` / ``unit_to_hu`` convert either way. Label
keys keep their integer values (float dtype, nearest-neighbour resampling, padded with 0).

Shapes: a sample's image is ``(1, *spatial)`` with ``len(spatial) == spatial_dims``. With ``spatial_dims=2`` and
3D volumes ``(H, W, D)``, slices are sampled along ``slice_axis`` (default 2, the axial axis after RAS
orientation); 2D NIfTIs ``(H, W)`` are used as they are.

Loading: NIfTI through MONAI's ``NibabelReader``; DICOM series folders through ``medfusion.io.dicom.read_series``
when it is available (sorting by position, rescale, checks), otherwise MONAI's ``PydicomReader``.
Every loaded scan is checked first (:class:`medfusion.data.checks.CheckScand`: one 2D or 3D scan per file, finite
voxels, one rank per case); a bad one raises ``ValueError`` naming its file.

Displacement fields (``DEFAULT_FIELD_KEYS``: ``ddf``, a ``register`` manifest's known field; NIfTI vector images
of :func:`medfusion.io.displacement.write_voxel_field`) load as ``(D, *spatial)`` in voxels, channel ``d`` along
array axis ``d`` (pull), go through the same spatial transforms as the images (bilinear, padded with 0, no intensity
window) and are re-expressed on the resulting grid by :class:`VoxelFieldToGridd`, so that warping the loaded moving
image with the loaded field gives the loaded fixed image.

Hand-written parts and why: the DICOM ``ImageReader`` adapter (MONAI does not know our reader), and
``SpatialRankSwitchd`` / ``RandSpatialRankSwitchd``, tiny dispatchers choosing a sub-pipeline (orientation codes,
crops/slicing) by the rank of the loaded data
(a pipeline is built before the data is seen, and one 2D pipeline must accept both 2D slices and 3D volumes).
All actual image operations are MONAI transforms.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    Randomizable,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.utils import ensure_tuple
from monai.utils.misc import MAX_SEED

from medfusion import keys as K
from medfusion.data.checks import CheckScand

#: keys treated as label maps by default (nearest-neighbour, no intensity window)
DEFAULT_LABEL_KEYS: tuple[str, ...] = (K.LABEL, K.MOVING_LABEL, K.FIXED_LABEL, K.MASK)
#: keys treated as voxel displacement fields (``medfusion.io.displacement``): bilinear, padded with 0, no window
DEFAULT_FIELD_KEYS: tuple[str, ...] = (K.DDF,)
#: largest out-of-plane displacement (voxels) of a 3D field that may be cut into 2D slices
FIELD_SLICE_TOLERANCE = 1e-3
#: margin above the window's lower edge that counts as foreground (in the [-1, 1] scale)
FOREGROUND_EPS = 1e-3


class Transforms(NamedTuple):
    """The two halves of a pipeline: ``deterministic`` (cacheable) then ``random`` (run every time)."""

    deterministic: Compose
    random: Compose


def hu_to_unit(x: Any, window: Sequence[float] = (-1000.0, 1000.0), clip: bool = True) -> Any:
    """Map intensities in ``window = (low, high)`` (HU for CT) linearly to [-1, 1]: ``2 (x - low)/(high - low) - 1``.

    Works on numpy arrays and torch tensors; with ``clip`` values outside the window saturate at -1 / 1
    (the same as the pipelines' ``ScaleIntensityRanged(clip=True)``).
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {tuple(window)}")
    y = (x - low) * (2.0 / (high - low)) - 1.0
    return y.clip(-1.0, 1.0) if clip else y


def unit_to_hu(x: Any, window: Sequence[float] = (-1000.0, 1000.0)) -> Any:
    """Inverse of :func:`hu_to_unit` (without clipping): ``low + (x + 1)(high - low)/2``."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"window must be (low, high) with high > low, got {tuple(window)}")
    return (x + 1.0) * ((high - low) / 2.0) + low


def is_foreground(x: Any) -> Any:
    """Foreground for ``CropForegroundd``: above the lower window edge (-1) of an image scaled to [-1, 1]."""
    return x > -1.0 + FOREGROUND_EPS


class MedfusionDicomReader(ImageReader):
    """MONAI ``ImageReader`` adapter for ``medfusion.io.dicom.read_series`` (a DICOM series folder or file).

    ``read_series`` returns ``Volume(array, affine, meta)`` with ``array[i, j, k]`` in NIfTI voxel order and a
    RAS+ affine, which is exactly what MONAI's readers hand to ``LoadImage``.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and (
            os.path.isdir(names[0]) or str(names[0]).lower().endswith((".dcm", ".dicom", ".ima"))
        )

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> list[Any]:
        from medfusion.io.dicom import read_series

        return [read_series(path) for path in ensure_tuple(data)]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        volume = ensure_tuple(img)[0]
        array = np.asarray(volume.array, dtype=np.float32)
        affine = np.asarray(volume.affine, dtype=np.float64)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape),
            "original_channel_dim": float("nan"),
            "space": "RAS",
        }
        return array, meta


class VoxelFieldReader(ImageReader):
    """MONAI ``ImageReader`` for voxel displacement fields (:func:`medfusion.io.displacement.read_voxel_field`):
    hands ``LoadImage`` the field channel-last ``(*spatial, D)`` with its RAS+ affine."""

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        names = ensure_tuple(filename)
        return len(names) == 1 and str(names[0]).lower().endswith((".nii", ".nii.gz"))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> list[Any]:
        from medfusion.io.displacement import read_voxel_field

        return [read_voxel_field(path) for path in ensure_tuple(data)]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        field = ensure_tuple(img)[0]
        meta = {
            "affine": field.affine.copy(),
            "original_affine": field.affine.copy(),
            "spatial_shape": np.asarray(field.ddf.shape[1:]),
            "original_channel_dim": -1,
            "space": "RAS",
        }
        return np.moveaxis(field.ddf, 0, -1), meta


class VoxelFieldToGridd(MapTransform):
    """Re-express voxel displacement fields ``(D, *spatial)`` on the grid the spatial transforms made.

    A displacement is a physical vector ``p = L u`` (``L``: the linear part of the voxel-to-world affine), so when
    ``Orientationd`` / ``Spacingd`` change ``L0`` (at load, ``original_affine``) to ``L1``, the components become
    ``u1 = L1^+ L0 u0`` (:func:`medfusion.fields.world.voxel_map`; crops and pads leave ``L`` as it is). With
    ``spatial_dims=2`` a 3D field loses its component along ``slice_axis`` (the slices are cut there); it must be
    zero (up to ``FIELD_SLICE_TOLERANCE``), else a 2D slice of the pair is not a 2D registration pair and
    ``ValueError`` says so.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, slice_axis: int) -> None:
        MapTransform.__init__(self, keys)
        self.spatial_dims, self.slice_axis = spatial_dims, slice_axis

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        import torch

        from medfusion.fields.world import voxel_map

        d = dict(data)
        for key in self.key_iterator(d):
            field = d[key]
            nd = int(field.shape[0])
            if field.ndim - 1 != nd:
                raise ValueError(f"{key}: a field of {nd} components on a {field.ndim - 1}D grid")
            # the vectors' linear map from the load-time grid to this one (fields.world: L1^+ L0)
            m = voxel_map(torch.as_tensor(np.asarray(field.meta["original_affine"])), field.affine, nd).matrix
            m = m.to(torch.float32)
            u = torch.einsum("ij,j...->i...", m, field.as_tensor().float())
            if nd == 3 and self.spatial_dims == 2:
                out_of_plane = float(u[self.slice_axis].abs().max())
                if out_of_plane > FIELD_SLICE_TOLERANCE:
                    raise ValueError(
                        f"{key}: a 3D field cannot be cut into 2D slices along axis {self.slice_axis}: its component "
                        f"along that axis reaches {out_of_plane:.3g} voxels (use spatial_dims=3, or 2D pairs)"
                    )
                u = u[[a for a in range(3) if a != self.slice_axis]]
            d[key] = MetaTensor(u, meta=dict(field.meta), applied_operations=list(field.applied_operations))
        return d


class SpacingEachd(MapTransform):
    """MONAI's ``Spacingd`` applied key by key, each on a dict that holds that key alone.

    ``Spacingd`` (MONAI 1.x) also treats every entry named ``<key>_...`` as that key's meta dict and calls
    ``.update`` on it, which fails for ``moving`` / ``moving_label``, ``fixed`` / ``fixed_label`` and ``ddf`` /
    ``ddf_itk`` (a register manifest). Keys on the same grid still get the same output grid.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], mode: Sequence[str]) -> None:
        MapTransform.__init__(self, keys)
        self.spacing = {k: Spacingd(k, pixdim=pixdim, mode=m) for k, m in zip(self.keys, mode)}

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.spacing[key]({key: d[key]})[key]
        return d


def _dicom_reader_available() -> bool:
    try:
        from medfusion.io import dicom
    except ImportError:
        return False
    return hasattr(dicom, "read_series")


class SpatialRankSwitchd(MapTransform):
    """Run the sub-pipeline registered for the spatial rank of the data (``ndim - 1``; all keys must agree)."""

    def __init__(self, keys: KeysCollection, pipelines: Mapping[int, Compose]) -> None:
        MapTransform.__init__(self, keys)
        self.pipelines = dict(pipelines)

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        d = dict(data)
        ranks = {int(d[k].ndim) - 1 for k in self.key_iterator(d)}
        if len(ranks) != 1:
            shapes = {str(k): tuple(d[k].shape) for k in self.key_iterator(d)}
            raise ValueError(f"paired keys have different spatial ranks: {shapes}")
        rank = ranks.pop()
        if rank not in self.pipelines:
            raise ValueError(
                f"data of spatial rank {rank} (shape {tuple(d[self.keys[0]].shape)}) is not supported here; "
                f"supported ranks: {sorted(self.pipelines)}"
            )
        return self.pipelines[rank](d)


class RandSpatialRankSwitchd(Randomizable, SpatialRankSwitchd):
    """:class:`SpatialRankSwitchd` over random sub-pipelines.

    Randomness lives in the sub-pipelines; ``set_random_state`` reseeds them from this transform's ``self.R``, so
    MONAI's ``set_rnd`` / ``worker_init_fn`` reach them, and ``CacheDataset`` stops caching here.
    """

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSpatialRankSwitchd:
        super().set_random_state(seed=seed, state=state)
        for rank in sorted(self.pipelines):
            self.pipelines[rank].set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:  # the sub-pipelines draw their own parameters
        pass


def _roi(
    rank: int, spatial_dims: int, roi_size: Sequence[int] | None, slice_axis: int
) -> tuple[list[int], bool]:
    """Crop size for data of spatial rank ``rank`` and whether a slice axis is squeezed (2D from 3D)."""
    roi = [int(r) for r in roi_size] if roi_size is not None else [-1] * spatial_dims
    squeeze = rank == 3 and spatial_dims == 2
    if squeeze:
        roi.insert(slice_axis, 1)  # a slab of one slice, squeezed away after the crop
    return roi, squeeze


def _padding(rank: int, *, image_keys: list[str], label_keys: list[str], roi: list[int]) -> Compose:
    """Pad images with -1 (below the window: air) and labels with 0 up to the crop size."""
    pad = [r if r > 0 else -1 for r in roi]
    ts: list = [SpatialPadd(image_keys, spatial_size=pad, value=-1.0)] if image_keys else []
    if label_keys:
        ts.append(SpatialPadd(label_keys, spatial_size=pad, value=0.0))
    return Compose(ts)


def _sampling(
    rank: int,
    *,
    keys: list[str],
    image_keys: list[str],
    label_keys: list[str],
    spatial_dims: int,
    roi_size: Sequence[int] | None,
    num_samples: int,
    train: bool,
    slice_axis: int,
    index_keys: tuple[str, str] | None,
) -> Compose:
    """Crop and (2D from 3D) slice data of spatial rank ``rank``; ``index_keys``: cached fg/bg label indices."""
    roi, squeeze = _roi(rank, spatial_dims, roi_size, slice_axis)
    crops = roi_size is not None or squeeze
    ts: list = []
    if train:
        if label_keys and crops:
            ts.append(
                RandCropByPosNegLabeld(
                    keys,
                    label_key=label_keys[0],
                    spatial_size=roi,
                    pos=1.0,
                    neg=1.0,
                    num_samples=num_samples,
                    image_key=image_keys[0] if image_keys else None,
                    image_threshold=-1.0 + FOREGROUND_EPS,
                    fg_indices_key=index_keys[0] if index_keys else None,
                    bg_indices_key=index_keys[1] if index_keys else None,
                    allow_smaller=True,
                )
            )
        elif crops or num_samples > 1:
            ts.append(RandSpatialCropSamplesd(keys, roi_size=roi, num_samples=num_samples, random_size=False))
    elif crops:
        ts.append(CenterSpatialCropd(keys, roi_size=roi))
    if squeeze:
        ts.append(SqueezeDimd(keys, dim=slice_axis + 1))
    if index_keys:
        ts.append(DeleteItemsd(list(index_keys)))  # flat indices of the whole volume: not part of a sample
    return Compose(ts)


def _check_keys(
    keys: Sequence[str],
    *,
    spatial_dims: int,
    hu_window: Sequence[float],
    pixdim: Sequence[float] | None,
    roi_size: Sequence[int] | None,
    num_samples: int,
    image_keys: Sequence[str] | None,
    label_keys: Sequence[str] | None,
    slice_axis: int,
    crop_foreground: bool,
) -> tuple[list[str], list[str], list[str]]:
    """Validate :func:`build_transforms`' options; return ``(keys, image keys, label keys)`` as strings."""
    keys = [str(k) for k in keys]
    if not keys:
        raise ValueError("keys must name at least one key to load")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
        raise ValueError(f"hu_window must be (low, high) with high > low, got {tuple(hu_window)}")
    if roi_size is not None and (
        len(roi_size) != spatial_dims or any(int(r) == 0 or int(r) < -1 for r in roi_size)
    ):
        raise ValueError(
            f"roi_size must have {spatial_dims} positive values (or -1 for a whole axis), got {tuple(roi_size)}"
        )
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    if pixdim is not None and any(float(p) <= 0 for p in ensure_tuple(pixdim)):
        raise ValueError(f"pixdim must be positive spacings in mm, got {pixdim!r}")
    if label_keys is None:
        label_keys = [k for k in keys if k in DEFAULT_LABEL_KEYS]
    if image_keys is None:
        image_keys = [k for k in keys if k not in label_keys and k not in DEFAULT_FIELD_KEYS]
    image_keys, label_keys = [str(k) for k in image_keys], [str(k) for k in label_keys]
    unknown = sorted(set(image_keys + label_keys) - set(keys))
    if unknown or set(image_keys) & set(label_keys):
        raise ValueError(
            f"image_keys {image_keys} and label_keys {label_keys} must be disjoint subsets of keys {keys}"
        )
    if crop_foreground and not image_keys:
        raise ValueError(
            "crop_foreground needs an image key to find the foreground; pass crop_foreground=False"
        )
    return keys, image_keys, label_keys


def _load_and_normalise(
    keys: list[str],
    *,
    image_keys: list[str],
    label_keys: list[str],
    hu_window: Sequence[float],
    pixdim: Sequence[float] | None,
    orientation: str,
    crop_foreground: bool,
    field_keys: Sequence[str] = (),
    spatial_dims: int = 3,
    slice_axis: int = 2,
) -> list:
    """Load, orient, resample, window to [-1, 1] and crop to the foreground (the first, cacheable steps)."""
    volumes = [k for k in keys if k not in field_keys]
    load = LoadImaged(volumes, image_only=True, ensure_channel_first=True)
    if _dicom_reader_available():  # tried first for folders / .dcm; NIfTI falls through to nibabel
        load.register(MedfusionDicomReader())
    det: list = [load, CheckScand(volumes, spatial_dims=spatial_dims)]  # one line naming a bad file
    if field_keys:
        det.append(
            LoadImaged(
                list(field_keys), reader=VoxelFieldReader(), image_only=True, ensure_channel_first=True
            )
        )
    # orientation codes per rank (2D NIfTIs take the first two letters: MONAI would warn on every load)
    orient = {r: Compose([Orientationd(keys, axcodes=orientation[:r])]) for r in (2, 3)}
    det.append(SpatialRankSwitchd(keys, orient))
    if pixdim is not None:
        modes = ["nearest" if k in label_keys else "bilinear" for k in keys]
        det.append(SpacingEachd(keys, pixdim=tuple(float(p) for p in ensure_tuple(pixdim)), mode=modes))
    if field_keys:
        det.append(VoxelFieldToGridd(list(field_keys), spatial_dims=spatial_dims, slice_axis=slice_axis))
    if image_keys:
        low, high = float(hu_window[0]), float(hu_window[1])
        det.append(ScaleIntensityRanged(image_keys, a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True))
    if crop_foreground:
        det.append(
            CropForegroundd(
                keys,
                source_key=image_keys[0],
                select_fn=is_foreground,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    return det


def _pad_and_index(
    keys: list[str],
    *,
    image_keys: list[str],
    label_keys: list[str],
    spatial_dims: int,
    roi_size: Sequence[int] | None,
    train: bool,
    slice_axis: int,
    field_keys: Sequence[str] = (),
) -> tuple[list, tuple[str, str] | None]:
    """Padding up to the crop size and, for label-aware crops, the cached fg/bg voxel indices (their keys)."""
    ranks = (2, 3) if spatial_dims == 2 else (3,)
    det: list = []
    if roi_size is not None:
        pads = {
            r: _padding(
                r,
                image_keys=image_keys,
                label_keys=label_keys + list(field_keys),  # fields pad with 0 (no displacement), as labels
                roi=_roi(r, spatial_dims, roi_size, slice_axis)[0],
            )
            for r in ranks
        }
        det.append(SpatialRankSwitchd(keys, pads))
    index_keys = None
    if train and label_keys and (roi_size is not None or spatial_dims == 2):
        # label-aware crops need the foreground / background voxel indices: computed once, in the cached part
        index_keys = (f"{label_keys[0]}_fg_indices", f"{label_keys[0]}_bg_indices")
        det.append(
            FgBgToIndicesd(
                label_keys[0],
                image_key=image_keys[0] if image_keys else None,
                image_threshold=-1.0 + FOREGROUND_EPS,
            )
        )
    return det, index_keys


def build_transforms(
    keys: Sequence[str],
    *,
    spatial_dims: int,
    hu_window: Sequence[float] = (-1000.0, 1000.0),
    pixdim: Sequence[float] | None = None,
    orientation: str = "RAS",
    roi_size: Sequence[int] | None = None,
    num_samples: int = 1,
    image_keys: Sequence[str] | None = None,
    label_keys: Sequence[str] | None = None,
    train: bool = True,
    slice_axis: int = 2,
    crop_foreground: bool = True,
) -> Transforms:
    """Build the 2D or 3D dictionary pipeline for the given batch ``keys``.

    Args:
        keys: keys to load (paths in the manifest entries), e.g. ``("source", "target")``.
        spatial_dims: 2 or 3: the spatial rank of the samples produced.
        hu_window: (low, high) intensity window mapped to [-1, 1] (HU for CT).
        pixdim: target voxel spacing in mm (per spatial axis) or None to keep the native spacing.
        orientation: axis codes for ``Orientationd`` (e.g. ``"RAS"``).
        roi_size: training crop size in voxels (``spatial_dims`` values; -1 keeps that axis whole) or None for
            no crop. Training: random crops (label-aware ``RandCropByPosNegLabeld`` when there is a label key);
            evaluation: centre crop. Images smaller than ``roi_size`` are padded (images with -1, labels with 0).
        num_samples: random crops / slices drawn per loaded case (training only).
        image_keys / label_keys: which keys are images (bilinear, HU window) and which are label maps (nearest,
            raw values); default: ``DEFAULT_LABEL_KEYS`` are labels, ``DEFAULT_FIELD_KEYS`` displacement fields
            (:class:`VoxelFieldToGridd`), the others images.
        train: random sampling (True) or deterministic centre slice / crop (False).
        slice_axis: for ``spatial_dims=2`` on 3D volumes, the spatial axis (0, 1, 2) that slices are taken along.
        crop_foreground: crop every key to the bounding box of the first image key's foreground (> window low).

    Returns:
        ``Transforms(deterministic, random)``: apply ``deterministic`` then ``random``; each sample is a dict with
        ``(1, *spatial)`` MetaTensors (a list of ``num_samples`` dicts when training).
    """
    keys, image_keys, label_keys = _check_keys(
        keys,
        spatial_dims=spatial_dims,
        hu_window=hu_window,
        pixdim=pixdim,
        roi_size=roi_size,
        num_samples=num_samples,
        image_keys=image_keys,
        label_keys=label_keys,
        slice_axis=slice_axis,
        crop_foreground=crop_foreground,
    )
    field_keys = [k for k in keys if k in DEFAULT_FIELD_KEYS and k not in image_keys + label_keys]
    # 1. deterministic (cached): load, orient, resample, window, foreground crop, padding, label indices
    det = _load_and_normalise(
        keys,
        image_keys=image_keys,
        label_keys=label_keys,
        hu_window=hu_window,
        pixdim=pixdim,
        orientation=orientation,
        crop_foreground=crop_foreground,
        field_keys=field_keys,
        spatial_dims=spatial_dims,
        slice_axis=slice_axis,
    )
    tail, index_keys = _pad_and_index(
        keys,
        image_keys=image_keys,
        label_keys=label_keys,
        spatial_dims=spatial_dims,
        roi_size=roi_size,
        train=train,
        slice_axis=slice_axis,
        field_keys=field_keys,
    )
    # 2. random (every epoch): crops / 2D slices by the spatial rank of the loaded data
    ranks = (2, 3) if spatial_dims == 2 else (3,)
    switch = RandSpatialRankSwitchd(
        keys,
        {
            rank: _sampling(
                rank,
                keys=keys,
                image_keys=image_keys,
                label_keys=label_keys,
                spatial_dims=spatial_dims,
                roi_size=roi_size,
                num_samples=int(num_samples),
                train=train,
                slice_axis=slice_axis,
                index_keys=index_keys,
            )
            for rank in ranks
        },
    )
    return Transforms(deterministic=Compose(det + tail), random=Compose([switch]))
