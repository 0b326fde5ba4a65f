"""parse.conf_data_directory: the data_directory setting of a postgresql.conf."""

from __future__ import annotations

import pytest

from watcher.parse import conf_data_directory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data_directory = '/var/lib/postgresql/15/main'\n", "/var/lib/postgresql/15/main"),
        ("data_directory='/a' # moved\n", "/a"),
        ("data_directory '/b'\n", "/b"),
        ("data_directory = /c   # unquoted\n", "/c"),
        ("data_directory = 'it''s'\n", "it's"),
        ("# data_directory = '/commented'\n", None),
        ("data_directory_extra = '/no'\n", None),
        ("data_directory = '/first'\nport = 5432\ndata_directory = '/last'\n", "/last"),
        ("data_directory = 'unterminated\n", None),
        ("", None),
    ],
)
def test_conf_data_directory(text: str, expected: object) -> None:
    assert conf_data_directory(text) == expected
