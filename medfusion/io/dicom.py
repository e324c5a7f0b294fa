"""DICOM series discovery, geometry checks, reading to a :class:`Volume`, and writing a series back.

pydicom parses the files and decodes the pixels (its pixel-data plugins cover JPEG lossless, JPEG-LS,
JPEG 2000 and RLE). What no well-kept library does in one place, and is therefore written here:

* **grouping** a folder tree into acquisition series (SeriesInstanceUID, then split where orientation,
  image size, pixel spacing, echo or a repeated acquisition is mixed) with a reason for every split and
  every skipped object (SimpleITK's ``GetGDCMSeriesIDs`` silently merges or drops; MONAI reads one folder);
* **geometry checks** that raise instead of guessing: missing slices, duplicate positions, varying spacing,
  gantry tilt, mixed orientation or size, non-image objects (SEG, SR, RTSTRUCT) — dcm2niix does most of this
  but is a binary that writes files; here the result is an in-memory array + affine;
* **writing** a derived series that keeps the reference geometry and patient/study identity (for returning
  standardized scans to a PACS).

Geometry (DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation"): the centre of pixel
(row r, column c) of a slice is ``IPP + c * dc * X + r * dr * Y`` with ``X, Y`` the two unit vectors of
ImageOrientationPatient (along a row, along a column) and ``PixelSpacing = (dr, dc)``, in LPS+ mm. Slices are
sorted by ``IPP . (X x Y)`` — never by file name, InstanceNumber or SliceLocation. The :class:`Volume` has
``array[i, j, k]`` = column ``i``, row ``j``, slice ``k`` and a RAS+ affine (``diag(-1, -1, 1, 1) @ LPS``).

4D series (dynamic / perfusion CT, fMRI-like MR: the same positions repeated over time) are read as
``array[i, j, k, t]`` with the 3D affine of every time point, ordered by TemporalPositionIdentifier, else
AcquisitionNumber, else TriggerTime / ContentTime / AcquisitionTime (:func:`series_geometry`). A partial last
time point (a scan stopped early, dcm2niix#357/#742) is dropped and reported, never written with t and z
mixed up (dcm2niix#515); a partial earlier one is refused.

Gantry tilt (slices shifted in-plane from one to the next, a sheared grid) is **refused** with a clear error,
not resampled: the NIfTI qform cannot store a sheared grid and resampling changes the voxel values; convert
tilted CT with dcm2niix (``-y``) or resample explicitly before using medfusion.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.io.atomic import atomic_dir
from medfusion.io.volume import LPS_TO_RAS, Volume, voxel_spacing

# Keys of the JSON sidecar written next to every converted NIfTI (None when absent).
SIDECAR_KEYS: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "KVP",
    "Exposure",
    "XRayTubeCurrent",
    "SliceThickness",
    "PixelSpacing",
    "SeriesDescription",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Modality",
    "SeriesNumber",
    "ImageType",
    "source_files",
)
# Further header fields kept in ``meta`` (naming of outputs, traceability).
EXTRA_KEYS: tuple[str, ...] = (
    "StudyDate",
    "StudyDescription",
    "StudyID",
    "FrameOfReferenceUID",
    "BodyPartExamined",
    "ProtocolName",
    "AcquisitionNumber",
    "DerivationDescription",
)
# Modalities whose objects are not images even when they carry pixel data.
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "REG", "DOC", "FID", "RWV", "PLAN"}
)
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

_ORIENT_TOL = 1e-3  # direction-cosine difference treated as "same orientation"
_SPACING_TOL = 1e-3  # mm, pixel spacing difference treated as "same spacing"
_DUP_TOL = 1e-2  # mm along the normal: positions closer than this are duplicates
_SAME_POS_TOL = 5e-2  # mm along the normal: frames this close are "the same slice" of different time points
# Header fields that order the time points of a 4D series, in order of preference, and whether a value is a
# discrete label (time point = value) or a clock (time point = rank at each position).
TIME_KEYS: tuple[tuple[str, str, bool], ...] = (
    ("TemporalPositionIdentifier", "temporal_index", True),
    ("AcquisitionNumber", "acquisition_number", True),
    ("TriggerTime", "trigger_time", False),
    ("ContentTime", "content_time", False),
    ("AcquisitionTime", "acquisition_time", False),
)


class DicomSeriesError(ValueError):
    """A DICOM series cannot be read as one regular volume; the message names the series and files."""


@dataclass(frozen=True)
class FrameInfo:
    """Header facts about one 2D frame (a single-frame file, or one frame of a multi-frame file)."""

    path: Path
    frame: int | None  # index into a multi-frame file's pixel data, None for single-frame files
    rows: int
    columns: int
    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    slice_thickness: float | None
    slope: float
    intercept: float
    acquisition_number: int | None
    echo_number: int | None
    temporal_index: int | None
    instance_number: int | None
    trigger_time: float | None = None  # TriggerTime (ms) / NominalCardiacTriggerDelayTime
    content_time: float | None = None  # ContentTime (s since midnight) / FrameReferenceDateTime
    acquisition_time: float | None = None  # AcquisitionTime (s since midnight) / FrameAcquisitionDateTime


@dataclass
class DicomSeries:
    """One acquisition series found by :func:`discover_series`.

    ``frames`` are in file order (not yet sorted); ``split_reason`` says why a SeriesInstanceUID was split
    into several parts (``part`` is then ``1, 2, ...``).
    """

    series_uid: str
    frames: list[FrameInfo]
    meta: dict
    split_reason: str | None = None
    part: int | None = None

    @property
    def files(self) -> list[Path]:
        return sorted({f.path for f in self.frames})

    @property
    def description(self) -> str:
        return str(self.meta.get("SeriesDescription") or "")

    @property
    def label(self) -> str:
        part = f" part {self.part}" if self.part is not None else ""
        return f"series {self.series_uid}{part} ({self.description or 'no description'})"


@dataclass(frozen=True)
class SkippedItem:
    """Files left out of the series list, and why."""

    paths: tuple[Path, ...]
    reason: str
    series_uid: str | None = None
    description: str | None = None


@dataclass
class DiscoveryResult:
    """Return of :func:`discover_series`: the image series and everything skipped (with reasons)."""

    series: list[DicomSeries] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesGeometry:
    """Sorted frames and the voxel -> RAS+ affine of a series (from headers only).

    ``shape`` is ``(I, J[, K])`` for one time point, ``(I, J, K, T)`` for a 4D series; ``frames`` are then
    time-major (``frames[t * K + k]`` is slice ``k`` of time point ``t``) and the affine is the 3D one of
    every time point. ``time_key`` names the header field that ordered the time points (None for 3D),
    ``time_values`` its value per kept time point, ``incomplete`` describes a dropped partial last volume.
    ``time_step`` is the median interval between time points in seconds (NIfTI ``pixdim[4]``), from the first
    clock field (TriggerTime, ContentTime, AcquisitionTime) present on every frame; None for 3D or when no
    clock field says it.
    """

    frames: list[FrameInfo]
    affine: np.ndarray
    shape: tuple[int, ...]
    warnings: tuple[str, ...]
    time_key: str | None = None
    time_values: tuple[float, ...] = ()
    incomplete: str | None = None
    time_step: float | None = None


# ----------------------------------------------------------------------------------------- headers


def _jsonable(value: Any) -> Any:
    """pydicom value -> JSON-friendly Python value (None for empty / binary)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName

    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (DSfloat, DSdecimal, float)):
        return float(value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return None
    if isinstance(value, (int, str)):
        return value
    return str(value)


def _find(ds: Any, keyword: str) -> Any:
    """Top-level value, else the value inside the shared / first per-frame functional groups (enhanced)."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        if not seq:
            continue
        for elem in seq[0]:
            if elem.VR == "SQ":
                for item in elem.value:
                    if keyword in item and item[keyword].value not in (None, ""):
                        return item[keyword].value
    return None


def header_meta(ds: Any) -> dict:
    """The sidecar keys (and :data:`EXTRA_KEYS`) from a dataset; ``None`` where absent."""
    meta = {key: _jsonable(_find(ds, key)) for key in SIDECAR_KEYS if key != "source_files"}
    for key in EXTRA_KEYS:
        meta[key] = _jsonable(_find(ds, key))
    if meta["ImageType"] is not None and not isinstance(meta["ImageType"], list):
        meta["ImageType"] = [meta["ImageType"]]
    return meta


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _opt_int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _tm_seconds(value: Any) -> float | None:
    """DICOM TM (``HHMMSS.FFFFFF``, legacy ``HH:MM:SS``) or the time part of a DT -> seconds since midnight."""
    if value in (None, ""):
        return None
    text = str(value).strip().replace(":", "")
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS.FFFFFF[&ZZXX]
        days = int(text[6:8])
        text = text[8:].split("+")[0].split("-")[0]
    else:
        days = 0
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return days * 86400.0 + hours * 3600.0 + minutes * 60.0 + seconds


def _opt_float(value: Any) -> float | None:
    try:
        out = None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _group_value(item: Any, shared: Any, sequence: str, keyword: str) -> Any:
    for source in (item, shared):
        if source is not None and sequence in source and source[sequence].value:
            inner = source[sequence].value[0]
            if keyword in inner and inner[keyword].value not in (None, ""):
                return inner[keyword].value
    return None


def _frames_from_header(ds: Any, path: Path) -> list[FrameInfo]:
    """Expand a header to per-frame geometry (single-frame, legacy multi-frame and enhanced objects)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if ds.get("Modality") == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        slope = float(ds.DoseGridScaling)
    acq = _opt_int(ds.get("AcquisitionNumber"))
    echo = _opt_int(ds.get("EchoNumbers"))
    inst = _opt_int(ds.get("InstanceNumber"))
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    thick = ds.get("SliceThickness")
    thick = float(thick) if thick not in (None, "") else None
    temporal = _opt_int(ds.get("TemporalPositionIdentifier"))
    trigger = _opt_float(ds.get("TriggerTime"))
    content = _tm_seconds(ds.get("ContentTime"))
    acq_time = _tm_seconds(ds.get("AcquisitionTime"))

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        frames = []
        for index, item in enumerate(per_frame):
            f_slope = _group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
            f_inter = _group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            f_thick = _group_value(item, shared, "PixelMeasuresSequence", "SliceThickness")
            frames.append(
                FrameInfo(
                    path=path,
                    frame=index,
                    rows=rows,
                    columns=cols,
                    position=_floats(
                        _group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3
                    )
                    or ipp,
                    orientation=_floats(
                        _group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                    )
                    or iop,
                    pixel_spacing=_floats(
                        _group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2
                    )
                    or spacing,
                    slice_thickness=float(f_thick) if f_thick is not None else thick,
                    slope=float(f_slope) if f_slope is not None else slope,
                    intercept=float(f_inter) if f_inter is not None else intercept,
                    acquisition_number=_opt_int(
                        _group_value(item, shared, "FrameContentSequence", "FrameAcquisitionNumber")
                    )
                    or acq,
                    echo_number=echo,
                    temporal_index=_opt_int(
                        _group_value(item, shared, "FrameContentSequence", "TemporalPositionIndex")
                    ),
                    instance_number=inst,
                    trigger_time=_opt_float(
                        _group_value(
                            item, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"
                        )
                    ),
                    content_time=_tm_seconds(
                        _group_value(item, shared, "FrameContentSequence", "FrameReferenceDateTime")
                    ),
                    acquisition_time=_tm_seconds(
                        _group_value(item, shared, "FrameContentSequence", "FrameAcquisitionDateTime")
                    ),
                )
            )
        return frames

    offsets = ds.get("GridFrameOffsetVector")
    frames = []
    for index in range(n_frames):
        position = ipp
        if n_frames > 1:
            position = None
            if offsets is not None and ipp is not None and iop is not None and len(offsets) == n_frames:
                normal = np.cross(iop[:3], iop[3:])
                position = tuple(float(v) for v in np.asarray(ipp) + float(offsets[index]) * normal)
        frames.append(
            FrameInfo(
                path=path,
                frame=index if n_frames > 1 else None,
                rows=rows,
                columns=cols,
                position=position,
                orientation=iop,
                pixel_spacing=spacing,
                slice_thickness=thick,
                slope=slope,
                intercept=intercept,
                acquisition_number=acq,
                echo_number=echo,
                temporal_index=temporal,
                instance_number=inst,
                trigger_time=trigger,
                content_time=content,
                acquisition_time=acq_time,
            )
        )
    return frames


def _read_header(path: Path) -> tuple[Any | None, str | None]:
    """``(dataset, None)`` or ``(None, reason)`` for a file that is not a readable DICOM object."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        return None, f"unreadable file: {exc}"
    if head[128:132] != b"DICM" and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None, "not DICOM (no DICM preamble, does not start with a group 0002/0008 tag)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # files written without the 128-byte preamble: accept only if they parse to a real header
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
            return None, f"not DICOM ({type(exc).__name__})"
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            return None, "not DICOM (no DICM preamble and no SOP Class / Series Instance UID)"
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt headers
        return None, f"unreadable DICOM header: {type(exc).__name__}: {exc}"
    return ds, None


def _non_image_reason(ds: Any) -> str | None:
    """Why a dataset is not an image (None if it is one)."""
    modality = str(ds.get("Modality", "") or "")
    sop = ds.get("SOPClassUID")
    if sop is None and getattr(ds, "file_meta", None) is not None:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
    if str(sop) == "1.2.840.10008.1.3.10":
        return "DICOMDIR (media directory, not an image)"
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image object (Modality {modality}, {sop_name})"
    if "Rows" not in ds or "Columns" not in ds:
        return f"non-image object (no pixel matrix; Modality {modality or '?'}, {sop_name})"
    if "SeriesInstanceUID" not in ds:
        return "image without SeriesInstanceUID"
    return None


def _image_type(ds: Any) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    return [str(v).upper() for v in (value if not isinstance(value, str) else value.split("\\"))]


# ---------------------------------------------------------------------------------------- discovery


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        # our own temporaries (atomic writes) are never inputs
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") and d.endswith(".part")))
        for name in sorted(filenames):
            if name.startswith(".") and ".part" in name:
                continue
            yield Path(dirpath) / name


def _cluster(values: Sequence[tuple[float, ...] | None], tol: float) -> list[int]:
    """Label each value by the first earlier value within ``tol`` (max abs difference)."""
    reps: list[tuple[float, ...] | None] = []
    labels = []
    for value in values:
        for index, rep in enumerate(reps):
            if (value is None and rep is None) or (
                value is not None and rep is not None and max(abs(a - b) for a, b in zip(value, rep)) <= tol
            ):
                labels.append(index)
                break
        else:
            reps.append(value)
            labels.append(len(reps) - 1)
    return labels


def _split_frames(
    frames: list[FrameInfo], merge_acquisitions: bool = False
) -> tuple[list[list[FrameInfo]], str | None]:
    """Split one SeriesInstanceUID into regular stacks; return the parts and why (None: no split).

    Repeated positions with different AcquisitionNumber are split (contrast phases, user_asks §0.1) unless
    ``merge_acquisitions`` or the frames carry several TemporalPositionIdentifiers (a declared dynamic /
    4D series, read as one 4D volume by :func:`series_geometry`).
    """
    keys = {
        "orientation": _cluster([f.orientation for f in frames], _ORIENT_TOL),
        "image size": [hash((f.rows, f.columns)) for f in frames],
        "pixel spacing": _cluster([f.pixel_spacing for f in frames], _SPACING_TOL),
        "echo": [f.echo_number if f.echo_number is not None else -1 for f in frames],
    }
    varying = [name for name, labels in keys.items() if len(set(labels)) > 1]
    groups: dict[tuple, list[FrameInfo]] = {}
    for index, frame in enumerate(frames):
        groups.setdefault(tuple(keys[name][index] for name in varying), []).append(frame)
    parts = list(groups.values())
    reasons = [f"mixed {name} ({len(set(keys[name]))} values)" for name in varying]

    # A repeated acquisition (contrast phase, repeat scan) shows up as repeated positions with different
    # AcquisitionNumber: split by it. Different numbers on distinct positions are left alone (some scanners
    # number every slice).
    final: list[list[FrameInfo]] = []
    for part in parts:
        positions = [tuple(round(v, 2) for v in f.position) for f in part if f.position is not None]
        acquisitions = {f.acquisition_number for f in part}
        temporal = {f.temporal_index for f in part}
        declared_4d = None not in temporal and len(temporal) > 1
        repeated = len(positions) != len(set(positions))
        if repeated and len(acquisitions) > 1 and not (merge_acquisitions or declared_4d):
            by_acq: dict[int | None, list[FrameInfo]] = {}
            for frame in part:
                by_acq.setdefault(frame.acquisition_number, []).append(frame)
            final.extend(by_acq[a] for a in sorted(by_acq, key=lambda a: (a is None, a or 0)))
            reason = f"repeated positions with different AcquisitionNumber ({len(by_acq)} acquisitions)"
            if reason not in reasons:
                reasons.append(reason)
        else:
            final.append(part)
    return final, ("split: " + "; ".join(reasons)) if reasons else None


def discover_series(
    root: str | os.PathLike,
    *,
    include_derived: bool = False,
    include_localizers: bool = False,
    merge_acquisitions: bool = False,
) -> DiscoveryResult:
    """Find every DICOM image series under ``root`` (any file names, nested folders).

    Files are grouped by SeriesInstanceUID, then split where orientation, image size, pixel spacing, echo
    number or a repeated acquisition (same positions, different AcquisitionNumber) is mixed; each split
    series carries ``split_reason``. Skipped, with a reason each: non-DICOM and unreadable files, non-image
    objects (SEG, SR, RTSTRUCT, ...), localizers (ImageType LOCALIZER) unless ``include_localizers``, and
    derived images (ImageType DERIVED) unless ``include_derived``. A series whose repeated positions carry
    several TemporalPositionIdentifiers is kept whole (a 4D series); ``merge_acquisitions`` also keeps
    repeated acquisitions (different AcquisitionNumber) whole, to be read as a 4D volume ordered by it.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    result = DiscoveryResult()
    by_uid: dict[str, list[tuple[Path, Any, list[FrameInfo]]]] = {}
    for path in _iter_files(root):
        ds, reason = _read_header(path)
        if ds is None:
            result.skipped.append(SkippedItem((path,), reason or "not DICOM"))
            continue
        reason = _non_image_reason(ds)
        if reason is None:
            try:
                frames = _frames_from_header(ds, path)
            except Exception as exc:  # noqa: BLE001 - malformed geometry tags
                reason = f"unreadable image header: {type(exc).__name__}: {exc}"
        if reason is not None:
            uid = str(ds.get("SeriesInstanceUID", "")) or None
            result.skipped.append(
                SkippedItem((path,), reason, uid, str(ds.get("SeriesDescription", "")) or None)
            )
            continue
        by_uid.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds, frames))

    for uid in sorted(by_uid):
        entries = by_uid[uid]
        description = str(entries[0][1].get("SeriesDescription", "") or "") or None
        kept = []
        for skip_word, include, why in (
            ("LOCALIZER", include_localizers, "localizer (ImageType LOCALIZER); pass include_localizers"),
            ("DERIVED", include_derived, "derived images (ImageType DERIVED); pass --include-derived"),
        ):
            if include:
                continue
            dropped = [e for e in entries if skip_word in _image_type(e[1])]
            if dropped:
                result.skipped.append(SkippedItem(tuple(e[0] for e in dropped), why, uid, description))
                entries = [e for e in entries if skip_word not in _image_type(e[1])]
        kept = entries
        if not kept:
            continue
        meta = header_meta(kept[0][1])
        frames = [f for _, _, fs in kept for f in fs]
        parts, reason = _split_frames(frames, merge_acquisitions)
        for index, part in enumerate(parts):
            series_meta = dict(meta)
            part_files = {f.path for f in part}
            first = next(e for e in kept if e[0] in part_files)
            series_meta.update({k: v for k, v in header_meta(first[1]).items() if v is not None})
            result.series.append(
                DicomSeries(
                    series_uid=uid,
                    frames=part,
                    meta=series_meta,
                    split_reason=reason,
                    part=index + 1 if len(parts) > 1 else None,
                )
            )
    return result


