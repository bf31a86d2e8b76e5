"""Bad input to submit, list and show: exit 2 (1 for a job that is not
there), one line on stderr naming the bad part, nothing on stdout, and
nothing written: not a job, and on a fresh SQLite home not even the file.

The values out of range (issue 12, item 6) are refused the same way on both
databases, before either is opened: runjobs.limits has the bounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import PG_URL, REPO, cli, cli_process, write_config
from runjobs.limits import BATCH_LINE_MAX_BYTES, PARAMS_MAX_BYTES
from runjobs.models import JobSpec
from runjobs.store import open_store

DEEP = "[" * 40_000  # the decoder's recursion ran out at about 1,000

# (argv, a text the error line must contain)
BAD_INPUT = [
    pytest.param(("submit", "os:system"), "os:system", id="unknown-action"),
    pytest.param(("submit", "tests.import_marker:run"), "tests.import_marker:run",
                 id="unknown-action-module-path"),
    pytest.param(("submit", "noop", "seconds"), "seconds", id="key-without-equals"),
    pytest.param(("submit", "noop", "=5"), "=5", id="empty-key"),
    pytest.param(("submit", "noop", "--params", '{"a": 1'), "--params", id="broken-params-json"),
    pytest.param(("submit", "noop", "--params", "[1, 2]"), "--params", id="params-not-object"),
    pytest.param(("submit", "noop", "hosts:=[a,b]"), "hosts:=[a,b]", id="broken-key-json"),
    pytest.param(("submit", "noop", "--in", "5x"), "5x", id="bad-in-duration"),
    pytest.param(("submit", "noop", "--timeout", "abc"), "abc", id="bad-timeout-duration"),
    pytest.param(("submit", "noop", "--at", "yesterday"), "yesterday", id="bad-at-time"),
    pytest.param(("submit", "noop", "--at", "2030-01-02T03:04:05"), "2030-01-02T03:04:05",
                 id="time-without-zone"),
    pytest.param(("submit", "noop", "--max-start", "soon"), "soon", id="bad-max-start"),
    pytest.param(("submit", "noop", "--needs", "scan"), "scan", id="bad-needs"),
    pytest.param(("submit", "noop", "--retries", "-1"), "--retries", id="negative-retries"),
    pytest.param(("submit", "noop", "--at", "now", "--in", "5m"), "--at", id="at-and-in"),
    pytest.param(("list", "--status", "BOGUS"), "BOGUS", id="unknown-status"),
    pytest.param(("list", "--limit", "0"), "--limit", id="zero-limit"),
    pytest.param(("show", "abc"), "abc", id="show-not-a-number"),
    # issue 12, item 6
    pytest.param(("submit", "noop", "a:=" + DEEP), "a:=", id="deep-key-json"),
    pytest.param(("submit", "noop", "a:=" + "[" * 100 + "]" * 100), "params: nested deeper",
                 id="key-json-one-level-too-deep"),
    pytest.param(("submit", "noop", "--params", '{"a": ' + DEEP), "--params", id="deep-params"),
    pytest.param(("submit", "noop", "--priority", "99999999999999999999"), "--priority",
                 id="huge-priority"),
    pytest.param(("submit", "noop", "--priority", "2147483648"), "--priority",
                 id="priority-above-integer"),
    pytest.param(("submit", "noop", "--priority", "-2147483649"), "--priority",
                 id="priority-below-integer"),
    pytest.param(("submit", "noop", "--retries", "99999999999999999999"), "--retries",
                 id="huge-retries"),
    pytest.param(("submit", "noop", "--in", "99999999999d"), "99999999999d", id="in-too-long"),
    pytest.param(("submit", "noop", "--in", "1e300"), "1e300", id="in-1e300"),
    pytest.param(("submit", "noop", "--in", "36501d"), "100 years", id="in-over-100-years"),
    pytest.param(("submit", "noop", "--timeout", "inf"), "--timeout", id="timeout-inf"),
    pytest.param(("run", "--once", "--period", "inf"), "--period", id="period-inf"),
    pytest.param(("submit", "noop", "--at", "0001-01-01T00:00:00+14:00"),
                 "0001-01-01T00:00:00+14:00", id="at-before-year-1-in-utc"),
    pytest.param(("submit", "noop", "--at", "9999-12-31T23:59:59-14:00"),
                 "9999-12-31T23:59:59-14:00", id="at-after-year-9999-in-utc"),
    pytest.param(("submit", "noop", "--max-start", "9999-12-31T23:59:59-14:00"),
                 "--max-start", id="max-start-after-year-9999-in-utc"),
    # Bytes that are not UTF-8 reach the CLI as surrogate escapes.
    pytest.param(("submit", "noop", "--key", b"k\xff"), "key: not UTF-8", id="key-not-utf8"),
    pytest.param(("list", "--limit", "99999999999999999999"), "--limit", id="huge-limit"),
    pytest.param(("list", "--limit", "100001"), "--limit", id="limit-above-100000"),
    pytest.param(("runners", "--limit", "99999999999999999999"), "--limit",
                 id="huge-runners-limit"),
    pytest.param(("show", "99999999999999999999"), "ID", id="show-huge-id"),
    pytest.param(("show", "9223372036854775808"), "ID", id="show-id-above-bigint"),
    pytest.param(("log", "99999999999999999999"), "ID", id="log-huge-id"),
    pytest.param(("cancel", "1", "99999999999999999999"), "ID", id="cancel-huge-id"),
]


def sqlite_file(environ: dict[str, str]) -> Path | None:
    url = environ["RUNJOBS_DATABASE_URL"]
    return Path(sa.make_url(url).database) if url.startswith("sqlite") else None


def job_ids(settings) -> list[int]:
    store = open_store(settings)
    try:
        return [job.id for job in store.jobs_list(limit=1000)]
    finally:
        store.dispose()


def check_rejected(result, code: int, names: str) -> None:
    assert result.returncode == code, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0], lines[0]


def check_writes_nothing(environ, settings, names, *args, input=None) -> None:
    """`runjobs ARGS` exits 2 naming the bad part, on a fresh home (without
    creating even the SQLite file: nothing is opened before the input is
    checked) and beside a job, which it leaves alone. In process, but for
    `run` and bytes in argv (a real interpreter decodes those)."""
    real = args[0] == "run" or any(isinstance(arg, bytes) for arg in args)
    call = cli_process if real else cli
    database = sqlite_file(environ)
    if database is not None:
        check_rejected(call(environ, *args, input=input), 2, names)
        assert not database.exists(), "bad input created the SQLite file"

    store = open_store(settings)
    try:
        store.jobs_submit([JobSpec("noop")])
    finally:
        store.dispose()
    before = job_ids(settings)
    check_rejected(call(environ, *args, input=input), 2, names)
    assert job_ids(settings) == before


@pytest.mark.parametrize("args, names", BAD_INPUT)
def test_bad_input_exits_2_and_writes_nothing(environ, settings, args, names):
    check_writes_nothing(environ, settings, names, *args)


def batch_line(**fields) -> bytes:
    return json.dumps({"action": "noop", **fields}).encode()


# (a batch line as bytes, a text the error line must contain); each line
# comes after a good one, so the good one must not be stored either.
BAD_BATCH_LINES = [
    pytest.param(b'{"action": "noop", "params": {"a": ' + DEEP.encode() + b"}}",
                 "line 2: nested deeper than 100 levels", id="deep-params"),
    pytest.param(batch_line(priority=99999999999999999999), "line 2: priority",
                 id="huge-priority"),
    pytest.param(batch_line(priority=2147483648), "line 2: priority", id="priority-above-int"),
    pytest.param(batch_line(retries=99999999999999999999), "line 2: retries", id="huge-retries"),
    pytest.param(batch_line(**{"in": "99999999999d"}), "line 2: in:", id="in-too-long"),
    pytest.param(batch_line(timeout=1e300), "line 2: timeout:", id="timeout-1e300"),
    pytest.param(batch_line(at="0001-01-01T00:00:00+14:00"), "line 2: at:",
                 id="at-before-year-1-in-utc"),
    pytest.param(b'{"action": "noop", "key": "k\xff"}', "line 2: not UTF-8",
                 id="key-not-utf8"),
    pytest.param(b'{"action": "noop", "params": {"a": "\xc3"}}', "line 2: not UTF-8",
                 id="params-not-utf8"),
    pytest.param(batch_line(key="k\x00"), "line 2: key: holds a NUL", id="key-with-nul"),
    pytest.param(batch_line(action=["noop"]), "line 2: action", id="action-a-list"),
    pytest.param(batch_line(action={"name": "noop"}), "line 2: action", id="action-an-object"),
    pytest.param(batch_line(hold="no"), "line 2: hold: expected true or false",
                 id="hold-a-string"),
    pytest.param(batch_line(hold=1), "line 2: hold", id="hold-a-number"),
    pytest.param(batch_line(needs={"default": 1e999}), "line 2: needs.default",
                 id="needs-infinite"),
    pytest.param(batch_line(params={"a": "x" * BATCH_LINE_MAX_BYTES}),
                 f"line 2: longer than the limit of {BATCH_LINE_MAX_BYTES} bytes",
                 id="line-over-its-limit"),
    pytest.param(batch_line(params={"a": "x" * PARAMS_MAX_BYTES}),
                 f"line 2: params: {PARAMS_MAX_BYTES + 9} bytes of JSON, more than the limit",
                 id="params-over-1mib"),
    # Under 1 MiB as a UTF-8 line, over it as stored (non-ASCII escaped).
    pytest.param(json.dumps({"action": "noop", "params": {"a": "\u00e9" * 200_000}},
                            ensure_ascii=False).encode(),
                 "line 2: params: 1200009 bytes of JSON, more than the limit of 1048576",
                 id="params-over-1mib-as-stored"),
]


@pytest.mark.parametrize("line, names", BAD_BATCH_LINES)
def test_bad_batch_line_exits_2_and_writes_nothing(environ, settings, tmp_path, line, names):
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(b'{"action": "noop"}\n' + line + b"\n")
    check_writes_nothing(environ, settings, names, "submit", "--batch", str(batch))


def test_params_up_to_the_limit_are_stored(environ, settings, tmp_path):
    text = json.dumps({"a": ""})
    params = {"a": "x" * (PARAMS_MAX_BYTES - len(text))}  # exactly the limit, as stored
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps({"action": "noop", "params": params}) + "\n")
    result = cli(environ, "submit", "--batch", str(batch))
    assert result.returncode == 0, result.stderr
    store = open_store(settings)
    try:
        assert store.job_get(int(result.stdout)).params == params
    finally:
        store.dispose()


def test_show_missing_job_exits_1(environ, store):
    (existing,) = store.jobs_submit([JobSpec("noop")])
    result = cli(environ, "show", "999")
    check_rejected(result, 1, "999")
    assert "does not exist" in result.stderr
    assert [j.id for j in store.jobs_list()] == [existing.id]


def test_show_missing_job_as_json_exits_1(environ, store):
    check_rejected(cli(environ, "show", "999", "--json"), 1, "999")
    assert store.jobs_list() == []


def test_run_with_a_margin_not_shorter_than_its_period_is_bad_input(environ):
    result = cli_process(environ, "run", "--once", "--period", "10s", "--margin", "10s")
    assert result.returncode == 2
    assert "margin" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# (environment, config file bytes or None, texts the error line must hold:
# the setting and where it came from)
BAD_SETTINGS = [
    pytest.param({}, b'node = "caf\xe9"\n', ["runjobs.toml", "not UTF-8"], id="toml-not-utf8"),
    pytest.param({}, b"capacity = {default = inf}\n", ["capacity.default", "runjobs.toml"],
                 id="capacity-inf-in-file"),
    pytest.param({}, b"crash_limit = inf\n", ["crash_limit", "runjobs.toml"],
                 id="crash-limit-inf"),
    pytest.param({}, b"warning_exit_codes = [inf]\n", ["warning_exit_codes", "runjobs.toml"],
                 id="warning-exit-code-inf"),
    pytest.param({}, b'retention = "99999999999d"\n', ["retention", "runjobs.toml"],
                 id="retention-too-long"),
    pytest.param({"RUNJOBS_CAPACITY": '{"default": 1e999}'}, None,
                 ["capacity.default", "RUNJOBS_CAPACITY"], id="capacity-1e999-in-env"),
    pytest.param({"RUNJOBS_WARNING_EXIT_CODES": "abc"}, None,
                 ["warning_exit_codes", "RUNJOBS_WARNING_EXIT_CODES"], id="exit-codes-abc"),
    pytest.param({"RUNJOBS_PERIOD": "inf"}, None, ["period", "RUNJOBS_PERIOD"], id="period-inf"),
    pytest.param({"RUNJOBS_DATABASE_URL": "garbage"}, None,
                 ["database_url", "RUNJOBS_DATABASE_URL"], id="url-garbage"),
    pytest.param({"RUNJOBS_DATABASE_URL": "mysql://jobs:s3cret@db/jobs"}, None,
                 ["database_url", "'mysql' is not supported", "RUNJOBS_DATABASE_URL"],
                 id="url-mysql"),
    pytest.param({"RUNJOBS_DATABASE_URL": "postgresql+psycopg://jobs:s3cret@db/jobs"}, None,
                 ["database_url", "psycopg2", "RUNJOBS_DATABASE_URL"], id="url-psycopg3"),
    pytest.param({"RUNJOBS_DATABASE_URL": "postgresql://jobs:s3cret@127.0.0.1:abc/jobs"},
                 None, ["database_url", "port", "RUNJOBS_DATABASE_URL"], id="url-port-abc"),
    # (the variable would win over the file)
    pytest.param({"RUNJOBS_DATABASE_URL": None},
                 b'database_url = "postgresql://jobs:s3cret@db:99999/jobs"\n',
                 ["database_url", "port", "runjobs.toml"], id="url-port-in-file"),
]


@pytest.mark.parametrize("env, toml, names", BAD_SETTINGS)
def test_bad_setting_exits_2_naming_it_and_where(environ, settings, tmp_path, env, toml, names):
    """Checked when settings load, before any database is opened: the jobs
    of the test database stay as they were, and no SQLite file appears."""
    home = tmp_path / "bad-home"
    bad = {k: v for k, v in {**environ, "RUNJOBS_HOME": str(home), **env}.items()
           if v is not None}
    if toml is not None:
        bad["RUNJOBS_CONFIG"] = str(write_config(home, ""))
        Path(bad["RUNJOBS_CONFIG"]).write_bytes(toml)
    before = job_ids(settings)
    for args in (("submit", "noop"), ("list",)):
        result = cli(bad, *args)
        check_rejected(result, 2, names[0])
        assert all(name in result.stderr for name in names), result.stderr
        assert "s3cret" not in result.stderr
    assert job_ids(settings) == before
    assert not (home / "runjobs.db").exists()


def with_password(url: str, password: str) -> str:
    """The URL with `password` put in as is (not percent-encoded)."""
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] or "runjobs"
    return f"{scheme}://{user}:{password}@{hostpart}"


# A password with an unencoded '@': the driver read 'p4ss@127.0.0.1' as the
# host and printed it in its connection error.
PASSWORD = "s3cr@p4ss"


def test_unreachable_database_with_an_at_in_the_password_prints_none_of_it(environ, settings):
    """Refused by the server, not bad input: exit 1, one line, and not one
    piece of the password."""
    bad = {**environ, "RUNJOBS_DATABASE_URL": f"postgresql://jobs:{PASSWORD}@127.0.0.1:1/jobs"}
    for args in (("submit", "noop"), ("list",), ("db", "current")):
        result = cli(bad, *args)
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert '"127.0.0.1", port 1' in result.stderr, result.stderr
        for part in ("s3cr", "p4ss"):
            assert part not in result.stdout + result.stderr
    assert job_ids(settings) == []


def test_an_at_in_the_password_connects_and_is_masked(pg_database_url, tmp_path):
    """The test server trusts its clients, so the password is not checked:
    the URL is read with the whole password, connects to the right host,
    and is printed masked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNJOBS_")}
    env.update(RUNJOBS_HOME=str(tmp_path), PYTHONPATH=str(REPO),
               RUNJOBS_CONFIG=str(write_config(tmp_path, "")),
               RUNJOBS_DATABASE_URL=with_password(PG_URL, PASSWORD))
    result = cli(env, "db", "current")
    assert result.returncode == 0, result.stderr
    assert ":***@" in result.stdout and "(at head)" in result.stdout, result.stdout
    for part in ("s3cr", "p4ss"):
        assert part not in result.stdout + result.stderr
