"""What a caller may give runjobs: the bounds, and the JSON checks that keep
them. Each bound is the same on SQLite and PostgreSQL and is checked before
the database is opened, so a value out of range is bad input (exit 2) on
both, never a driver error on one. docs/operations.md ("Limits") lists them.
"""

from __future__ import annotations

import json
import re
from typing import Any

# priority and retries: PostgreSQL's INTEGER. SQLite would store more, so
# the bound is ours, or a job stored on one database would not fit the other.
INT_MIN, INT_MAX = -2**31, 2**31 - 1
# Job ids: PostgreSQL's BIGINT (SQLite's INTEGER has the same range).
ID_MAX = 2**63 - 1
# `list --limit`, `runners --limit`: a page a terminal or a script can use.
LIST_LIMIT_MAX = 100_000
# Durations (--in, --timeout, --period, settings): 100 years. Far beyond any
# real wait, and far inside what datetime arithmetic can add to now.
DURATION_MAX = 100 * 365 * 86400.0
# A job's params: JSON text as stored (non-ASCII escaped), and nesting.
# Every `list` and every claim reads params back: a 50 MB document would
# cost each of them its size several times over in memory.
PARAMS_MAX_BYTES = 1024 * 1024
PARAMS_MAX_DEPTH = 100
# A `submit --batch` line: one job's fields, its params included. 64 KiB
# more than params, so that any job whose params fit has a line that fits
# (params in UTF-8 take no more bytes than stored, escaped).
BATCH_LINE_MAX_BYTES = PARAMS_MAX_BYTES + 64 * 1024

# JSON strings (where brackets are text, not structure), and brackets.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class LimitError(ValueError):
    """A JSON text or value beyond a limit; the message says which."""


def loads(text: str, outer: int = 0) -> Any:
    """json.loads for text from a caller, refusing before decoding what is
    longer than a batch line or nested deeper than PARAMS_MAX_DEPTH
    (plus `outer` levels around the params, as a batch line's object): the
    decoder recurses per level, so deep input must not reach it at all.

    Raises LimitError, or json.JSONDecodeError for text that is not JSON.
    """
    if len(text) > BATCH_LINE_MAX_BYTES:
        raise LimitError(f"longer than {BATCH_LINE_MAX_BYTES} characters")
    if _text_depth_over(text, PARAMS_MAX_DEPTH + outer):
        raise LimitError(f"nested deeper than {PARAMS_MAX_DEPTH} levels")
    return json.loads(text)


def _text_depth_over(text: str, most: int) -> bool:
    """Whether the brackets outside strings nest deeper than `most`. For
    text that is not JSON the answer may be off, but never below the depth
    the decoder reaches before it finds the error."""
    depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > most:
            return True
    return False


def value_depth_over(value: Any, most: int = PARAMS_MAX_DEPTH) -> bool:
    """Whether dicts and lists nest deeper than `most` (the value itself is
    level 1). Level by level, without recursion, so a value built in Python
    with any depth (or a cycle) is measured safely before json.dumps."""
    level = [value] if isinstance(value, (dict, list, tuple)) else []
    depth = 0
    while level:
        depth += 1
        if depth > most:
            return True
        level = [child for item in level
                 for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list, tuple))]
    return False


def params_text(params: dict[str, Any]) -> str:
    """The params as stored: JSON text, within depth and size.

    Raises LimitError, or TypeError/ValueError for what JSON cannot hold.
    """
    if value_depth_over(params):
        raise LimitError(f"nested deeper than {PARAMS_MAX_DEPTH} levels")
    text = json.dumps(params, allow_nan=False)
    if len(text) > PARAMS_MAX_BYTES:
        raise LimitError(f"{len(text)} bytes of JSON, more than the limit of "
                         f"{PARAMS_MAX_BYTES}")
    return text