# ----------------------------------------------------------------------------------------- geometry


def _fail(label: str, problem: str, files: Iterable[Path]) -> DicomSeriesError:
    names = sorted({str(p) for p in files})
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} files)" if len(names) > 6 else "")
    return DicomSeriesError(f"{label}: {problem} [files: {shown}]")


def _position_clusters(proj: np.ndarray) -> np.ndarray:
    """Label positions along the normal: sorted neighbours closer than ``_SAME_POS_TOL`` share a label."""
    order = np.argsort(proj, kind="stable")
    labels = np.empty(len(proj), dtype=int)
    current = 0
    for rank, index in enumerate(order):
        if rank and proj[index] - proj[order[rank - 1]] >= _SAME_POS_TOL:
            current += 1
        labels[index] = current
    return labels


def _time_points(
    frames: list[FrameInfo], labels: np.ndarray, proj: np.ndarray, key: str, discrete: bool
) -> tuple[list[list[int]], list[float]] | str:
    """Frame indices per time point (time-ordered) and the time value of each, or why ``key`` cannot
    order them (missing on some frames, equal at one position, inconsistent)."""
    values = [getattr(f, key) for f in frames]
    if any(v is None for v in values):
        return "not present on every frame"
    by_position: dict[int, list[int]] = {}
    for index, lab in enumerate(labels):
        by_position.setdefault(int(lab), []).append(index)
    for members in by_position.values():
        if len({values[i] for i in members}) != len(members):
            return "equal on two frames at the same position"
    if discrete:
        groups: dict[float, list[int]] = {}
        for index, value in enumerate(values):
            groups.setdefault(value, []).append(index)
        times = sorted(groups)
        return [groups[t] for t in times], [float(t) for t in times]
    # a clock: the r-th frame (in time) at each position belongs to time point r
    ranked: dict[int, list[int]] = {}
    for members in by_position.values():
        for rank, index in enumerate(sorted(members, key=lambda i: values[i])):
            ranked.setdefault(rank, []).append(index)
    points = [ranked[r] for r in sorted(ranked)]
    for t in range(len(points) - 1):
        if max(values[i] for i in points[t]) >= min(values[i] for i in points[t + 1]):
            return f"time points {t} and {t + 1} overlap in time"
    return points, [float(min(values[i] for i in p)) for p in points]


