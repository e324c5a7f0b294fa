"""Reading one DICOM series to a :class:`~medfusion.io.volume.Volume`: ``array[i, j, k]`` (or
``array[i, j, k, t]`` for 4D) with its RAS+ affine and the header metadata.

pydicom decodes the pixels (its pixel-data plugins cover JPEG lossless, JPEG-LS, JPEG 2000 and RLE); the
geometry comes from :func:`medfusion.io.dicom.geometry.series_geometry`. RescaleSlope / RescaleIntercept
(PS3.3 C.11.1.1.2) are applied per frame, so CT comes out in Hounsfield units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.io.dicom.discovery import DicomSeries, discover_series
from medfusion.io.dicom.geometry import series_geometry
from medfusion.io.dicom.header import (
    DicomSeriesError,
    FrameInfo,
    _fail,
    _frames_from_header,
    _non_image_reason,
    _read_header,
    header_meta,
    take_parsed,
)
from medfusion.io.dicom.pixels import native_pixels, pixel_data_length, read_ref
from medfusion.io.volume import Volume


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


def _decode(path: Path, label: str, ds: Any | None = None) -> tuple[np.ndarray, Any]:
    """Full dataset + decoded pixel array (frames first for multi-frame objects); ``ds``: the file's dataset
    when it was parsed already (pixel data deferred), else the file is read here."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if ds is None:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:  # no preamble: discovery accepted its header (UIDs present); read it so
                ds = pydicom.dcmread(path, force=True)
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
        problem = _pixel_header_problem(ds, syntax)
    except Exception as exc:  # noqa: BLE001 - bad values, or deferred pixel data that cannot be read
        problem = (
            f"unreadable pixel description (Rows, Columns, NumberOfFrames, BitsAllocated, BitsStored): {exc}"
        )
    if problem:
        raise _fail(label, f"{path.name}: {problem}", [path])
    try:
        pixels = native_pixels(ds, syntax)
        if pixels is None:
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing plugin, corrupt stream, truncated data
        raise _fail(
            label,
            f"cannot decode pixel data of {path.name}, transfer syntax {syntax_text}: {type(exc).__name__}: {exc} "
            f"(header: {_pixel_fields(ds)})",
            [path],
        ) from exc
    return np.asarray(pixels), ds


def _pixel_fields(ds: Any) -> str:
    """The header fields that describe the pixel data, for error messages."""
    keys = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "PixelRepresentation")
    return ", ".join(f"{k} {ds.get(k)}" for k in keys if k in ds)


def _pixel_header_problem(ds: Any, syntax: Any) -> str | None:
    """What in the pixel description (PS3.3 C.7.6.3) contradicts itself or the stored bytes, naming the fields;
    None if nothing. Encapsulated (compressed) pixel data is left to the decoder."""
    allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if allocated not in (8, 16, 32, 64) and not (allocated == 1 and ds.get("Modality") == "SEG"):
        return f"BitsAllocated {allocated!r} is not 8, 16, 32 or 64"
    if stored is not None and not 1 <= int(stored) <= int(allocated):
        return f"BitsStored {stored!r} is not between 1 and BitsAllocated {allocated}"
    if "PixelData" not in ds:
        return "no PixelData element"
    if syntax is None or not getattr(syntax, "is_encapsulated", False):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        expected = rows * columns * frames * int(ds.get("SamplesPerPixel", 1) or 1) * int(allocated) // 8
        have = pixel_data_length(ds)
        if have < expected:
            return (
                f"PixelData holds {have} bytes, but Rows x Columns x NumberOfFrames x BitsAllocated/8 = "
                f"{rows} x {columns} x {frames} x {int(allocated) // 8} = {expected} bytes: the pixel data is "
                f"truncated, one of these fields is wrong, or the data is compressed although TransferSyntaxUID "
                f"{syntax or '(absent)'} says it is not"
            )
    return None


def _frame_pixels(frames: Sequence[FrameInfo], label: str) -> list[np.ndarray]:
    """The stored 2D pixels of each frame, in order (each file decoded once; frames of a multi-frame file are
    views into its array), checked against the frame's Rows x Columns."""
    decoded: dict[Path, np.ndarray] = {}
    out = []
    for frame in frames:
        if frame.path not in decoded:
            ds = take_parsed(frame.path)  # parsed once by discovery, pixel data deferred until now
            stored = read_ref(frame.pixel_ref, frame.path) if frame.pixel_ref is not None else None
            decoded[frame.path] = stored if stored is not None else _decode(frame.path, label, ds)[0]
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
        out.append(pixels)
    return out


