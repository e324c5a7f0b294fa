"""Manifests: which files make up the training / validation / test splits of a task.

Two equivalent on-disk formats, both with paths *relative to the manifest's folder*:

* MONAI's Decathlon-style datalist JSON (what ``monai.data.load_decathlon_datalist`` reads)::

      {"task": "standardize", "name": "...", "description": "...",
       "training":   [{"source": "p0/b60f.nii.gz", "target": "p0/b30f.nii.gz", "protocol": "B60f", "case_id": "p0"}],
       "validation": [...],
       "test":       [...]}

* CSV with the same columns plus a ``split`` column (``training``/``train``, ``validation``/``val``, ``test``);
  an empty cell means "key absent for this row".

Keys listed in ``PATH_KEYS`` are file (NIfTI) or folder (DICOM series) paths: they are resolved to absolute
paths and checked; every other key (``protocol``, ``case_id``, ...) passes through as a string.

Validation raises :class:`ManifestError` (a ``ValueError``) naming the manifest file and the offending entry:
missing file, path escaping the manifest's folder (absolute paths and ``..`` escapes are refused unless
``allow_outside=True``), empty split, unknown task, missing keys for the task, and the same case or file in two
splits (patient-level leakage between training and evaluation).

A manifest kept in a sub-folder of its data (``DIR/manifests/``) declares ``"data_root": ".."``: its paths stay
relative to the manifest (``../case_000/standard.nii.gz``, as MONAI resolves them) and may reach up to that
folder. Manifests of earlier versions declared ``"root": ".."`` with paths relative to that root; they still load.

``build_manifest_from_converted`` (:mod:`medfusion.data.from_converted`) turns the output of ``medfusion convert``
(NIfTI + JSON sidecars) into a manifest, telling protocols apart by their acquisition and splitting by patient;
``medfusion manifest DIR`` (:mod:`medfusion.apps.manifest`) is its command line.

Why hand-written: MONAI's ``load_decathlon_datalist`` resolves paths but does no validation (missing files,
escapes, leakage across splits, task keys) and has no CSV or writer; nothing in MONAI builds pairs from DICOM
sidecars. This module stays import-cheap (stdlib only): no torch or MONAI at module level.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medfusion import keys as K
from medfusion.io.atomic import write_text_atomic

#: required batch keys per task (``image``: unpaired images, e.g. unconditional generation / DRDM augmentation)
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "standardize": (K.SOURCE, K.TARGET),
    "restore": (K.SOURCE, K.TARGET),
    "segment": (K.IMAGE, K.LABEL),
    "register": (K.MOVING, K.FIXED),
    "image": (K.IMAGE,),
}
#: keys whose values are paths (file or DICOM folder); all other keys are passed through as strings
PATH_KEYS: tuple[str, ...] = (
    K.IMAGE,
    K.LABEL,
    K.SOURCE,
    K.TARGET,
    K.MOVING,
    K.FIXED,
    K.MOVING_LABEL,
    K.FIXED_LABEL,
    K.MASK,
    K.DDF,
)
#: keys of displacement fields (voxels, :mod:`medfusion.io.displacement`): loaded for the ``register`` task only
#: (its supervised term); for other tasks the path passes through unread
FIELD_KEYS: tuple[str, ...] = (K.DDF,)
#: keys whose label maps (integers, nearest-neighbour resampling, no HU window)
LABEL_KEYS: tuple[str, ...] = (K.LABEL, K.MOVING_LABEL, K.FIXED_LABEL, K.MASK)
#: canonical split names (Decathlon) and the aliases accepted in CSV files and ``Manifest.split``
SPLITS: tuple[str, ...] = ("training", "validation", "test")
SPLIT_ALIASES: dict[str, str] = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}
#: files a task may legitimately share across splits (e.g. one atlas as the fixed image of every pair)
SHARED_ACROSS_SPLITS: dict[str, tuple[str, ...]] = {"register": (K.FIXED, K.FIXED_LABEL)}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ManifestError(ValueError):
    """A manifest is malformed or inconsistent; the message names the manifest file and the entry."""


@dataclass
class Manifest:
    """A validated manifest.

    Attributes:
        splits: ``{"training": [...], "validation": [...], "test": [...]}`` (absent splits are absent keys);
            each entry is a dict whose ``PATH_KEYS`` values are absolute paths (str).
        root: the manifest's folder; relative paths were resolved against it.
        task: one of ``TASK_KEYS`` or None (no key check).
        path: the manifest file (None when built in memory).
        name, description: free text from the manifest.
    """

    splits: dict[str, list[dict]]
    root: Path
    task: str | None = None
    path: Path | None = None
    name: str | None = None
    description: str | None = None
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        """Entries of split ``name`` (aliases such as ``train``/``val`` accepted); [] if the split is absent."""
        canonical = SPLIT_ALIASES.get(name.lower())
        if canonical is None:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLIT_ALIASES)}")
        return self.splits.get(canonical, [])

    @property
    def path_keys(self) -> tuple[str, ...]:
        """Path keys present in every entry of every split (the keys a pipeline must load; ``FIELD_KEYS`` only for
        the ``register`` task)."""
        entries = [e for items in self.splits.values() for e in items]
        loaded = [k for k in PATH_KEYS if self.task == "register" or k not in FIELD_KEYS]
        return tuple(k for k in loaded if entries and all(k in e for e in entries))


def _check_task(task: str | None, where: str) -> None:
    if task is not None and task not in TASK_KEYS:
        raise ManifestError(f"{where}: unknown task {task!r}; valid tasks: {', '.join(TASK_KEYS)}")


def _resolve(value: object, root: Path, allow_outside: bool, where: str, base: Path | None = None) -> str:
    """Resolve one manifest path against ``base`` (default ``root``); refuse absolute paths and escapes from
    ``root`` unless allowed."""
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: expected a non-empty path string, got {value!r}")
    p = Path(value)
    if p.is_absolute():
        if not allow_outside:
            raise ManifestError(
                f"{where}: absolute path {value!r} is not allowed (paths must be relative to the manifest's "
                f"folder {root}; pass allow_outside=True to accept it)"
            )
        return os.path.normpath(p)
    full = Path(os.path.normpath((base or root) / p))
    if not allow_outside and not (full == root or root in full.parents):
        raise ManifestError(
            f"{where}: path {value!r} escapes the manifest's data folder {root} (pass allow_outside=True to "
            "accept it)"
        )
    return str(full)


def _validate(
    splits: Mapping[str, Sequence[Mapping]],
    *,
    root: Path,
    task: str | None,
    source: str,
    check_files: bool,
    allow_outside: bool,
    base: Path | None = None,
) -> dict[str, list[dict]]:
    """Resolve paths (against ``base``, default ``root``; they must stay inside ``root``) and run every check;
    return the cleaned splits (canonical names, absolute paths)."""
    _check_task(task, source)
    if not splits:
        raise ManifestError(f"{source}: no splits found; expected some of {', '.join(SPLITS)}")
    out: dict[str, list[dict]] = {}
    required = TASK_KEYS[task] if task else ()
    for name, items in splits.items():
        split = SPLIT_ALIASES.get(str(name).lower())
        if split is None:
            raise ManifestError(f"{source}: unknown split {name!r}; valid: {', '.join(SPLIT_ALIASES)}")
        if not isinstance(items, list | tuple):
            raise ManifestError(
                f"{source}: split {name!r} must be a list of entries, got {type(items).__name__}"
            )
        if not items:
            raise ManifestError(f"{source}: split {name!r} is empty")
        entries = out.setdefault(split, [])
        for i, item in enumerate(items):
            where = f"{source}: {split}[{i}]"
            if not isinstance(item, Mapping):
                raise ManifestError(f"{where}: expected an object/row, got {item!r}")
            missing = [k for k in required if k not in item]
            if missing:
                raise ManifestError(
                    f"{where}: missing key(s) {missing} for task {task!r} (requires {list(required)}); "
                    f"entry has {sorted(item)}"
                )
            entry: dict = {}
            for key, value in item.items():
                if key in PATH_KEYS:
                    full = _resolve(value, root, allow_outside, f"{where} key {key!r}", base)
                    if check_files and not os.path.exists(full):
                        raise ManifestError(
                            f"{where} key {key!r}: file not found: {value!r} (resolved to {full})"
                        )
                    entry[key] = full
                else:
                    entry[key] = value
            entries.append(entry)
    _check_leakage(out, task, source)
    return out


def _check_leakage(splits: Mapping[str, list[dict]], task: str | None, source: str) -> None:
    """Refuse the same case_id or the same file in two different splits."""
    shared = SHARED_ACROSS_SPLITS.get(task or "", ())
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    for split, items in splits.items():
        for i, entry in enumerate(items):
            tags = [("case_id", str(entry[K.CASE_ID]))] if entry.get(K.CASE_ID) not in (None, "") else []
            tags += [("file", entry[k]) for k in PATH_KEYS if k in entry and k not in shared]
            for tag in tags:
                first = seen.setdefault(tag, (split, i))
                if first[0] != split:
                    raise ManifestError(
                        f"{source}: {split}[{i}]: {tag[0]} {tag[1]!r} also appears in {first[0]}[{first[1]}]; "
                        "a case must belong to exactly one split"
                    )


def _read_csv(path: Path) -> tuple[dict[str, list[dict]], dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "split" not in reader.fieldnames:
            raise ManifestError(f"{path}: CSV manifest needs a 'split' column; columns: {reader.fieldnames}")
        splits: dict[str, list[dict]] = {}
        for row_no, row in enumerate(reader, start=2):
            name = (row.pop("split") or "").strip()
            if not name:
                raise ManifestError(f"{path}: line {row_no}: empty 'split' cell")
            entry = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            splits.setdefault(name, []).append(entry)
    return splits, {}


def _read_json(path: Path) -> tuple[dict[str, list[dict]], dict]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object with {', '.join(SPLITS)} lists")
    split_names = [k for k in data if k.lower() in SPLIT_ALIASES]
    splits = {k: data[k] for k in split_names}
    header = {k: v for k, v in data.items() if k not in split_names}
    return splits, header


def _data_root(path: Path, header: Mapping) -> tuple[Path, Path]:
    """``(data root, base)``: the folder manifest paths must stay inside, and the folder they are relative to.

    Paths are relative to the manifest's own folder, as MONAI's ``load_decathlon_datalist`` reads them (its
    ``base_dir`` defaults to the datalist's folder). A manifest kept in a sub-folder of its dataset (e.g.
    ``DIR/manifests/``) declares ``"data_root": ".."``: its paths (``../case_000/standard.nii.gz``) may then reach
    up to that folder and no further; MONAI ignores the key and resolves the same files. Manifests of earlier
    medfusion versions declared ``"root": ".."`` with paths relative to that root (which MONAI does not know);
    they are still read that way.
    """
    folder = Path(os.path.normpath(path.parent.absolute()))
    legacy, declared = header.get("root"), header.get("data_root")
    if legacy is not None and declared is not None:
        raise ManifestError(f"{path}: declares both 'root' (old format) and 'data_root'; keep 'data_root'")
    key = "root" if legacy is not None else "data_root"
    value = legacy if legacy is not None else declared
    if value is None:
        return folder, folder
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        raise ManifestError(f"{path}: {key!r} must be a relative folder path (e.g. '..'), got {value!r}")
    root = Path(os.path.normpath(folder / value))
    if not root.is_dir():
        raise ManifestError(f"{path}: declared {key} {value!r} ({root}) is not a folder")
    if key == "data_root" and not (root == folder or root in folder.parents):
        raise ManifestError(f"{path}: data_root {value!r} must be the manifest's folder or one above it")
    return root, (root if key == "root" else folder)


def load_manifest(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    check_files: bool = True,
    allow_outside: bool = False,
) -> Manifest:
    """Read and validate a JSON (Decathlon datalist) or CSV manifest.

    Args:
        path: ``*.json`` or ``*.csv``.
        task: one of ``TASK_KEYS``; None takes the manifest's own ``"task"`` field (JSON), else no key check.
            A task given here that contradicts the manifest's declared task is an error.
        check_files: check that every path exists (file or DICOM folder).
        allow_outside: accept absolute paths and paths escaping the manifest's folder.

    Returns:
        a :class:`Manifest` with absolute paths.

    Raises:
        ManifestError: on any problem, naming the manifest file and the entry.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ManifestError(f"{source}: manifest file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        splits, header = _read_json(path)
    elif suffix == ".csv":
        splits, header = _read_csv(path)
    else:
        raise ManifestError(f"{source}: unknown manifest format {suffix!r}; valid: .json, .csv")
    declared = header.get("task")
    _check_task(task, source)
    if declared is not None:
        _check_task(declared, source)
        if task is not None and task != declared:
            raise ManifestError(
                f"{source}: manifest declares task {declared!r} but task {task!r} was requested"
            )
    task = task or declared
    root, base = _data_root(path, header)
    cleaned = _validate(
        splits,
        root=root,
        task=task,
        source=source,
        check_files=check_files,
        allow_outside=allow_outside,
        base=base,
    )
    extra = {k: v for k, v in header.items() if k not in ("task", "name", "description", "root", "data_root")}
    return Manifest(
        splits=cleaned,
        root=root,
        task=task,
        path=path.absolute(),
        name=header.get("name"),
        description=header.get("description"),
        extra=extra,
    )


def write_manifest(
    path: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping]],
    *,
    task: str,
    name: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
    check_files: bool = True,
    allow_outside: bool = False,
    data_root: str | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write ``splits`` as a JSON or CSV manifest (by suffix) with paths relative to the manifest's folder.

    Paths may be absolute or relative to the current directory. They are written relative to the manifest's
    folder, as MONAI's ``load_decathlon_datalist`` resolves them, and must lie inside it (so the dataset folder
    stays relocatable) or, with ``data_root`` (e.g. ``".."`` for a manifest in ``DIR/manifests/``, JSON only),
    inside that folder; ``allow_outside`` writes any ``../`` path (the manifest must then be loaded with
    ``allow_outside=True``). ``extra`` adds informational top-level keys to a JSON manifest (MONAI ignores
    them). The data is validated exactly as ``load_manifest`` would, then written atomically
    (``medfusion.io.atomic``); an existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise ManifestError(f"{path}: unknown manifest format {suffix!r}; valid: .json, .csv")
    if (data_root is not None or extra) and suffix != ".json":
        raise ManifestError(f"{path}: a declared 'data_root' or extra keys need a JSON manifest")
    folder = Path(os.path.normpath(path.parent.absolute()))
    root = Path(os.path.normpath(folder / (data_root or ".")))
    absolute = {
        split: [{k: (str(Path(v).absolute()) if k in PATH_KEYS else v) for k, v in e.items()} for e in items]
        for split, items in splits.items()
    }
    cleaned = _validate(
        absolute, root=root, task=task, source=str(path), check_files=check_files, allow_outside=True
    )
    relative: dict[str, list[dict]] = {}
    for split in SPLITS:
        for entry in cleaned.get(split, []):
            row = {}
            for k, v in entry.items():
                if k in PATH_KEYS:
                    inside = Path(v) == root or root in Path(v).parents
                    if not inside and not allow_outside:
                        raise ManifestError(
                            f"{path}: {split}: {k} {v!r} lies outside the manifest's data folder {root}; "
                            "write the manifest into the data folder (or pass data_root='..' for a sub-folder "
                            "of it), or pass allow_outside=True (--allow-outside) and load it with "
                            "allow_outside=True"
                        )
                    v = Path(os.path.relpath(v, folder)).as_posix()
                row[k] = v
            relative.setdefault(split, []).append(row)
    if suffix == ".json":
        doc: dict = {"task": task}
        if data_root is not None:
            doc["data_root"] = data_root
        if name is not None:
            doc["name"] = name
        if description is not None:
            doc["description"] = description
        doc.update({f"num{s.capitalize()}": len(v) for s, v in relative.items()})
        doc.update({k: v for k, v in (extra or {}).items() if k not in doc and k not in SPLIT_ALIASES})
        doc.update(relative)
        text = json.dumps(doc, indent=2) + "\n"
    else:
        columns = ["split"]
        for items in relative.values():
            for row in items:
                columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for split, items in relative.items():
            for row in items:
                writer.writerow({"split": split, **row})
        text = buf.getvalue()
    return write_text_atomic(path, text, overwrite=overwrite)


# --- manifests from `medfusion convert` output -------------------------------------------------------------


def build_manifest_from_converted(
    directory: str | os.PathLike,
    *,
    task: str,
    group_by: str | Sequence[str] = "acquisition",
    standard: str | None = None,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Manifest:
    """A manifest from the NIfTI + JSON sidecars written by ``medfusion convert``; see
    :func:`medfusion.data.from_converted.build_manifest_from_converted` (kept here so that the manifest API is
    one import)."""
    from medfusion.data.from_converted import build_manifest_from_converted as build

    return build(directory, task=task, group_by=group_by, standard=standard, split=split, seed=seed)