def series_geometry(frames: Sequence[FrameInfo], label: str = "series") -> SeriesGeometry:
    """Check that ``frames`` form one regular stack (or a 4D series of them); return them sorted and the affine.

    3D: slices sorted along the normal of ImageOrientationPatient. Raises :class:`DicomSeriesError` for mixed
    image sizes / orientations / pixel spacings, missing slices (naming the missing positions along the
    normal), duplicate positions, non-uniform spacing and gantry tilt.

    4D (user_asks §0.3): when positions repeat, the frames are assigned to time points by the first field of
    :data:`TIME_KEYS` that is present on every frame and differs between the frames at each position:
    TemporalPositionIdentifier (enhanced: TemporalPositionIndex), else AcquisitionNumber (time point = value,
    ordered by value), else TriggerTime, ContentTime, AcquisitionTime (clocks: the r-th frame in time at each
    position is time point r, and time points must not overlap in time). Every time point must hold the same
    full set of positions; a **partial last** time point (a scan stopped early) is dropped with the warning
    ``"incomplete: dropped last volume with k of n slices"`` (``incomplete`` is set); a partial earlier time
    point, or repeated positions that no field tells apart, raise. Frames come back time-major, ``shape`` is
    ``(I, J, K, T)`` (``(I, J, K)`` when one complete time point is left) and the affine is the 3D one.
    """
    frames = list(frames)
    if len(frames) < 2 or any(f.position is None for f in frames) or frames[0].orientation is None:
        return _stack_geometry(frames, label)
    iop = np.asarray(frames[0].orientation, dtype=float)
    normal = np.cross(iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:]))
    proj = np.array([float(np.dot(f.position, normal)) for f in frames])
    labels = _position_clusters(proj)
    n_positions = int(labels.max()) + 1
    if n_positions == len(frames):
        return _stack_geometry(frames, label)

    reasons = []
    for name, attribute, discrete in TIME_KEYS:
        found = _time_points(frames, labels, proj, attribute, discrete)
        if isinstance(found, str):
            reasons.append(f"{name}: {found}")
            continue
        points, times = found
        counts = [len({int(labels[i]) for i in p}) for p in points]
        if any(c != len(p) for c, p in zip(counts, points)):
            reasons.append(f"{name}: a time point holds one position twice")
            continue
        short = [t for t, c in enumerate(counts) if c < n_positions]
        if short and short != [len(points) - 1]:
            centres = {int(lab): float(np.mean(proj[labels == lab])) for lab in range(n_positions)}
            details = []
            for t in short[:5]:
                present = {int(labels[i]) for i in points[t]}
                gone = ", ".join(f"{centres[lab]:.2f}" for lab in sorted(set(centres) - present)[:8])
                details.append(
                    f"time point {t} ({name} {times[t]:g}) has {counts[t]} of {n_positions} slices, "
                    f"missing {gone} mm"
                )
            reasons.append(f"{name}: " + "; ".join(details))
            continue
        break
    else:
        dup = [i for i in range(len(frames)) if np.sum(labels == labels[i]) > 1]
        raise _fail(
            label,
            f"duplicate slice positions: {len(frames) - n_positions} frame(s) repeat a position along the "
            f"normal, first at {proj[dup[0]]:.3f} mm, and no field orders them as time points of a 4D series "
            f"({'; '.join(reasons)})",
            [frames[i].path for i in dup],
        )

    notes: list[str] = []
    incomplete = None
    if short:
        incomplete = f"incomplete: dropped last volume with {counts[-1]} of {n_positions} slices"
        notes.append(incomplete)
        points, times = points[:-1], times[:-1]
    base = _stack_geometry([frames[i] for i in points[0]], label)
    position_of = {id(f): int(labels[i]) for i, f in enumerate(frames)}
    slot = {position_of[id(f)]: k for k, f in enumerate(base.frames)}
    ordered = list(base.frames)
    for p in points[1:]:
        ordered.extend(sorted((frames[i] for i in p), key=lambda f: slot[position_of[id(f)]]))
    shape = tuple(base.shape) + ((len(points),) if len(points) > 1 else ())
    if len(points) > 1 and len(shape) == 3:  # one slice per time point: (I, J, 1, T)
        shape = (shape[0], shape[1], 1, len(points))
    return SeriesGeometry(
        ordered,
        base.affine,
        shape,
        tuple(notes) + base.warnings,
        time_key=name,
        time_values=tuple(times),
        incomplete=incomplete,
        time_step=_time_step(frames, points),
    )


