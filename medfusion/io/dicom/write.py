"""Writing a volume back as a single-frame DICOM series (CT or MR Image Storage), e.g. to return standardized
scans to a PACS.

The geometry follows DICOM PS3.3 C.7.6.2.1.1: the columns of the (RAS+ -> LPS+) affine give
ImageOrientationPatient, PixelSpacing and one ImagePositionPatient per slice. A derived series keeps the
patient, study and frame-of-reference identity of the series it came from (PS3.3 C.7.6.1.1.2 ImageType
DERIVED\\SECONDARY, ReferencedSeriesSequence) and gets new Series / SOP Instance UIDs. Pixels are stored as
int16 with RescaleSlope / RescaleIntercept; the folder is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medfusion.io.atomic import atomic_dir
from medfusion.io.dicom.discovery import DicomSeries
from medfusion.io.dicom.geometry import SeriesGeometry, series_geometry
from medfusion.io.dicom.read import _resolve
from medfusion.io.volume import LPS_TO_RAS, voxel_spacing

# Tags copied from a reference series into a derived one (patient, study, frame of reference, equipment).
REFERENCE_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientPosition",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "BodyPartExamined",
)
WRITABLE_MODALITIES = ("CT", "MR")


def _ds(value: float) -> Any:
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def rescale_for(array: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` so that ``array`` fits int16 storage: lossless for integer values spanning at
    most 65536 levels (slope 1), else a linear map of ``[min, max]`` onto the full int16 range."""
    finite = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(finite)):
        raise ValueError("array contains NaN or infinite values; DICOM cannot store them")
    vmin, vmax = float(finite.min()), float(finite.max())
    if np.array_equal(finite, np.rint(finite)) and vmax - vmin <= 65535:
        if vmin >= -32768 and vmax <= 32767:
            return 1.0, 0.0
        return 1.0, vmin + 32768.0
    slope = (vmax - vmin) / 65535.0 if vmax > vmin else 1.0
    slope = float(_ds(slope))
    return slope, float(_ds(vmin + 32768.0 * slope))


def _reference_header(reference: Any) -> tuple[Any, SeriesGeometry]:
    import pydicom

    frames, _, label = _resolve(reference)
    geometry = series_geometry(frames, label)
    ds = pydicom.dcmread(geometry.frames[0].path, stop_before_pixels=True)
    return ds, geometry


class _Plane(NamedTuple):
    """The DICOM geometry of an affine: LPS affine, unit row / column directions, slice normal, in-plane
    spacing along ``i`` (columns) and ``j`` (rows) in mm."""

    lps: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    spacing_i: float
    spacing_j: float


def _plane(affine: np.ndarray) -> _Plane:
    """LPS columns of the affine -> ImageOrientationPatient directions, PixelSpacing, slice normal."""
    lps = LPS_TO_RAS @ affine
    col_i, col_j = lps[:3, 0], lps[:3, 1]
    sp_i, sp_j = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    if min(sp_i, sp_j) <= 0:
        raise ValueError("affine has a zero-length in-plane axis")
    row_dir, col_dir = col_i / sp_i, col_j / sp_j
    if abs(float(np.dot(row_dir, col_dir))) > 1e-4:
        raise ValueError("in-plane axes of the affine are not orthogonal; DICOM cannot store that")
    return _Plane(lps, row_dir, col_dir, np.cross(row_dir, col_dir), sp_i, sp_j)


def _check_meta_keys(meta: dict) -> None:
    from pydicom.datadict import tag_for_keyword

    unknown = sorted(k for k in meta if tag_for_keyword(k) is None)
    if unknown:
        raise ValueError(
            f"meta keys {unknown} are not DICOM keywords (e.g. Manufacturer, KVP, ConvolutionKernel)"
        )