def _fits_int16(frames: Sequence[FrameInfo], pixels: Sequence[np.ndarray]) -> bool:
    """Whether every rescaled value ``stored * slope + intercept`` is an integer in int16's range, computed exactly
    in integers and equal to the float32 result: integer stored values of at most 16 bits, integer slopes and
    intercepts with ``|intercept| <= 2**15`` (so every intermediate value stays below float32's 2**24)."""
    for frame, values in zip(frames, pixels):
        slope, intercept = float(frame.slope), float(frame.intercept)
        if not (
            np.issubdtype(values.dtype, np.integer)
            and values.dtype.itemsize <= 2
            and slope.is_integer()
            and intercept.is_integer()
            and abs(intercept) <= 2**15
        ):
            return False
        if values.size:
            ends = (float(values.min()) * slope + intercept, float(values.max()) * slope + intercept)
            if min(ends) < -32768 or max(ends) > 32767:
                return False
    return True


def _wrap16(value: int) -> np.int16:
    return np.int16((value + 2**15) % 2**16 - 2**15)


def _rescale_int16(stored: np.ndarray, slope: int, intercept: int, out: np.ndarray) -> None:
    """``out = stored * slope + intercept`` in int16 arithmetic, in one pass and without a wider copy.

    Exact when the true results fit in int16 (checked by :func:`_fits_int16`): integer arithmetic modulo 2**16 is a
    ring, so reinterpreting uint16 values and wrapping the slope and intercept to int16 changes every
    intermediate value by a multiple of 2**16 only, and a result in int16's range is the true one."""
    values = stored.view(np.int16) if stored.dtype.itemsize == 2 else stored.astype(np.int16)
    if slope != 1:
        np.multiply(values, _wrap16(slope), out=out)
        values = out
    np.add(values, _wrap16(intercept), out=out)


def read_series(
    series_or_files: DicomSeries | str | os.PathLike | Iterable[str | os.PathLike],
    *,
    keep_int16: bool = False,
) -> Volume:
    """Read one DICOM series to a :class:`Volume` (``array[i, j, k]`` or ``array[i, j, k, t]``, RAS+ affine).

    Args:
        series_or_files: a :class:`DicomSeries` from :func:`discover_series`, a folder holding exactly one
            series, a single (multi-frame) file, or a list of files of one series.
        keep_int16: when every rescaled value is an integer in int16's range (CT in HU from integer pixels,
            slopes and intercepts), return int16 instead of float32: the same values, half the memory, no
            float pass (how :func:`medfusion.io.convert.convert_tree` and dcm2niix store CT).

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
    pixels = _frame_pixels(ordered, label)
    integers = rescale and keep_int16 and _fits_int16(ordered, pixels)
    dtype = np.int16 if integers else (np.float32 if rescale else pixels[0].dtype)
    # Fortran order: each slice (a row-major DICOM frame, transposed) is one contiguous block, and the array is
    # already in NIfTI's on-disk voxel order
    n = len(ordered)
    out = np.empty((ordered[0].columns, ordered[0].rows, n_slices, n // n_slices), dtype=dtype, order="F")
    for k, (frame, values) in enumerate(zip(ordered, pixels)):
        index = (slice(None), slice(None), k % n_slices, k // n_slices)  # frames are time-major
        if integers:  # exact: checked by _fits_int16
            _rescale_int16(values.T, int(frame.slope), int(frame.intercept), out[index])
        elif rescale:
            out[index] = values.T.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
        else:
            out[index] = values.T
    pixel_type = pixels[-1].dtype
    del pixels
    array = out.reshape(geometry.shape)
    meta = dict(meta)
    meta["source_files"] = [str(p) for p in dict.fromkeys(f.path for f in ordered)]
    meta["warnings"] = list(geometry.warnings)
    meta["time_key"] = geometry.time_key
    meta["time_values"] = list(geometry.time_values) if geometry.time_key else None
    meta["incomplete"] = geometry.incomplete
    meta["time_step"] = geometry.time_step
    # stored integers times integer slopes plus integer intercepts are integers (exact in float32 below 2**24):
    # lets writers store int16 without checking every voxel
    meta["integer_valued"] = bool(
        np.issubdtype(np.dtype(pixel_type), np.integer)
        and all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in ordered)
    )
    for note in geometry.warnings:
        warnings.warn(f"{label}: {note}", stacklevel=2)
    return Volume(array=array, affine=geometry.affine, meta=meta)
