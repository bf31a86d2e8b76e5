"""The house's import rules, read from the source (every import, also those
inside functions, which is where runjobs imports lazily):

- only the store, the tables (schema) and Alembic's wrapper talk SQL: no
  other module imports SQLAlchemy or a database driver;
- executing a job never touches the database: actions, executor,
  isolation, the job threads and process groups import neither the store
  nor the runner;
- the CLI and the Python API use what the store exports, never a private
  name of it (`_x`) or one of its inner modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "runjobs"
DATABASE_LIBRARIES = ("sqlalchemy", "psycopg2", "sqlite3", "alembic")
SQL_MODULES = {"store", "schema", "migrate"}
EXECUTION = {"actions", "executor", "isolation", "jobthreads", "groups"}
FRONTS = {"cli", "api"}


def module_name(path: Path) -> str:
    """'store' for runjobs/store.py or runjobs/store/__init__.py, 'store.round' below it."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module imported, names taken from it) for every import in the file;
    runjobs' own modules as 'runjobs.x', relative ones resolved."""
    found = []
    package = ["runjobs", *module_name(path).split(".")[:-1]] if path.name != "__init__.py" \
        else ["runjobs", *module_name(path).split(".")]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(filter(None, [*base, node.module or ""]))
            found.append((target, tuple(alias.name for alias in node.names)))
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))
           if "migrations" not in path.parts}


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_store_and_the_tables_import_a_database_library(name):
    if top(name) in SQL_MODULES:
        return
    used = {target for target, _ in imports_of(MODULES[name])
            if top(target) in DATABASE_LIBRARIES}
    assert not used, f"runjobs.{name} imports {sorted(used)}: SQL belongs in the store"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if top(n) in EXECUTION))
def test_executing_a_job_never_imports_the_store_or_the_runner(name):
    used = {target for target, _ in imports_of(MODULES[name])
            if target.startswith(("runjobs.store", "runjobs.runner", "runjobs.rescue"))}
    assert not used, f"runjobs.{name} imports {sorted(used)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if top(n) in FRONTS))
def test_the_cli_and_the_api_use_only_what_the_store_exports(name):
    for target, names in imports_of(MODULES[name]):
        if not target.startswith("runjobs.store"):
            continue
        assert target == "runjobs.store", f"runjobs.{name} reaches into {target}"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"runjobs.{name} imports private {private} from the store"


def test_the_rules_see_imports_inside_functions():
    """The runner's duties import rescue lazily, inside a method: the walk
    finds it."""
    assert "runjobs.rescue" in {target for target, _ in imports_of(MODULES["duties"])}


# A decision by database, spelled any of the ways it was spelled before the
# seam: only runjobs/store/dialect.py may make one.
DIALECT_DECISION = re.compile(
    r"\bis_postgres\b|\bis_sqlite\b|dialect\.name\s*[!=]=|[!=]=\s*['\"](sqlite|postgresql)['\"]")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "store.dialect"))
def test_no_module_but_the_dialect_seam_tells_the_databases_apart(name):
    found = [line.strip() for line in MODULES[name].read_text().splitlines()
             if DIALECT_DECISION.search(line)]
    assert not found, f"runjobs.{name} decides by database: {found}"


def test_the_seam_is_where_the_decisions_are():
    """The pattern does find the decisions: the seam itself is full of them."""
    text = MODULES["store.dialect"].read_text()
    assert DIALECT_DECISION.search('if self.is_postgres:')
    assert DIALECT_DECISION.search('return value if dialect.name == "sqlite" else None')
    assert "class SQLite(Dialect)" in text and "class PostgreSQL(Dialect)" in text
