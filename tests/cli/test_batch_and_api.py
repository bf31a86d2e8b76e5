"""`submit --batch` and the Python API, on both databases."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

import runjobs
from runjobs.config import pg_url
from runjobs.api import Client
from runjobs.errors import UsageError
from runjobs.limits import DURATION_MAX, INT_MAX, INT_MIN, PARAMS_MAX_BYTES, PARAMS_MAX_DEPTH
from runjobs.models import Status

from conftest import cli, runjobs_cmd


def count(store) -> int:
    return len(store.jobs_list(limit=10_000))


def test_batch_stores_every_line_in_order_and_prints_ids(environ, store):
    lines = "\n".join([
        '{"action": "noop", "priority": 3}',
        "",
        '{"action": "sleep", "params": {"seconds": 1}, "in": "10m", "key": "k1"}',
        '{"action": "noop", "at": "2030-01-01T00:00:00Z", "max_start": "2030-01-02T00:00:00Z",'
        ' "timeout": "90s", "retries": 2, "needs": {"io": 2}, "hold": true}',
    ]) + "\n"
    result = cli(environ, "submit", "--batch", "-", input=lines)
    assert result.returncode == 0, result.stderr
    ids = [int(x) for x in result.stdout.split()]
    assert len(ids) == 3 and ids == sorted(ids)
    first, second, third = (store.job_get(i) for i in ids)
    assert (first.action, first.priority, first.status) == ("noop", 3, Status.PENDING)
    assert second.params == {"seconds": 1} and second.key == "k1"
    assert second.run_at - second.created_at > dt.timedelta(minutes=9)
    assert third.status is Status.HELD and third.retries == 2 and third.timeout == 90
    assert third.needs == {"io": 2}
    assert third.run_at == dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("bad_line, names", [
    ('{"action": "nope"}', "line 2: unknown action 'nope'"),
    ("{broken", "line 2: not JSON"),
    ('{"action": "noop", "in": "5x"}', "line 2: in:"),
    ('{"action": "noop", "colour": "red"}', "line 2: unknown field(s): colour"),
    ('{"action": "noop", "at": "2030-01-01T00:00:00"}', "line 2: at:"),
    ('["noop"]', "line 2: expected an object"),
])
def test_a_bad_line_rejects_the_whole_batch(environ, store, bad_line, names):
    before = count(store)
    result = cli(environ, "submit", "--batch", "-", input=f'{{"action": "noop"}}\n{bad_line}\n')
    assert result.returncode == 2
    assert result.stdout == ""
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert count(store) == before


def test_batch_refuses_an_action_argument_too(environ, store):
    result = cli(environ, "submit", "noop", "--batch", "-", input='{"action": "noop"}\n')
    assert result.returncode == 2 and count(store) == 0


def test_python_api_submit_submit_many_get_cancel_wait(environ, settings, monkeypatch):
    client = Client(settings)
    try:
        job_id = client.submit("sleep", {"seconds": 0}, priority=4, retries=1)
        job = client.get(job_id)
        assert (job.action, job.priority, job.retries, job.params) == ("sleep", 4, 1, {"seconds": 0})
        ids = client.submit_many([{"action": "noop"}, {"action": "noop", "priority": 2}])
        assert len(ids) == 2 and ids[0] < ids[1]
        with pytest.raises(UsageError, match="job 2: unknown action"):
            client.submit_many([{"action": "noop"}, {"action": "os:system"}])
        assert len(client.store.jobs_list(limit=100)) == 3  # all or none
        assert client.cancel(ids[1]) is Status.CANCELED
        runner = subprocess.run(runjobs_cmd("run", "--once"), env=environ, timeout=60)
        assert runner.returncode == 0
        assert client.wait(job_id, timeout=10).status is Status.SUCCESS
        with pytest.raises(UsageError, match="unknown action"):
            client.submit("os:system")
    finally:
        client.close()


def test_module_level_submit_uses_the_configured_settings(environ):
    # runjobs.submit reads RUNJOBS_* like the CLI: run it in a fresh process.
    code = ("import runjobs; print(runjobs.submit('noop', {'n': 1}, priority=2)); "
            "print(runjobs.submit_many([{'action': 'noop'}]))")
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, many = result.stdout.split("\n")[:2]
    shown = cli(environ, "show", first, "--json")
    assert '"priority": 2' in shown.stdout and '"n": 1' in shown.stdout
    assert many == f"[{int(first) + 1}]"


def test_connect_takes_a_database_url(db_url, tmp_path, monkeypatch):
    """The URL given wins over the environment's database (here one in
    another home): the job is found in the database the URL names, by a
    connection of its own, and nothing is written elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("RUNJOBS_HOME", str(elsewhere))
    monkeypatch.setenv("RUNJOBS_DATABASE_URL", f"sqlite:///{elsewhere / 'other.db'}")
    monkeypatch.delenv("RUNJOBS_CONFIG", raising=False)
    client = runjobs.connect(db_url)
    try:
        job_id = client.submit("noop", {"marker": "connect"})
        assert client.get(job_id).status is Status.PENDING
    finally:
        client.close()
    engine = sa.create_engine(pg_url(db_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT action, params FROM jobs WHERE id = :id"),
                              {"id": job_id}).one()
    engine.dispose()
    assert stored.action == "noop" and "connect" in str(stored.params)
    assert not (elsewhere / "other.db").exists()


def nested(levels: int) -> dict:
    """Params nested `levels` deep, the params object itself being level 1."""
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.fixture
def client(settings):
    client = Client(settings)
    yield client
    client.close()


def test_python_api_stores_values_at_the_edges_of_the_limits(client):
    at_limit = {"a": "x" * (PARAMS_MAX_BYTES - len('{"a": ""}'))}
    first = client.get(client.submit("noop", at_limit, priority=INT_MAX, retries=INT_MAX,
                                     timeout=DURATION_MAX,
                                     run_at=dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc)))
    assert (first.priority, first.retries, first.timeout) == (INT_MAX, INT_MAX, DURATION_MAX)
    assert first.params == at_limit and first.run_at.year == 1
    second = client.get(client.submit("noop", nested(PARAMS_MAX_DEPTH), priority=INT_MIN))
    assert second.priority == INT_MIN and second.params == nested(PARAMS_MAX_DEPTH)


