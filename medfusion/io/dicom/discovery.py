"""Series discovery: a folder tree of DICOM files -> the acquisition series in it, and what was skipped and why.

Files are grouped by SeriesInstanceUID (any file names, nested folders), then a UID is split where
orientation, image size, pixel spacing, echo number or a repeated acquisition (same positions, different
AcquisitionNumber: contrast phases, repeat scans) is mixed, with the reason recorded on every part. Skipped
with a reason each: non-DICOM and unreadable files, non-image objects (SEG, SR, RTSTRUCT, ...), localizers
and derived images unless asked for. SimpleITK's ``GetGDCMSeriesIDs`` silently merges or drops such series
and MONAI reads one folder as one series; a batch converter must instead report every series it found.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.io.dicom.geometry import _ORIENT_TOL, _SPACING_TOL, _cluster
from medfusion.io.dicom.header import (
    FrameInfo,
    _frames_from_header,
    _image_type,
    _non_image_reason,
    _read_header,
    _unsupported_reason,
    header_meta,
)


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


def _split_frames(
    frames: list[FrameInfo], merge_acquisitions: bool = False
) -> tuple[list[list[FrameInfo]], str | None]:
    """Split one SeriesInstanceUID into regular stacks; return the parts and why (None: no split).

    Repeated positions with different AcquisitionNumber are split (contrast phases) unless
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


def _drop_copies(
    entries: list[tuple[Path, Any, list[FrameInfo]]],
    uid: str,
    description: str | None,
    skipped: list[SkippedItem],
) -> list[tuple[Path, Any, list[FrameInfo]]]:
    """Keep one file per SOPInstanceUID (the first by path): further files with the same UID are copies of the
    same object (another transfer syntax, a re-export) and would otherwise show up as duplicate slices."""
    first: dict[str, Path] = {}
    for path, ds, _ in sorted(entries, key=lambda e: str(e[0])):
        first.setdefault(str(ds.get("SOPInstanceUID", "") or ""), path)
    kept = []
    for entry in entries:
        sop = str(entry[1].get("SOPInstanceUID", "") or "")
        if sop and first[sop] != entry[0]:
            reason = f"another copy of the object in {first[sop]} (same SOPInstanceUID {sop})"
            skipped.append(SkippedItem((entry[0],), reason, uid, description))
            continue
        kept.append(entry)
    return kept


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
        reason = _non_image_reason(ds) or _unsupported_reason(ds)
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
        entries = _drop_copies(entries, uid, description, result.skipped)
        kept = []
        for skip_word, include, why in (
            (
                "LOCALIZER",
                include_localizers,
                "localizer (ImageType LOCALIZER); pass --include-localizers (include_localizers=True) to convert it",
            ),
            (
                "DERIVED",
                include_derived,
                "derived images (ImageType DERIVED); pass --include-derived (include_derived=True) to convert them",
            ),
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
