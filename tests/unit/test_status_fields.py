"""parse.status_fields picks the same values parse_status does, for the keys asked only."""

from __future__ import annotations

from watcher.parse import parse_status, status_fields

SAMPLE = (
    "Name:\tpostgres\nUmask:\t0077\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\n"
    "Pid:\t4242\nPPid:\t1\nUid:\t26\t26\t26\t26\nGid:\t26\t26\t26\t26\n"
    "NSpid:\t4242\t17\nCapEff:\t0000000000000000"  # last line without a newline
)


def test_same_values_as_the_full_parse() -> None:
    full = parse_status(SAMPLE)
    picked = status_fields(SAMPLE, "Name", "Uid", "NSpid", "CapEff")
    assert picked == {k: full[k] for k in ("Name", "Uid", "NSpid", "CapEff")}


def test_missing_keys_are_absent_and_prefixes_do_not_match() -> None:
    assert status_fields(SAMPLE, "NSpgid", "Ui", "Missing") == {}
    assert status_fields(SAMPLE, "Pid") == {"Pid": "4242"}  # not PPid, not Tgid
