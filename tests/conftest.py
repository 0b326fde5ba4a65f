from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.pg import Cluster, Template

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root on the real kernel")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[Template]:
    template = Template()
    yield template
    template.cleanup()


@pytest.fixture
def make_cluster(pg_template: Template) -> Iterator[object]:
    clusters: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        cluster = Cluster(pg_template, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.destroy()
