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

from medfusion.io.dicom.geometry import _ORIENT_TOL, _SPACING_TOL, _cluster
from medfusion.io.dicom.header import (
    EXTRA_KEYS,
    SIDECAR_KEYS,
    FrameInfo,
    _frames_from_header,
    _image_type,
    _non_image_reason,
    _read_header,
    _unsupported_reason,
    header_meta,
    peek_parsed,
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


@dataclass(frozen=True)
class _Parsed:
    """What discovery needs from one file's header: plain values, so that worker processes can return them."""

    path: Path
    series_uid: str
    description: str | None
    sop_uid: str
    image_type: tuple[str, ...]
    frames: list[FrameInfo]


def _parse(path: Path, remember: bool = True) -> _Parsed | SkippedItem:
    """One file -> its header facts, or why it is skipped."""
    ds, reason = _read_header(path, remember=remember)
    if ds is None:
        return SkippedItem((path,), reason or "not DICOM")
    reason = _non_image_reason(ds) or _unsupported_reason(ds)
    frames: list[FrameInfo] = []
    if reason is None:
        try:
            frames = _frames_from_header(ds, path)
        except Exception as exc:  # noqa: BLE001 - malformed geometry tags
            reason = f"unreadable image header: {type(exc).__name__}: {exc}"
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    description = str(ds.get("SeriesDescription", "") or "") or None
    if reason is not None:
        return SkippedItem((path,), reason, uid or None, description)
    sop = str(ds.get("SOPInstanceUID", "") or "")
    return _Parsed(path, uid, description, sop, tuple(_image_type(ds)), frames)


def _parse_chunk(paths: list[Path]) -> list[_Parsed | SkippedItem]:
    return [_parse(path, remember=False) for path in paths]


# Below this many files per worker, starting processes costs more than parsing in this one.
_FILES_PER_WORKER = 48


def parse_workers(n_files: int, workers: int | None = None) -> int:
    """How many processes parse ``n_files`` headers: ``workers`` if given, else one per available core (at most
    8), fewer for small folders; 1 (this process) where ``fork`` is unavailable, since spawned workers would pay
    the imports again."""
    import multiprocessing

    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8, n_files // _FILES_PER_WORKER))


def _parse_all(paths: list[Path], workers: int) -> list[_Parsed | SkippedItem]:
    """Every file's header facts, in ``paths`` order; parsed by ``workers`` forked processes when > 1.

    pydicom parses in pure Python (about 1.5 ms for a CT header), the largest part of converting a large
    uncompressed series; worker processes return only header facts and pixel offsets (no datasets: pickling
    those would cost about half the parse). Falls back to this process if the pool cannot run."""
    if workers <= 1 or len(paths) < 2:
        return [_parse(path) for path in paths]
    import multiprocessing
    import warnings
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    size = -(-len(paths) // (workers * 4))  # a few chunks per worker evens out uneven files
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: workers only parse
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                return [item for chunk in pool.map(_parse_chunk, chunks) for item in chunk]
    except (BrokenProcessPool, OSError):
        return [_parse(path) for path in paths]


def _drop_copies(
    entries: list[_Parsed], uid: str, description: str | None, skipped: list[SkippedItem]
) -> list[_Parsed]:
    """Keep one file per SOPInstanceUID (the first by path): further files with the same UID are copies of the
    same object (another transfer syntax, a re-export) and would otherwise show up as duplicate slices."""
    first: dict[str, Path] = {}
    for entry in sorted(entries, key=lambda e: str(e.path)):
        first.setdefault(entry.sop_uid, entry.path)
    kept = []
    for entry in entries:
        if entry.sop_uid and first[entry.sop_uid] != entry.path:
            reason = (
                f"another copy of the object in {first[entry.sop_uid]} (same SOPInstanceUID {entry.sop_uid})"
            )
            skipped.append(SkippedItem((entry.path,), reason, uid, description))
            continue
        kept.append(entry)
    return kept


def _meta(path: Path) -> dict:
    """:func:`header_meta` of one file (the dataset discovery kept, else the header read again); every key None
    if the file became unreadable since it was parsed (reading the series then fails and says which file)."""
    ds = peek_parsed(path)
    if ds is None:
        ds, _ = _read_header(path, remember=False)
    if ds is None:
        return dict.fromkeys([k for k in SIDECAR_KEYS if k != "source_files"] + list(EXTRA_KEYS))
    return header_meta(ds)


def discover_series(
    root: str | os.PathLike,
    *,
    include_derived: bool = False,
    include_localizers: bool = False,
    merge_acquisitions: bool = False,
    workers: int | None = None,
) -> DiscoveryResult:
    """Find every DICOM image series under ``root`` (any file names, nested folders).

    Files are grouped by SeriesInstanceUID, then split where orientation, image size, pixel spacing, echo
    number or a repeated acquisition (same positions, different AcquisitionNumber) is mixed; each split
    series carries ``split_reason``. Skipped, with a reason each: non-DICOM and unreadable files, non-image
    objects (SEG, SR, RTSTRUCT, ...), localizers (ImageType LOCALIZER) unless ``include_localizers``, and
    derived images (ImageType DERIVED) unless ``include_derived``. A series whose repeated positions carry
    several TemporalPositionIdentifiers is kept whole (a 4D series); ``merge_acquisitions`` also keeps
    repeated acquisitions (different AcquisitionNumber) whole, to be read as a 4D volume ordered by it.

    Headers are parsed by ``workers`` processes (default: :func:`parse_workers`, one per core for large
    folders); the result is the same for any number.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    result = DiscoveryResult()
    paths = list(_iter_files(root))
    by_uid: dict[str, list[_Parsed]] = {}
    for item in _parse_all(paths, parse_workers(len(paths), workers)):
        if isinstance(item, SkippedItem):
            result.skipped.append(item)
        else:
            by_uid.setdefault(item.series_uid, []).append(item)

    for uid in sorted(by_uid):
        entries = by_uid[uid]
        description = entries[0].description
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
            dropped = [e for e in entries if skip_word in e.image_type]
            if dropped:
                result.skipped.append(SkippedItem(tuple(e.path for e in dropped), why, uid, description))
                entries = [e for e in entries if skip_word not in e.image_type]
        kept = entries
        if not kept:
            continue
        meta = _meta(kept[0].path)
        frames = [f for e in kept for f in e.frames]
        parts, reason = _split_frames(frames, merge_acquisitions)
        for index, part in enumerate(parts):
            series_meta = dict(meta)
            part_files = {f.path for f in part}
            first = next(e for e in kept if e.path in part_files)
            first_meta = meta if first is kept[0] else _meta(first.path)
            series_meta.update({k: v for k, v in first_meta.items() if v is not None})
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
