"""Alembic migrations, shipped inside the runjobs package as runjobs.migrations."""
