"""The guard's reading of a cgroup when memory moves between its reads: usage and memory.stat
are two files, and a working set computed from readings of different moments is memory
nobody holds. The reads are scripted (what each read of each file returns, in order) and the
clock is fake; the real kernel's version of this is the 85 % test in
tests/integration/test_guard.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from watcher.guard.memory import (
    READ_ATTEMPTS,
    STEADY_WITHIN_NS,
    MemoryGroup,
    MemoryReader,
    steady,
)

MIB = 1 << 20
LIMIT = 300 * MIB
D = "/cg"


def stat(cache_mib: float, shmem_mib: float = 5.5) -> str:
    """A v1 memory.stat: cache includes shmem, as the kernel reports it."""
    return (
        f"total_cache {int(cache_mib * MIB)}\ntotal_shmem {int(shmem_mib * MIB)}\n"
        f"hierarchical_memory_limit {LIMIT}\n"
    )


class Script:
    """Serves each file's reads in order and moves a fake clock by `read_ns` per read (or by
    what `stall_ns` says for the nth read overall)."""

    def __init__(self, files: dict[str, list[str]], read_ns: int = 20_000) -> None:
        self.files = {path: iter(texts) for path, texts in files.items()}
        self.read_ns = read_ns
        self.stall_ns: dict[int, int] = {}
        self.reads: list[str] = []
        self.now_ns = 5_000_000_000

    def read(self, path: str) -> str:
        self.reads.append(path.rsplit("/", 1)[-1])
        self.now_ns += self.stall_ns.get(len(self.reads), self.read_ns)
        texts: Iterator[str] = self.files[path]
        return next(texts)

    def reader(self, version: int = 1) -> MemoryReader:
        return MemoryReader(MemoryGroup(version, D, D), self.read, lambda: self.now_ns)


def v1(usage_mib: list[float], stats: list[str]) -> Script:
    return Script(
        {
            f"{D}/memory.limit_in_bytes": [f"{LIMIT}\n"],
            f"{D}/memory.usage_in_bytes": [f"{int(u * MIB)}\n" for u in usage_mib],
            f"{D}/memory.stat": stats,
        }
    )


def test_a_steady_reading_is_taken_once_with_usage_read_around_the_stat() -> None:
    script = v1([298, 298], [stat(48)])
    sample = script.reader().sample()
    assert script.reads == [
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "memory.stat",
        "memory.usage_in_bytes",
    ]
    assert sample.working_set_bytes == int(298 * MIB) - (int(48 * MIB) - int(5.5 * MIB))


def test_cache_dropped_between_usage_and_stat_is_not_taken_for_working_set() -> None:
    # What failed the 85 % test: usage read at 298 MiB with 42 MiB of cache, then dd's O_TRUNC
    # dropped the cache before memory.stat was read. One usage read: a working set of 298 MiB
    # (above 90 % of 300); the truth is 256.
    script = v1([298, 256, 256, 256], [stat(5.5), stat(5.5)])
    sample = script.reader().sample()
    assert sample.working_set_bytes == 256 * MIB
    assert script.reads.count("memory.stat") == 2  # the moving reading was taken again


def test_a_reading_interrupted_for_long_is_taken_again_even_if_usage_agrees() -> None:
    # Cache dropped and refilled while the reader was off the CPU: usage agrees before and
    # after, memory.stat saw the cache at its lowest. Only the time gives it away.
    script = v1([298, 298, 298, 298], [stat(5.5), stat(48)])
    script.stall_ns[2] = 104_000_000  # after the first usage read, as measured
    sample = script.reader().sample()
    assert sample.working_set_bytes == int(298 * MIB) - (int(48 * MIB) - int(5.5 * MIB))
    assert script.reads.count("memory.stat") == 2


def test_memory_that_never_stops_moving_gives_the_lower_reading() -> None:
    # Every attempt tears (a fast truncate and refill, over and over): the last attempt, with
    # the lower usage, so that the reading errs low rather than on page cache.
    usage: list[float] = []
    for _ in range(READ_ATTEMPTS):
        usage += [298, 256]
    script = v1(usage, [stat(5.5)] * READ_ATTEMPTS)
    sample = script.reader().sample()
    assert script.reads.count("memory.stat") == READ_ATTEMPTS
    assert sample.usage_bytes == 256 * MIB
    assert sample.working_set_bytes == 256 * MIB


def test_v2_reads_memory_current_around_the_stat() -> None:
    script = Script(
        {
            f"{D}/memory.max": [f"{LIMIT}\n"],
            f"{D}/memory.current": [f"{n * MIB}\n" for n in (298, 256, 256, 256)],
            f"{D}/memory.stat": ["file 5767168\nshmem 5767168\n"] * 2,
        }
    )
    sample = script.reader(version=2).sample()
    assert script.reads[:4] == ["memory.max", "memory.current", "memory.stat", "memory.current"]
    assert sample.working_set_bytes == 256 * MIB


@pytest.mark.parametrize(
    ("before_mib", "after_mib", "elapsed_ns", "expected"),
    [
        (298, 298, 100_000, True),
        (297, 300, 100_000, True),  # reclaim at the limit moves usage by ~2 MiB: 1 % of 300
        (298, 256, 100_000, False),
        (298, 298, STEADY_WITHIN_NS + 1, False),
    ],
)
def test_steady(before_mib: int, after_mib: int, elapsed_ns: int, expected: bool) -> None:
    assert steady(before_mib * MIB, after_mib * MIB, elapsed_ns, LIMIT) is expected


def test_steady_without_a_limit_allows_a_mebibyte() -> None:
    assert steady(10 * MIB, 11 * MIB, 1000, None)
    assert not steady(10 * MIB, 12 * MIB, 1000, None)
