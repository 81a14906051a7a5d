"""Fixtures shared by the slow API test files of this package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def api_peer(embedded_path) -> Iterator[object]:
    """One real `together join` torch peer holding every layer and serving the API (float32), started
    once for every test file of tests/apps that asks for it (/v1/messages, /v1/responses): a peer's start
    costs seconds, a request a fraction of one."""
    from tests.mesh.cluster import Cluster

    c = Cluster(str(embedded_path))
    try:
        p = c.add("api", "--backend", "torch", "--dtype", "float32", "--no-mdns", api=True)
        c.wait_ready(p, stages=1)
        yield p
    finally:
        c.stop()