def _identity_from(
    reference: Any, array: np.ndarray, affine: np.ndarray | None
) -> tuple[Any, Any, np.ndarray, list[str]]:
    """``(new dataset, reference header or None, affine, ImageType)``: the new dataset holds the patient /
    study / frame-of-reference tags of ``reference`` (:data:`REFERENCE_TAGS`); the affine is the reference
    geometry's unless given."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    if reference is None:
        if affine is None:
            raise ValueError("write_dicom_series needs `affine` when no `reference` series is given")
        return ds, None, np.asarray(affine, dtype=float), ["ORIGINAL", "PRIMARY"]
    ref_ds, geometry = _reference_header(reference)
    if affine is None:
        if tuple(geometry.shape) != tuple(array.shape):
            raise ValueError(
                f"array shape {array.shape} differs from the reference series shape {geometry.shape}; "
                "pass the affine of the array explicitly"
            )
        affine = geometry.affine
    for key in REFERENCE_TAGS:
        if key in ref_ds:
            setattr(ds, key, ref_ds[key].value)
    ref_item = Dataset()
    ref_item.SeriesInstanceUID = ref_ds.SeriesInstanceUID
    ds.ReferencedSeriesSequence = [ref_item]
    return ds, ref_ds, np.asarray(affine, dtype=float), ["DERIVED", "SECONDARY"]


def _set_series_tags(
    ds: Any,
    plane: _Plane,
    volume: np.ndarray,
    thickness: float,
    rescale: tuple[float, float],
    *,
    modality: str,
    sop_class: str,
    image_type: list[str],
    series_description: str,
    derivation_description: str,
) -> None:
    """Tags shared by every slice: image type, descriptions, orientation, spacing, pixel format, rescale."""
    from pydicom.uid import generate_uid

    ds.Modality = modality
    ds.SOPClassUID = sop_class
    ds.SeriesInstanceUID = generate_uid()
    axial = abs(float(plane.normal[2])) > 0.9
    ds.ImageType = image_type + (["AXIAL"] if axial else ["OTHER"])
    ds.SeriesDescription = series_description
    ds.DerivationDescription = derivation_description
    ds.ImageOrientationPatient = [_ds(v) for v in (*plane.row_dir, *plane.col_dir)]
    ds.PixelSpacing = [_ds(plane.spacing_j), _ds(plane.spacing_i)]
    ds.SliceThickness = _ds(float(thickness))
    ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    if modality == "CT":
        ds.RescaleType = "HU"


def _set_meta_and_defaults(ds: Any, meta: dict, ref_ds: Any) -> None:
    """The caller's ``meta`` keywords, then defaults for what neither the reference nor ``meta`` gave."""
    from pydicom.datadict import dictionary_VR
    from pydicom.uid import generate_uid

    for key, value in meta.items():
        if dictionary_VR(key) == "DS":  # DS holds at most 16 characters: format floats to fit
            value = [_ds(v) for v in value] if isinstance(value, (list, tuple)) else _ds(value)
        setattr(ds, key, value)
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()
    if not ds.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = generate_uid()
    if not ds.get("PatientID"):
        ds.PatientID = "anonymous"
    if not ds.get("PatientName"):
        ds.PatientName = str(ds.PatientID)
    if "SeriesNumber" not in meta:
        ref_number = ref_ds.get("SeriesNumber") if ref_ds is not None else None
        ds.SeriesNumber = int(ref_number) + 1000 if ref_number not in (None, "") else 1


def _write_slices(
    ds: Any, stored: np.ndarray, plane: _Plane, sop_class: str, out_dir: Path, overwrite: bool
) -> list[Path]:
    """One file per slice ``k`` (``IM00001.dcm``, ...) with its position ``origin + k * slice axis``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    written: list[Path] = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for k in range(stored.shape[2]):
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = plane.lps[:3, 3] + k * plane.lps[:3, 2]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(np.dot(position, plane.normal)))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            file_meta = FileMetaDataset()
            file_meta.MediaStorageSOPClassUID = sop_class
            file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = file_meta
            name = f"IM{k + 1:05d}.dcm"
            pydicom.dcmwrite(tmp / name, ds, enforce_file_format=True)
            written.append(out_dir / name)
    return written


def write_dicom_series(
    array: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    reference: DicomSeries | str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    affine: np.ndarray | None = None,
    series_description: str,
    derivation_description: str,
    meta: dict | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``array`` as a single-frame DICOM series (one file per slice) into ``out_dir`` atomically.

    Args:
        array: ``(I, J, K)`` or ``(I, J)`` values in :class:`Volume` order (HU for CT).
        out_dir: folder to create (``FileExistsError`` if it exists and not ``overwrite``).
        reference: the series the volume was derived from. Its geometry (unless ``affine`` is given) and
            patient / study / frame-of-reference tags are copied; ImageType becomes DERIVED\\SECONDARY.
        affine: ``(4, 4)`` voxel -> RAS+ mm; required without ``reference``.
        series_description, derivation_description: what made this series (SeriesDescription,
            DerivationDescription).
        meta: further DICOM keywords to set (``Manufacturer``, ``ConvolutionKernel``, ``KVP``, ``Exposure``,
            ``SliceThickness``, ``PatientID``, ``StudyInstanceUID``, ``SeriesNumber``, ...); unknown keywords
            raise ``ValueError``. ``Modality`` must be one of :data:`WRITABLE_MODALITIES` (default CT).

    Pixels are stored as int16 with RescaleSlope / RescaleIntercept from :func:`rescale_for`. New
    SeriesInstanceUID and SOPInstanceUIDs are generated. Returns the written files in slice order.
    """
    from pydicom.uid import CTImageStorage, MRImageStorage

    # 1. check the inputs; patient / study identity and geometry from the reference series
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"array must be (I, J) or (I, J, K), got shape {array.shape}")
    volume = array[:, :, None] if array.ndim == 2 else array
    meta = dict(meta or {})
    _check_meta_keys(meta)
    ds, ref_ds, affine, image_type = _identity_from(reference, array, affine)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    modality = str(meta.get("Modality", ds.get("Modality", "CT")))
    if modality not in WRITABLE_MODALITIES:
        raise ValueError(f"cannot write Modality {modality!r}; valid: {', '.join(WRITABLE_MODALITIES)}")

    # 2. geometry (orientation, spacing, thickness) and int16 storage
    plane = _plane(affine)
    thickness = meta.pop("SliceThickness", None) or voxel_spacing(affine)[2]
    slope, intercept = rescale_for(volume)
    stored = np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)

    # 3. series tags, then one file per slice
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    _set_series_tags(
        ds,
        plane,
        volume,
        thickness,
        (slope, intercept),
        modality=modality,
        sop_class=sop_class,
        image_type=image_type,
        series_description=series_description,
        derivation_description=derivation_description,
    )
    _set_meta_and_defaults(ds, meta, ref_ds)
    return _write_slices(ds, stored, plane, sop_class, Path(out_dir), overwrite)
