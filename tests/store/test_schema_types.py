"""UtcDateTime on SQLite writes its own text for speed; it must be the text
SQLAlchemy's DATETIME writes, or times written by the driver-cursor paths
and by SQLAlchemy's own statements would not compare as equal or in order."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from runjobs.schema import UtcDateTime

DIALECT = sqlite.dialect()
UTC = dt.timezone.utc


@pytest.mark.parametrize("value", [
    dt.datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC),                  # no microseconds
    dt.datetime(2026, 11, 22, 10, 0, 0, 1, tzinfo=UTC),
    dt.datetime(999, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC),             # a three-digit year
    dt.datetime(2026, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
])
def test_sqlite_text_is_sqlalchemys(value):
    ours = UtcDateTime().dialect_impl(DIALECT).bind_processor(DIALECT)
    theirs = sa.DateTime().dialect_impl(DIALECT).bind_processor(DIALECT)
    assert ours(value) == theirs(value.astimezone(UTC).replace(tzinfo=None))
    assert ours(None) is None


def test_sqlite_refuses_a_naive_time():
    process = UtcDateTime().dialect_impl(DIALECT).bind_processor(DIALECT)
    with pytest.raises(ValueError, match="naive datetime"):
        process(dt.datetime(2026, 11, 22, 10, 0))
