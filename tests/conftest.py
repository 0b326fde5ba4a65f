from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.pg import Cluster, Template

IS_ROOT = os.geteuid() == 0


def production_kernel() -> bool:
    """What `@pytest.mark.vm` tests need: CAP_SYS_RESOURCE in this process's bounding set
    (scores below 0) and the cgroup v2 memory controller. The guest of scripts/vm-test.sh
    has both; this project's machines have neither, so there the tests skip."""
    try:
        with open("/proc/self/status") as f:
            bounding = next(int(x.split()[1], 16) for x in f if x.startswith("CapBnd:"))
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            v2_memory = "memory" in f.read().split()
    except (OSError, StopIteration, ValueError):
        return False
    return bool(bounding & (1 << 24)) and v2_memory  # 24: CAP_SYS_RESOURCE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = pytest.mark.skip(reason="needs root on the real kernel")
    vm = pytest.mark.skip(reason="needs CAP_SYS_RESOURCE and cgroup v2: bash scripts/vm-test.sh")
    production = production_kernel()
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(root)
        if "vm" in item.keywords and not (production and IS_ROOT):
            item.add_marker(vm)


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
