"""Every SQL statement of runjobs, on SQLite and PostgreSQL.

Nothing else imports SQLAlchemy's engine or a driver. One module per
concern, read top to bottom:

- `dialect`: the one seam between the two databases, chosen once;
- `connections`: transactions, kept connections, statements on the cursor
  (`driver` compiles and prepares them);
- `submit`: new jobs; `claim` (with `plain_round`) and `finish`: the
  runner's round; `control`: cancel, expiry, progress; `runners`: runner
  rows and the rescue of dead ones; `reads`: what people and checks read;
  `listen`: PostgreSQL's NOTIFY.

Every status change is a compare-and-set on the status it expects, so a
cancel and a finish, or two runners, can never both win. The database
records each change in job_events itself (triggers, see migrations/versions
0002 to 0004), in the same transaction.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..config import Settings, mask_url
from ..errors import SchemaError
from ..schema import HEAD_REVISION
from .claim import ClaimQueries
from .control import ControlQueries
from .dialect import dialect_for, utcnow
from .reads import ReadQueries
from .runners import RunnerQueries, RunnerRow
from .submit import SubmitQueries, Submitted

__all__ = ["RunnerRow", "Store", "Submitted", "make_engine", "open_store", "utcnow"]


class Store(SubmitQueries, ClaimQueries, ControlQueries, RunnerQueries, ReadQueries):
    """The queue: every query module's methods on one set of connections.
    Build it with `open_store(settings)`."""


def make_engine(settings: Settings) -> sa.engine.Engine:
    """The engine for the configured database, as its dialect builds it."""
    return dialect_for(settings.database_url).create_engine(settings)


def open_store(settings: Settings, *, upgrade: bool = True) -> Store:
    """A store on the configured database, its schema at head.

    The embedded SQLite default upgrades its own schema; PostgreSQL never
    changes schema unasked: SchemaError names the command that fixes it.
    StoreError when the database cannot be reached.
    """
    store = Store(make_engine(settings), settings)
    revision = store.schema_revision()
    if revision == HEAD_REVISION:
        return store
    if store.dialect.upgrades_itself and upgrade:
        from .. import migrate  # Alembic is heavy: only when there is work for it.
        migrate.upgrade(store)
        return store
    where = mask_url(settings.database_url)
    if revision is None:
        raise SchemaError(f"{where} has no runjobs schema: run `runjobs db upgrade`")
    raise SchemaError(
        f"{where} is at schema revision {revision}, this runjobs needs {HEAD_REVISION}: "
        "run `runjobs db upgrade`")