def cyclic() -> dict:
    params: dict = {}
    params["self"] = params
    return params


# (options of Client.submit, a text the UsageError must contain); the same
# bounds as the CLI's, on both databases, before anything is written.
BAD_API_OPTIONS = [
    pytest.param({"priority": INT_MAX + 1}, "priority", id="priority-above-int"),
    pytest.param({"priority": INT_MIN - 1}, "priority", id="priority-below-int"),
    pytest.param({"priority": 10**20}, "priority", id="huge-priority"),
    pytest.param({"retries": INT_MAX + 1}, "retries", id="retries-above-int"),
    pytest.param({"params": nested(PARAMS_MAX_DEPTH + 1)}, "params: nested deeper than 100",
                 id="params-101-levels"),
    pytest.param({"params": nested(40_000)}, "params: nested deeper", id="params-40000-levels"),
    pytest.param({"params": cyclic()}, "params: nested deeper", id="params-cycle"),
    pytest.param({"params": {"a": "x" * PARAMS_MAX_BYTES}}, "params: 1048585 bytes of JSON",
                 id="params-over-1mib"),
    pytest.param({"run_at": dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=14)))},
                 "run_at: 0001-01-01T00:00:00+14:00 is out of range", id="run-at-before-year-1"),
    pytest.param({"max_start_at": dt.datetime(9999, 12, 31, 23,
                                              tzinfo=dt.timezone(dt.timedelta(hours=-14)))},
                 "max_start_at", id="max-start-after-year-9999"),
    pytest.param({"timeout": float("inf")}, "timeout", id="timeout-inf"),
    pytest.param({"timeout": dt.timedelta(days=36501)}, "timeout", id="timeout-over-100-years"),
    pytest.param({"key": "k\udcff"}, "key: not UTF-8", id="key-not-utf8"),
    pytest.param({"key": "k\x00"}, "key: holds a NUL", id="key-with-nul"),
    pytest.param({"hold": "no"}, "hold: expected true or false", id="hold-a-string"),
    pytest.param({"action": ["noop"]}, "action: expected a name", id="action-a-list"),
]


@pytest.mark.parametrize("options, names", BAD_API_OPTIONS)
def test_python_api_refuses_values_out_of_range(client, options, names):
    job = {"action": "noop", **options}
    with pytest.raises(UsageError, match="^" + re.escape(names)):
        client.submit(**job)
    with pytest.raises(UsageError, match="^job 2: " + re.escape(names)):
        client.submit_many([{"action": "noop"}, job])
    assert count(client.store) == 0
