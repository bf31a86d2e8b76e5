"""Alembic, driven from runjobs: `db upgrade`, `db current`, first-use SQLite."""

from __future__ import annotations

from pathlib import Path

from .errors import RunjobsError
from .store import Store


def migrations_dir() -> Path:
    """The Alembic scripts: the runjobs.migrations package, which an install
    (wheel or editable) maps from the checkout's migrations/ folder."""
    from . import migrations

    return Path(migrations.__file__).resolve().parent


def _config(connection=None):
    from alembic.config import Config

    location = migrations_dir()
    if not (location / "env.py").is_file():
        raise RunjobsError(f"migrations not found at {location}: reinstall runjobs")
    config = Config()
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision in migrations/."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(store: Store, revision: str = "head") -> None:
    """Upgrade in one transaction; on SQLite that transaction holds the write
    lock from its start, so two first uses at once cannot both create tables."""
    from alembic import command

    with store.engine.begin() as conn:
        command.upgrade(_config(conn), revision)


def downgrade(store: Store, revision: str) -> None:
    from alembic import command

    with store.engine.begin() as conn:
        command.downgrade(_config(conn), revision)