# clock fields and their unit in seconds, for the interval between time points
_CLOCKS: tuple[tuple[str, float], ...] = (
    ("trigger_time", 1e-3),
    ("content_time", 1.0),
    ("acquisition_time", 1.0),
)


def _time_step(frames: Sequence[FrameInfo], points: Sequence[Sequence[int]]) -> float | None:
    """Median interval (s) between the starts of consecutive time points, from the first clock field present
    on every frame of them and increasing over time; None if no field qualifies (e.g. only
    AcquisitionNumber)."""
    if len(points) < 2:
        return None
    for attribute, unit in _CLOCKS:
        values = [[getattr(frames[i], attribute) for i in p] for p in points]
        if any(v is None for vs in values for v in vs):
            continue
        starts = np.array([min(vs) for vs in values], dtype=float)
        steps = np.diff(starts)
        if np.all(steps > 0):
            return float(np.median(steps) * unit)
    return None


def _stack_geometry(frames: Sequence[FrameInfo], label: str) -> SeriesGeometry:
    """One 3D stack: the checks of :func:`series_geometry` for a single time point."""
    frames = list(frames)
    if not frames:
        raise DicomSeriesError(f"{label}: no image frames")
    files = [f.path for f in frames]
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        raise _fail(label, f"mixed image sizes (rows, columns) {sorted(sizes)} in one series", files)
    if len(set(_cluster([f.orientation for f in frames], _ORIENT_TOL))) > 1:
        found = sorted({tuple(round(v, 4) for v in f.orientation or ()) for f in frames})
        raise _fail(label, f"mixed image orientations {found} in one series", files)
    if len(set(_cluster([f.pixel_spacing for f in frames], _SPACING_TOL))) > 1:
        found = sorted({f.pixel_spacing or () for f in frames})
        raise _fail(label, f"mixed pixel spacings {found} in one series", files)

    first = frames[0]
    notes: list[str] = []
    spacing = first.pixel_spacing
    if spacing is None:
        spacing = (1.0, 1.0)
        notes.append("no PixelSpacing: 1 mm assumed in-plane")
    iop = first.orientation
    missing_position = any(f.position is None for f in frames)
    if iop is None or missing_position:
        if len(frames) > 1 and len({f.path for f in frames}) > 1:
            raise _fail(
                label, "slices without ImagePositionPatient / ImageOrientationPatient cannot be sorted", files
            )
        iop = iop or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        notes.append("no per-frame ImagePositionPatient: frames kept in stored order, nominal geometry")
    row_dir = np.asarray(iop[:3], dtype=float)
    col_dir = np.asarray(iop[3:], dtype=float)
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    thickness = first.slice_thickness if first.slice_thickness and first.slice_thickness > 0 else None

    if missing_position:
        ordered = sorted(frames, key=lambda f: f.frame or 0)
        origin = np.asarray(first.position if first.position is not None else (0.0, 0.0, 0.0))
        step = thickness or 1.0
    else:
        proj = np.array([float(np.dot(f.position, normal)) for f in frames])
        order = np.argsort(proj, kind="stable")
        ordered = [frames[i] for i in order]
        proj = proj[order]
        origin = np.asarray(ordered[0].position, dtype=float)
        if len(ordered) == 1:
            step = thickness or 1.0
        else:
            diffs = np.diff(proj)
            dups = np.flatnonzero(diffs < _DUP_TOL)
            if dups.size:
                pairs = [(ordered[i].path, ordered[i + 1].path) for i in dups]
                raise _fail(
                    label,
                    f"duplicate slice positions: {len(dups)} pair(s) at the same position along the normal, "
                    f"first at {proj[dups[0]]:.3f} mm",
                    [p for pair in pairs for p in pair],
                )
            # reference spacing = the smallest step; jitter below `tol` (low-precision IPP) is accepted
            base = float(diffs.min())
            tol = max(0.05, 0.1 * base)
            bad = np.flatnonzero(np.abs(diffs - base) > tol)
            if bad.size:
                ratios = diffs[bad] / base
                if np.all(np.abs(ratios - np.rint(ratios)) < 0.1) and np.all(ratios > 1.5):
                    gaps = [
                        f"{int(round(r)) - 1} missing at "
                        + ", ".join(f"{proj[i] + m * base:.2f}" for m in range(1, int(round(r))))
                        + f" mm (between {ordered[i].path.name} at {proj[i]:.2f} mm and "
                        f"{ordered[i + 1].path.name} at {proj[i + 1]:.2f} mm)"
                        for i, r in zip(bad, ratios)
                    ]
                    problem = (
                        f"missing slice(s) (spacing {base:.3f} mm; positions along the slice normal): "
                        + "; ".join(gaps)
                    )
                else:
                    problem = (
                        f"slice spacing varies from {diffs.min():.3f} to {diffs.max():.3f} mm "
                        "; medfusion does not resample irregular stacks"
                    )
                raise _fail(
                    label, problem, [ordered[i].path for i in bad] + [ordered[i + 1].path for i in bad]
                )
            step = float((proj[-1] - proj[0]) / (len(proj) - 1))
            residual = np.abs(proj - (proj[0] + step * np.arange(len(proj))))
            if residual.max() > tol:
                raise _fail(
                    label, f"slice positions drift {residual.max():.3f} mm from a regular grid", files
                )
            # gantry tilt: the stack moves in-plane from slice to slice (sheared grid)
            total = np.asarray(ordered[-1].position) - origin
            along = float(np.dot(total, normal))
            lateral = float(np.linalg.norm(total - along * normal))
            if lateral > max(0.01, 0.1 * min(spacing)):
                angle = math.degrees(math.atan2(lateral, abs(along)))
                raise _fail(
                    label,
                    f"gantry tilt / sheared stack: slices shift {lateral:.2f} mm in-plane over {len(ordered)} "
                    f"slices ({angle:.2f} degrees); medfusion refuses tilted stacks instead of producing a wrong "
                    "geometry - resample them first (e.g. dcm2niix -y)",
                    files,
                )

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing[1]
    affine_lps[:3, 1] = col_dir * spacing[0]
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = origin
    shape = (first.columns, first.rows) + ((len(ordered),) if len(ordered) > 1 else ())
    return SeriesGeometry(ordered, LPS_TO_RAS @ affine_lps, shape, tuple(notes))


