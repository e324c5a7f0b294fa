"""Fixtures for tests/io (builders live in io_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from io_helpers import ct_small_series


@pytest.fixture
def ct_series(tmp_path) -> list[Path]:
    return ct_small_series(tmp_path / "ct")
