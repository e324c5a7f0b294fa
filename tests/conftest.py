"""Shared pytest fixtures: seeded RNGs, few threads, no network."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


class _NoNetwork(socket.socket):
    def connect(self, address):  # type: ignore[override]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
            return super().connect(address)
        if self.family == socket.AF_UNIX:
            return super().connect(address)
        raise RuntimeError(f"network access attempted during tests: {address!r}")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test runs with outbound sockets blocked (user_asks.md §0.11): loopback only."""
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    yield


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