# ---------------------------------------------------------------------------------------------- read


def _frames_from_files(paths: Sequence[Path], label: str) -> tuple[list[FrameInfo], dict]:
    frames: list[FrameInfo] = []
    meta: dict | None = None
    uids = set()
    for path in paths:
        ds, reason = _read_header(path)
        if ds is None:
            raise _fail(label, f"{path.name}: {reason}", [path])
        reason = _non_image_reason(ds)
        if reason is not None:
            raise _fail(label, f"{path.name} is not an image: {reason}", [path])
        uids.add(str(ds.SeriesInstanceUID))
        try:
            frames.extend(_frames_from_header(ds, path))
        except Exception as exc:  # noqa: BLE001
            raise _fail(
                label, f"{path.name}: unreadable image header ({type(exc).__name__}: {exc})", [path]
            ) from exc
        if meta is None:
            meta = header_meta(ds)
    if len(uids) > 1:
        raise _fail(
            label, f"files belong to {len(uids)} different series (SeriesInstanceUID {sorted(uids)})", paths
        )
    return frames, meta or {}


def _resolve(series_or_files: Any) -> tuple[list[FrameInfo], dict, str]:
    if isinstance(series_or_files, DicomSeries):
        return list(series_or_files.frames), dict(series_or_files.meta), series_or_files.label
    if isinstance(series_or_files, (str, os.PathLike)):
        path = Path(series_or_files)
        if path.is_dir():
            found = discover_series(path, include_derived=True, include_localizers=True)
            if len(found.series) != 1:
                listing = "; ".join(s.label for s in found.series) or "none"
                skipped = "; ".join(f"{s.paths[0].name}: {s.reason}" for s in found.skipped[:5])
                raise DicomSeriesError(
                    f"{path}: expected exactly one image series, found {len(found.series)} ({listing})"
                    + (f"; skipped: {skipped}" if skipped else "")
                    + " - use discover_series() and pick one"
                )
            return _resolve(found.series[0])
        series_or_files = [path]
    paths = [Path(p) for p in series_or_files]
    if not paths:
        raise DicomSeriesError("no files given")
    label = f"files in {paths[0].parent}"
    frames, meta = _frames_from_files(paths, label)
    label = f"series {meta.get('SeriesInstanceUID')} ({meta.get('SeriesDescription') or 'no description'})"
    return frames, meta, label


