"""DICOM headers -> per-frame geometry facts (:class:`FrameInfo`) and the metadata kept with a volume.

pydicom parses the files; this module reads what the rest of :mod:`medfusion.io.dicom` needs from a header,
for single-frame objects, legacy multi-frame objects (frame positions from GridFrameOffsetVector, as RT dose
grids store them) and enhanced multi-frame objects (per-frame and shared functional groups, DICOM PS3.3
C.7.6.16). It also decides what is not a readable image (non-DICOM files, DICOMDIR, SEG / SR / RTSTRUCT and
other non-image objects), so discovery can skip them with a reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

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


class DicomSeriesError(ValueError):
    """A DICOM series cannot be read as one regular volume; the message names the series and files."""


def _fail(label: str, problem: str, files: Iterable[Path]) -> DicomSeriesError:
    """A :class:`DicomSeriesError` naming the series (``label``), the problem and up to six of the files."""
    names = sorted({str(p) for p in files})
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} files)" if len(names) > 6 else "")
    return DicomSeriesError(f"{label}: {problem} [files: {shown}]")


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


def _file_frame(ds: Any, path: Path) -> FrameInfo:
    """The header's file-level values as one frame (``frame=None``); per-frame values refine it."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    if ds.get("Modality") == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        slope = float(ds.DoseGridScaling)
    thick = ds.get("SliceThickness")
    return FrameInfo(
        path=path,
        frame=None,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2),
        slice_thickness=float(thick) if thick not in (None, "") else None,
        slope=slope,
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        acquisition_number=_opt_int(ds.get("AcquisitionNumber")),
        echo_number=_opt_int(ds.get("EchoNumbers")),
        temporal_index=_opt_int(ds.get("TemporalPositionIdentifier")),
        instance_number=_opt_int(ds.get("InstanceNumber")),
        trigger_time=_opt_float(ds.get("TriggerTime")),
        content_time=_tm_seconds(ds.get("ContentTime")),
        acquisition_time=_tm_seconds(ds.get("AcquisitionTime")),
    )


def _enhanced_frame(item: Any, shared: Any, index: int, base: FrameInfo) -> FrameInfo:
    """Frame ``index`` of an enhanced multi-frame object: its functional groups (per-frame ``item``, else
    ``shared``) override the file-level values of ``base``; time fields come from the groups only."""

    def group(sequence: str, keyword: str) -> Any:
        return _group_value(item, shared, sequence, keyword)

    slope = group("PixelValueTransformationSequence", "RescaleSlope")
    intercept = group("PixelValueTransformationSequence", "RescaleIntercept")
    thick = group("PixelMeasuresSequence", "SliceThickness")
    return replace(
        base,
        frame=index,
        position=_floats(group("PlanePositionSequence", "ImagePositionPatient"), 3) or base.position,
        orientation=_floats(group("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        or base.orientation,
        pixel_spacing=_floats(group("PixelMeasuresSequence", "PixelSpacing"), 2) or base.pixel_spacing,
        slice_thickness=float(thick) if thick is not None else base.slice_thickness,
        slope=float(slope) if slope is not None else base.slope,
        intercept=float(intercept) if intercept is not None else base.intercept,
        acquisition_number=_opt_int(group("FrameContentSequence", "FrameAcquisitionNumber"))
        or base.acquisition_number,
        temporal_index=_opt_int(group("FrameContentSequence", "TemporalPositionIndex")),
        trigger_time=_opt_float(group("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")),
        content_time=_tm_seconds(group("FrameContentSequence", "FrameReferenceDateTime")),
        acquisition_time=_tm_seconds(group("FrameContentSequence", "FrameAcquisitionDateTime")),
    )


def _legacy_frames(ds: Any, base: FrameInfo) -> list[FrameInfo]:
    """Frames of a single-frame or legacy multi-frame object. Frame positions of a multi-frame object are
    ``IPP + GridFrameOffsetVector[f] * normal`` (RT dose, PS3.3 C.8.8.3.2), else unknown (None)."""
    n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
    if n_frames == 1:
        return [base]
    offsets = ds.get("GridFrameOffsetVector")
    ipp, iop = base.position, base.orientation
    frames = []
    for index in range(n_frames):
        position = None
        if offsets is not None and ipp is not None and iop is not None and len(offsets) == n_frames:
            normal = np.cross(iop[:3], iop[3:])
            position = tuple(float(v) for v in np.asarray(ipp) + float(offsets[index]) * normal)
        frames.append(replace(base, frame=index, position=position))
    return frames


def _frames_from_header(ds: Any, path: Path) -> list[FrameInfo]:
    """Expand a header to per-frame geometry (single-frame, legacy multi-frame and enhanced objects)."""
    base = _file_frame(ds, path)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return _legacy_frames(ds, base)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    return [_enhanced_frame(item, shared, index, base) for index, item in enumerate(per_frame)]


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
