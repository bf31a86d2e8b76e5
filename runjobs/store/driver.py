"""Hot statements run on the driver's cursor: compiled once by SQLAlchemy,
their parameters put in order here, prepared on PostgreSQL.

SQLAlchemy's execution (parameter and result processing) cost a round of
short jobs more than the database's own work, so the runner's round and a
single submit skip it (see `Connections._driver_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc


@dataclasses.dataclass(frozen=True)
class DriverSql:
    """A hot statement (the runner's round, a single submit) as text for the
    driver's cursor.

    Compiled once, its parameters put in order here: SQLAlchemy's execution
    (parameter and result processing) cost a round of short jobs more than
    the database's own work. On PostgreSQL it is a prepared statement, so
    the round is not planned again each time (half its server time).
    """

    sql: str                         # what the cursor executes
    names: tuple[str, ...]           # its parameters, in order
    fixed: dict[str, Any]            # values of the parameters the statement sets itself
    processors: dict[str, Callable[[Any], Any]]  # e.g. SQLite's times to text
    prepare: str | None = None       # PostgreSQL: the PREPARE to run once per connection
    name: str | None = None          # ... and the name it prepares

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        """The parameters in order: the caller's (each processed once, though
        SQLite's text names 'now' up to three times), else the statement's
        own, else the n-th of `ids` for ids_n."""
        given = {name: process(params[name])
                 for name, process in self.processors.items() if name in params}
        values = []
        for name in self.names:
            if name in given:
                values.append(given[name])
            elif name in params:
                values.append(params[name])
            elif name in self.fixed:
                values.append(self.fixed[name])
            else:  # ids_3: the third of the ids
                values.append(params["ids"][int(name.rpartition("_")[2]) - 1])
        return values


def json_loads(text: str) -> Any:
    """json.loads, but the texts of no params and no needs, which most jobs
    have, are known: decoding them was a round's largest cost in Python."""
    if text == "{}":
        return {}
    return None if text == "null" else json.loads(text)


def describe(exc: Exception) -> str:
    """One line about a driver error (raw, or wrapped by SQLAlchemy),
    without the SQL or any password."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    lines = str(orig).strip().splitlines() if orig else []
    return f"database error: {lines[0] if lines else type(exc).__name__}"


def compile_for_driver(statement: sa.Executable, dialect: sa.Dialect, ids: int,
                        columns: tuple[str, ...], prepare: bool) -> DriverSql:
    """See `DriverSql`. For PostgreSQL's PREPARE the text has $1..$n: it
    is compiled by a new instance of the engine's dialect class that writes
    parameters that way."""
    if prepare:
        dialect = type(dialect)(paramstyle="numeric_dollar")
    compiled = statement.compile(dialect=dialect, column_keys=list(columns) or None)
    # Render what SQLAlchemy leaves to execution time: IN lists of values,
    # and an expanding `ids` as ids_1 .. ids_n (taken from the list in order).
    required = {name for name, bind in compiled.binds.items() if bind.required}
    given = {name: [0] * ids if name == "ids" else 0 for name in required}
    expanded = compiled.construct_expanded_state(compiled.construct_params(given))
    sql, names = expanded.statement, tuple(expanded.positiontup)
    fixed = {name: value for name, value in expanded.parameters.items()
             if name not in required and not name.startswith("ids_")}
    binds = {name: bind.type.dialect_impl(dialect) for name, bind in compiled.binds.items()}
    processors = {name: _empty_json_fast(process) if isinstance(impl, sa.JSON) else process
                  for name, impl in binds.items()
                  if (process := impl.bind_processor(dialect)) is not None}
    fixed = {name: processors[name](value) if name in processors else value
             for name, value in fixed.items()}
    if not prepare:
        return DriverSql(sql, names, fixed, processors)
    name, prepare_sql, execute = _prepared(sql, names, binds, dialect)
    return DriverSql(execute, names, fixed, processors, prepare_sql, name)


def _empty_json_fast(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON parameter's processor that skips json.dumps for what most
    jobs hold: no params ({}) and no needs (None)."""
    empty, null = process({}), process(None)

    def fast(value: Any) -> Any:
        if value is None:
            return null
        if type(value) is dict and not value:
            return empty
        return process(value)
    return fast


def _prepared(sql: str, names: tuple[str, ...], binds: Mapping[str, sa.types.TypeEngine],
              dialect: sa.Dialect) -> tuple[str, str, str]:
    """PostgreSQL: the name, the PREPARE and the EXECUTE of `sql`. Each
    parameter is typed as SQLAlchemy types it; 'unknown' lets the server
    infer one. The name comes from the text, so a connection never holds
    two statements under one name."""
    types = []
    for name in names:
        try:
            types.append(binds[name].compile(dialect) if name in binds else "unknown")
        except sa_exc.CompileError:  # no type of its own (NullType)
            types.append("unknown")
    name = "runjobs_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
    prepare = f"PREPARE {name} ({', '.join(types)}) AS {sql}"
    execute = f"EXECUTE {name} ({', '.join(['%s'] * len(names))})" if names else f"EXECUTE {name}"
    return name, prepare, execute


# -- building a store -------------------------------------------------------------
