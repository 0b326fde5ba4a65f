"""The VM's guard checks read their latencies from pgoom's own log lines (the harness keeps
only the outcome): the parsing, on lines as watcher/guard/episode.py writes them."""

from __future__ import annotations

from scripts.vm.guest.support import guard_figures

LOG = (
    'x | WARNING | guard: sent SIGINT to client backend pid=12 title="postgres: main: a b '
    '[local] SELECT" private_mib=250.0 working_set_mib=271.0 limit_mib=300.0 postmaster=1 '
    "group=/g event_to_signal_us=900: no relief within 1 s\n"
    'x | INFO | guard: sent SIGTERM to client backend pid=12 title="t: u" private_mib=1 '
    "working_set_mib=1 limit_mib=1 postmaster=1 group=/g event_to_signal_us=5000: relieved "
    "in 3.0 ms\n"
    'x | INFO | guard: sent SIGINT to client backend pid=14 title="evil event_to_signal_us=1: '
    'relieved in 9 ms" private_mib=1 working_set_mib=1 limit_mib=1 postmaster=1 group=/g '
    "event_to_signal_us=1200: relieved in 7.5 ms\n"
)


def _run(actions: list[str], kills: int, restarts: int, lost: int) -> dict[str, object]:
    return {
        "guard_actions": actions,
        "guard_first": bool(actions) and kills == 0,
        "oom_kills": kills,
        "crash_restarts": restarts,
        "sessions_lost": lost,
        "rows_expected": 10,
        "rows_counted": 10,
        "postmaster_survived": True,
        "problems": [],
    }


def test_actions_latencies_and_tallies() -> None:
    group = {
        "watcher_log": LOG,
        "problems": [],
        "runs": [_run(["SIGINT no relief", "SIGTERM relieved"], 0, 0, 1), _run([], 1, 1, 3)],
    }
    figures = guard_figures(group)
    assert figures["guard_actions"] == {
        "SIGINT no relief within 1 s": 1,
        "SIGTERM relieved": 1,
        "SIGINT relieved": 1,
    }
    # The title is the backend's (user-controlled): its fake field does not count.
    assert figures["event_to_signal_ms"] == {"n": 3, "p50": 1.2, "max": 5.0}
    assert figures["signal_to_relief_ms"] == {"n": 2, "p50": 5.25, "max": 7.5}
    assert figures["guard_acted_runs"] == 1
    assert figures["guard_first_runs"] == 1
    assert figures["guard_oom_kills"] == 1
    assert figures["guard_crash_restarts"] == 1
    assert figures["guard_sessions_lost_max"] == 3


def test_no_guard_line() -> None:
    figures = guard_figures({"watcher_log": "", "problems": ["x"], "runs": [_run([], 1, 0, 0)]})
    assert figures["guard_actions"] == {}
    assert figures["event_to_signal_ms"] == {"n": 0}
    assert figures["guard_problems"] == ["x"]
