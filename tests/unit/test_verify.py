"""`pgoom verify` on fake /proc trees: the same identity rules as watch, exit codes 0/1/3."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.unit.fakeproc import FakeProc, pidfile_text
from watcher.commands.verify import verify_postmasters
from watcher.errors import UsageError
from watcher.limits import EXIT_CHECK_FAILED, EXIT_NOT_FOUND, EXIT_OK

ME = os.getuid()


@pytest.fixture
def tree(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def postmaster(tree: FakeProc, adj: int, name: str = "postmaster", **kw: object) -> int:
    kw.setdefault("uid", ME)
    sample = tree.install(name, **kw)  # type: ignore[arg-type]
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile=pidfile_text(sample.pid, sample.data_dir))
    set_adj(tree, sample.pid, adj)
    return sample.pid


def set_adj(tree: FakeProc, pid: int, adj: int) -> None:
    (tree.proc / str(pid) / "oom_score_adj").write_text(f"{adj}\n")


def verify(tree: FakeProc, score: int = 0, timeout_s: float = 0.0, **kw: object) -> tuple[int, str]:
    return verify_postmasters(
        list(kw.pop("patterns", [])),  # type: ignore[call-overload]
        list(kw.pop("data_dirs", [])),  # type: ignore[call-overload]
        score,
        timeout_s,
        bool(kw.pop("as_json", False)),
        procfs=tree.procfs,
        poll_interval_s=0.01,
    )


def test_protected_postmaster_passes(tree: FakeProc) -> None:
    pid = postmaster(tree, adj=0)
    tree.install("backend", uid=ME)  # its child, at 1000: children are not checked
    code, text = verify(tree, score=0)
    assert code == EXIT_OK
    assert text.startswith("ok: 1 postmaster(s) at or below 0")
    assert f"pid {pid} (/pgdata/" in text


def test_score_is_an_upper_bound(tree: FakeProc) -> None:
    postmaster(tree, adj=-900)
    assert verify(tree, score=0)[0] == EXIT_OK
    assert verify(tree, score=-900)[0] == EXIT_OK
    assert verify(tree, score=-901)[0] == EXIT_CHECK_FAILED


def test_unprotected_postmaster_fails_with_one_line_reason(tree: FakeProc) -> None:
    pid = postmaster(tree, adj=1000)
    start = time.monotonic()
    code, text = verify(tree, score=0, timeout_s=0.2)
    assert time.monotonic() - start >= 0.2  # it waited the whole timeout
    assert code == EXIT_CHECK_FAILED
    assert "\n" not in text
    assert text.startswith("pgoom: not protected within 0.2 s:")
    assert f"pid {pid}" in text and "oom_score_adj 1000" in text


def test_waits_for_protection_within_the_timeout(tree: FakeProc) -> None:
    pid = postmaster(tree, adj=1000)
    # Another actor (the watcher, in real life) lowers the score while verify polls.
    timer = threading.Timer(0.15, set_adj, (tree, pid, 0))
    timer.start()
    try:
        code, _ = verify(tree, score=0, timeout_s=5)
    finally:
        timer.cancel()
    assert code == EXIT_OK


def test_no_postmaster_is_not_found(tree: FakeProc) -> None:
    code, text = verify(tree, score=0, timeout_s=0.05)
    assert code == EXIT_NOT_FOUND
    assert text.startswith("pgoom: no postmaster found within 0.05 s")


def test_backend_alone_is_not_a_postmaster(tree: FakeProc) -> None:
    backend = tree.install("backend", uid=ME)
    set_adj(tree, backend.pid, 0)
    assert verify(tree)[0] == EXIT_NOT_FOUND


def test_look_alike_script_is_not_a_postmaster(tree: FakeProc) -> None:
    # '/bin/sh .../postgres -D /pgdata/pg16' matches the default pattern; confirm() refuses.
    sample = tree.install("script_postgres", uid=ME, cwd="/pgdata/pg16")
    tree.data_dir("/pgdata/pg16")
    set_adj(tree, sample.pid, 0)
    assert verify(tree)[0] == EXIT_NOT_FOUND


def test_postmaster_owned_by_someone_else_is_not_accepted(tree: FakeProc) -> None:
    # The data directory belongs to the test's uid, the process claims another uid.
    other = 65534 if ME != 65534 else 65533
    postmaster(tree, adj=0, uid=other)
    assert verify(tree)[0] == EXIT_NOT_FOUND


def test_every_postmaster_must_be_protected(tree: FakeProc) -> None:
    first = postmaster(tree, adj=0)
    second = postmaster(tree, adj=1000, name="named_postmaster")
    code, text = verify(tree, score=0)
    assert code == EXIT_CHECK_FAILED
    assert f"pid {second}" in text and f"pid {first}" not in text


def test_pattern_narrows_to_one_cluster(tree: FakeProc) -> None:
    postmaster(tree, adj=0)
    unprotected = postmaster(tree, adj=1000, name="named_postmaster")
    code, _ = verify(tree, patterns=["postgres -D /pgdata/pgtf33d918b( |$)"])
    assert code == EXIT_OK
    code, text = verify(tree, patterns=["postgres -D /pgdata/pg"])
    assert code == EXIT_CHECK_FAILED and f"pid {unprotected}" in text


def test_fallback_finds_a_postmaster_the_default_pattern_misses(tree: FakeProc) -> None:
    # As watch does: with the default pattern matching nothing, the parent of postgres
    # processes. `-D<dir>` without a space is a postmaster the default pattern misses.
    argv = ["/usr/lib/postgresql/15/bin/postgres", "-D/pgdata/pgtf33d918b"]
    pid = postmaster(tree, adj=0, argv=argv)
    tree.install("backend", uid=ME)
    code, text = verify(tree, as_json=True)
    assert code == EXIT_OK
    doc = json.loads(text)
    assert [p["pid"] for p in doc["postmasters"]] == [pid]
    assert doc["postmasters"][0]["how"].startswith("fallback: ")


def test_no_fallback_once_a_pattern_is_given(tree: FakeProc) -> None:
    # Naming what to protect turns the guessing off: another cluster is not "found".
    postmaster(tree, adj=0)
    tree.install("backend", uid=ME)
    code, _ = verify(tree, patterns=["no-such-command"])
    assert code == EXIT_NOT_FOUND


def test_data_dir_rule_finds_its_cluster(tree: FakeProc) -> None:
    pid = postmaster(tree, adj=0)
    code, text = verify(tree, patterns=["no-such-command"], data_dirs=["/pgdata/pgtf33d918b"])
    assert code == EXIT_OK
    assert f"pid {pid}" in text


def test_json_document(tree: FakeProc) -> None:
    pid = postmaster(tree, adj=1000)
    code, text = verify(tree, score=0, as_json=True)
    doc = json.loads(text)
    assert code == EXIT_CHECK_FAILED
    assert doc["ok"] is False and doc["exit_code"] == EXIT_CHECK_FAILED
    assert doc["score"] == 0
    assert doc["reason"].startswith("not protected")
    (found,) = doc["postmasters"]
    assert found["pid"] == pid
    assert found["oom_score_adj"] == 1000 and found["protected"] is False
    assert found["data_dir"] == "/pgdata/pgtf33d918b"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": -1.0}, "--timeout -1 must be 0 or more"),
        ({"score": -1001}, "--score -1001 is out of range"),
        ({"patterns": ["("]}, "is not a valid regular expression"),
        ({"data_dirs": ["relative/dir"]}, "must be an absolute path"),
    ],
)
def test_bad_options_are_usage_errors(
    tree: FakeProc, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        verify(tree, **kwargs)  # type: ignore[arg-type]
