"""Alembic environment for runjobs.

`runjobs db upgrade` passes an open connection in config.attributes; the
plain `alembic` command (with -x url=...) gets one built from the URL.
"""

from alembic import context
import sqlalchemy as sa

from runjobs.schema import metadata, use_dialect

config = context.config


def run_migrations(connection) -> None:
    use_dialect(connection.dialect.name)  # the partial indexes' WHERE, for autogenerate
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        run_migrations(conn)
