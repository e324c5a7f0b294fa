"""A small run of bench/fuzz_dicom.py (the full one: >= 1,000 cases, bench/results/fuzz_dicom.md): mutated real
DICOM headers never crash or hang ``convert``, and every refusal names the file and the field."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _fuzzer():
    path = Path(__file__).resolve().parents[2] / "bench" / "fuzz_dicom.py"
    spec = importlib.util.spec_from_file_location("fuzz_dicom", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_headers_fail_cleanly_and_name_file_and_field():
    pytest.importorskip("pydicom")
    fuzz = _fuzzer()
    records = [fuzz._case(seed=1, index=i, limit=20.0) for i in range(50)]
    outcomes = {r["outcome"] for r in records}
    assert not outcomes & {"crash", "hang"}, [r for r in records if r["outcome"] in ("crash", "hang")]
    assert {"converted", "failed"} <= outcomes  # the mutations do reach both tolerated and refused cases
    unnamed = [r for r in records if r["outcome"] in ("failed", "skipped") and not r.get("named", True)]
    assert unnamed == []
