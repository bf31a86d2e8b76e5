"""Alembic revisions; Alembic loads them by path, this file makes them ship in the wheel."""
