"""The reference cluster (tests/support/cluster.py), started once per test session: two
portal nodes behind nginx on PostgreSQL, Redis and Orthanc-on-PostgreSQL. Each test leaves
it healthy (every node up, Redis, PostgreSQL and Orthanc running)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The shared cluster; stopped and removed at the end of the session."""
    with Cluster(nodes=2) as started:
        yield started