def _decode(path: Path, label: str) -> tuple[np.ndarray, Any]:
    """Full dataset + decoded pixel array (frames first for multi-frame objects)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            label, f"{path.name}: unreadable or corrupt file ({type(exc).__name__}: {exc})", [path]
        ) from exc
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_text = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _fail(
            label,
            f"{path.name}: colour images (SamplesPerPixel {ds.SamplesPerPixel}) are not supported",
            [path],
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing plugin, corrupt stream, truncated data
        raise _fail(
            label,
            f"cannot decode pixel data of {path.name}, transfer syntax {syntax_text}: {type(exc).__name__}: {exc}",
            [path],
        ) from exc
    return np.asarray(pixels), ds


def read_series(series_or_files: DicomSeries | str | os.PathLike | Iterable[str | os.PathLike]) -> Volume:
    """Read one DICOM series to a :class:`Volume` (``array[i, j, k]`` or ``array[i, j, k, t]``, RAS+ affine).

    Args:
        series_or_files: a :class:`DicomSeries` from :func:`discover_series`, a folder holding exactly one
            series, a single (multi-frame) file, or a list of files of one series.

    Slices are sorted along the normal of ImageOrientationPatient. RescaleSlope / RescaleIntercept are
    applied per frame: the array is float32 then (CT in HU); otherwise the stored integer type is kept
    (uint16 above 32767 survives). Raises :class:`DicomSeriesError` naming the series and the files.

    A 4D series (repeated positions, see :func:`series_geometry` for how time points are ordered) gives
    ``array[i, j, k, t]`` with the 3D affine of every time point (nibabel writes it as a 4D NIfTI, as
    dcm2niix does); ``meta["time_key"]`` / ``meta["time_values"]`` say how time was ordered, and
    ``meta["incomplete"]`` (also in ``meta["warnings"]``) says when a partial last volume was dropped.
    Note that :attr:`Volume.spacing` is meant for 2D/3D arrays: use ``voxel_spacing(affine, 3)`` for 4D.
    """
    frames, meta, label = _resolve(series_or_files)
    geometry = series_geometry(frames, label)
    ordered = geometry.frames
    n_slices = geometry.shape[2] if len(geometry.shape) > 2 else 1
    rescale = any(f.slope != 1.0 or f.intercept != 0.0 for f in ordered) or meta.get("Modality") == "CT"
    decoded: dict[Path, np.ndarray] = {}
    out: np.ndarray | None = None
    n = len(ordered)
    for k, frame in enumerate(ordered):
        if frame.path not in decoded:
            decoded[frame.path], _ = _decode(frame.path, label)
        pixels = decoded[frame.path]
        if frame.frame is not None:
            if pixels.ndim < 3 or frame.frame >= pixels.shape[0]:
                raise _fail(
                    label, f"{frame.path.name}: frame {frame.frame} missing from the pixel data", [frame.path]
                )
            pixels = pixels[frame.frame]
        if pixels.shape != (frame.rows, frame.columns):
            raise _fail(
                label,
                f"{frame.path.name}: pixel data shape {pixels.shape} != (Rows, Columns) {(frame.rows, frame.columns)}",
                [frame.path],
            )
        if out is None:
            out = np.empty(
                (frame.columns, frame.rows, n_slices, n // n_slices),
                dtype=np.float32 if rescale else pixels.dtype,
            )
        index = (slice(None), slice(None), k % n_slices, k // n_slices)  # frames are time-major
        if rescale:
            out[index] = pixels.T.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
        else:
            out[index] = pixels.T
    assert out is not None  # n >= 1 is guaranteed by series_geometry
    array = out.reshape(geometry.shape)
    meta = dict(meta)
    meta["source_files"] = [str(p) for p in dict.fromkeys(f.path for f in ordered)]
    meta["warnings"] = list(geometry.warnings)
    meta["time_key"] = geometry.time_key
    meta["time_values"] = list(geometry.time_values) if geometry.time_key else None
    meta["incomplete"] = geometry.incomplete
    meta["time_step"] = geometry.time_step
    for note in geometry.warnings:
        warnings.warn(f"{label}: {note}", stacklevel=2)
    return Volume(array=array, affine=geometry.affine, meta=meta)


# --------------------------------------------------------------------------------------------- write


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
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"array must be (I, J) or (I, J, K), got shape {array.shape}")
    volume = array[:, :, None] if array.ndim == 2 else array
    meta = dict(meta or {})
    unknown = sorted(k for k in meta if tag_for_keyword(k) is None)
    if unknown:
        raise ValueError(
            f"meta keys {unknown} are not DICOM keywords (e.g. Manufacturer, KVP, ConvolutionKernel)"
        )

    ds = Dataset()
    ref_ds = None
    if reference is not None:
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
        image_type = ["DERIVED", "SECONDARY"]
    else:
        if affine is None:
            raise ValueError("write_dicom_series needs `affine` when no `reference` series is given")
        image_type = ["ORIGINAL", "PRIMARY"]
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")

    modality = str(meta.get("Modality", ds.get("Modality", "CT")))
    if modality not in WRITABLE_MODALITIES:
        raise ValueError(f"cannot write Modality {modality!r}; valid: {', '.join(WRITABLE_MODALITIES)}")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage

    # geometry: LPS columns of the affine -> IOP, PixelSpacing, per-slice IPP
    lps = LPS_TO_RAS @ affine
    col_i, col_j, col_k = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    sp_i, sp_j = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    if min(sp_i, sp_j) <= 0:
        raise ValueError("affine has a zero-length in-plane axis")
    row_dir, col_dir = col_i / sp_i, col_j / sp_j
    if abs(float(np.dot(row_dir, col_dir))) > 1e-4:
        raise ValueError("in-plane axes of the affine are not orthogonal; DICOM cannot store that")
    normal = np.cross(row_dir, col_dir)
    thickness = meta.pop("SliceThickness", None) or voxel_spacing(affine)[2]

    slope, intercept = rescale_for(volume)
    stored = np.clip(np.rint((volume.astype(np.float64) - intercept) / slope), -32768, 32767).astype(np.int16)

    ds.Modality = modality
    ds.SOPClassUID = sop_class
    ds.SeriesInstanceUID = generate_uid()
    axial = abs(float(normal[2])) > 0.9
    ds.ImageType = image_type + (["AXIAL"] if axial else ["OTHER"])
    ds.SeriesDescription = series_description
    ds.DerivationDescription = derivation_description
    ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    ds.PixelSpacing = [_ds(sp_j), _ds(sp_i)]
    ds.SliceThickness = _ds(float(thickness))
    ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
    if modality == "CT":
        ds.RescaleType = "HU"
    for key, value in meta.items():
        if dictionary_VR(key) == "DS":  # DS holds at most 16 characters: format floats to fit
            value = [_ds(v) for v in value] if isinstance(value, (list, tuple)) else _ds(value)
        setattr(ds, key, value)
    # defaults for what neither the reference nor meta gave
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

    out_dir = Path(out_dir)
    written: list[Path] = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for k in range(volume.shape[2]):
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = lps[:3, 3] + k * col_k
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(np.dot(position, normal)))
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
