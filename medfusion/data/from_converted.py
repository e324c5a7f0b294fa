"""Manifests from the output of ``medfusion convert``: protocols told apart by their acquisition, every series
accounted for.

Every ``X.json`` sidecar with a sibling ``X.nii.gz`` / ``X.nii`` is one converted series. Its *protocol* is the
combination of the sidecar fields in ``group_by``: by default the acquisition (:data:`ACQUISITION_FIELDS`:
reconstruction kernel, slice thickness, tube voltage, exposure and tube current, series description), so that
dose and thickness variants reconstructed with the standard's kernel, or two protocols sharing a kernel name,
stay apart. For ``standardize`` / ``restore`` each study's *target* is its standard-protocol series with the
lowest SeriesNumber; every other series of the study becomes a ``source -> target`` pair. Nothing is dropped
silently: a series that is in no pair (a second standard series, a study without a standard series) is listed
in ``Manifest.extra["excluded"]`` with the reason, and ``Manifest.extra["targets"]`` says which series was taken
as each study's target. Patients are split by :func:`split_patients`, so no patient is in two splits.
``medfusion manifest DIR`` (:mod:`medfusion.apps.manifest`) is the command line.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from medfusion import keys as K
from medfusion.data.manifest import (
    NIFTI_SUFFIXES,
    SPLITS,
    Manifest,
    ManifestError,
    _check_task,
    _validate,
)

#: sidecar fields that define a protocol by default (``group_by="acquisition"``)
ACQUISITION_FIELDS: tuple[str, ...] = (
    "ConvolutionKernel",
    "SliceThickness",
    "KVP",
    "Exposure",
    "XRayTubeCurrent",
    "SeriesDescription",
)
_UNITS = {"SliceThickness": "mm", "KVP": "kV", "Exposure": "mAs", "XRayTubeCurrent": "mA"}


def group_fields(group_by: str | Sequence[str]) -> tuple[str, ...]:
    """``"acquisition"`` -> :data:`ACQUISITION_FIELDS`; ``"A,B"`` or ``["A", "B"]`` -> those sidecar fields."""
    if isinstance(group_by, str):
        if group_by == "acquisition":
            return ACQUISITION_FIELDS
        group_by = [f.strip() for f in group_by.split(",")]
    fields = tuple(f for f in group_by if f)
    if not fields:
        raise ValueError("group_by needs 'acquisition' or at least one sidecar field name")
    return fields


def protocol_label(meta: Mapping, fields: Sequence[str]) -> str:
    """The protocol of one series: its values of ``fields`` joined by `` | `` (numbers with units, e.g.
    ``B30f | 1mm | 120kV | 200mAs``); empty when none is present."""
    parts = []
    for name in fields:
        value = meta.get(name)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            value = "\\".join(str(v) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{value:.4g}{_UNITS.get(name, '')}"
        parts.append(str(value))
    return " | ".join(parts)


def _nifti_for(sidecar: Path) -> Path | None:
    stem = sidecar.name[: -len(".json")]
    for suffix in NIFTI_SUFFIXES:
        candidate = sidecar.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _series_number(meta: Mapping) -> float:
    try:
        return float(meta.get("SeriesNumber"))
    except (TypeError, ValueError):
        return float("inf")


def split_patients(patients: list[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign each patient to a split: shuffled with ``seed``, sizes by largest remainder, >= 1 per used split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"split must be three non-negative fractions (training, validation, test), got {fractions}"
        )
    total = sum(fractions)
    fracs = [f / total for f in fractions]
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    n = len(order)
    counts = [int(f * n) for f in fracs]
    for i in sorted(range(3), key=lambda i: fracs[i] * n - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    # every requested split gets at least one patient when there are enough patients
    for i in range(3):
        if fracs[i] > 0 and counts[i] == 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    assignment: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for pid in order[start : start + count]:
            assignment[pid] = split
        start += count
    return assignment


def _read_series(directory: Path) -> list[tuple[Path, dict]]:
    series = []
    for sidecar in sorted(directory.rglob("*.json")):
        nifti = _nifti_for(sidecar)
        if nifti is None:
            continue
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{sidecar}: sidecar is not valid JSON: {e}") from e
        if isinstance(meta, dict):
            series.append((nifti, meta))
    if not series:
        raise ManifestError(
            f"{directory}: no NIfTI + JSON sidecar pairs found (run `medfusion convert` first)"
        )
    return series


def choose_standard(labels: Counter, standard: str | None, source: str) -> str:
    """The standard protocol: ``standard`` itself, else the one label containing it as text, else (None) the
    most common label (ties broken by name). ``ManifestError`` listing the labels when none or several match."""
    if standard is None:
        return sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    if standard in labels:
        return standard
    matches = sorted(label for label in labels if standard in label)
    if len(matches) == 1:
        return matches[0]
    what = "matches several protocols" if matches else "not found"
    listing = "; ".join(f"{label!r} ({n} series)" for label, n in sorted(labels.items()))
    raise ManifestError(f"{source}: standard {standard!r} {what}; values present: {listing}")


def _pairs(
    series: list[tuple[Path, dict]], label_of, patient_of, standard: str
) -> tuple[list[tuple[str, dict]], list[dict], list[dict]]:
    """``(entries, targets, excluded)`` for standardize / restore: one target per study, the rest paired."""
    studies: dict[tuple[str, str], list[tuple[Path, dict]]] = defaultdict(list)
    for nifti, meta in series:
        studies[(patient_of(meta, nifti), str(meta.get("StudyInstanceUID", "")))].append((nifti, meta))
    entries, targets, excluded = [], [], []
    for (pid, study), members in sorted(studies.items()):
        members = sorted(members, key=lambda m: (_series_number(m[1]), str(m[0])))
        refs = [m for m in members if label_of(m[1]) == standard]
        if not refs:
            for nifti, meta in members:
                why = f"no series of the standard protocol {standard!r} in its study (patient {pid})"
                excluded.append({"series": str(nifti), "protocol": label_of(meta), "reason": why})
            continue
        target = refs[0][0]
        targets.append({K.CASE_ID: pid, "study": study, K.TARGET: str(target), K.PROTOCOL: standard})
        for nifti, meta in members:
            if nifti == target:
                continue
            if label_of(meta) == standard:
                why = f"standard protocol again; the study's target is {target.name} (lowest SeriesNumber)"
                excluded.append({"series": str(nifti), "protocol": standard, "reason": why})
                continue
            entry = {K.SOURCE: str(nifti), K.TARGET: str(target), K.PROTOCOL: label_of(meta), K.CASE_ID: pid}
            entries.append((pid, entry))
    return entries, targets, excluded


def build_manifest_from_converted(
    directory: str | os.PathLike,
    *,
    task: str,
    group_by: str | Sequence[str] = "acquisition",
    standard: str | None = None,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Manifest:
    """Build a manifest from the NIfTI + JSON sidecars written by ``medfusion convert``.

    Args:
        directory: the OUTPUT folder of ``medfusion convert``.
        task: ``image`` (one entry ``{image, protocol, case_id}`` per series), ``standardize`` or ``restore``
            (``{source, target, protocol, case_id}`` pairs within each study, see the module docstring).
        group_by: ``"acquisition"`` (:data:`ACQUISITION_FIELDS`) or the sidecar fields that define a protocol
            (a list, or comma-separated text such as ``"ConvolutionKernel"``).
        standard: the standard protocol: a protocol label, or text found in exactly one label (``"B30f"``);
            None: the most common protocol.
        split: (training, validation, test) fractions of the patients; seed: of the patient shuffle.

    Returns:
        a :class:`Manifest` whose ``extra`` holds ``standard``, ``targets`` (one per study: case_id, study,
        target, protocol) and ``excluded`` (series in no entry, each with its reason).

    Raises:
        ManifestError: no series found, unknown / unsupported task, no standard protocol, or no pair at all.
    """
    source = str(directory)
    directory = Path(os.path.normpath(Path(directory).absolute()))
    _check_task(task, source)
    supported = ("image", "standardize", "restore")
    if task not in supported:
        raise ManifestError(
            f"{source}: task {task!r} cannot be built from DICOM sidecars (needs labels or a registration "
            f"design); supported here: {', '.join(supported)}"
        )
    fields = group_fields(group_by)
    series = _read_series(directory)

    def label_of(meta: Mapping) -> str:
        return protocol_label(meta, fields)

    def patient_of(meta: Mapping, nifti: Path) -> str:
        return str(meta.get("PatientID") or nifti.parent.name)

    extra: dict = {"group_by": list(fields), "targets": [], "excluded": []}
    if task == "image":
        entries = [
            (patient_of(m, n), {K.IMAGE: str(n), K.PROTOCOL: label_of(m), K.CASE_ID: patient_of(m, n)})
            for n, m in series
        ]
    else:
        labels = Counter(label_of(m) for _, m in series)
        standard = choose_standard(labels, standard, source)
        entries, extra["targets"], extra["excluded"] = _pairs(series, label_of, patient_of, standard)
        extra["standard"] = standard
        if not entries:
            raise ManifestError(
                f"{source}: no study has both a standard ({standard!r}) and a non-standard series; protocols "
                f"present: {dict(labels)}"
            )
    assignment = split_patients(sorted({pid for pid, _ in entries}), split, seed)
    splits: dict[str, list[dict]] = {}
    for pid, entry in entries:
        splits.setdefault(assignment[pid], []).append(entry)
    splits = {s: splits[s] for s in SPLITS if s in splits}
    cleaned = _validate(
        splits, root=directory, task=task, source=source, check_files=True, allow_outside=True
    )
    desc = f"built by `medfusion manifest` from {len(series)} series; protocol = {' + '.join(fields)}"
    if task != "image":
        desc += (
            f"; standard = {extra['standard']!r}; {len(extra['excluded'])} series in no pair (see 'excluded')"
        )
    return Manifest(
        splits=cleaned, root=directory, task=task, name=directory.name, description=desc, extra=extra
    )
