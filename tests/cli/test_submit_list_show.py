"""submit, list, show, log, cancel and submit --wait against a real
database (SQLite file and PostgreSQL): in process, but for `run` and the
waiters of `submit --wait`, which are real processes (test_entry_point.py
has the smoke tests of the real entry point)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess

import pytest

from conftest import cli, cli_process, runjobs_cmd, wait_for
from runjobs.models import JobSpec, Status

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")


def ok(result) -> str:
    assert result.returncode == 0, result
    return result.stdout


def submit(environ, *args) -> int:
    out = ok(cli(environ, "submit", *args))
    assert re.fullmatch(r"\d+\n", out), out  # the id alone
    return int(out)


def show_json(environ, job_id: int) -> dict:
    return json.loads(ok(cli(environ, "show", str(job_id), "--json")))


def parse_time(text: str) -> dt.datetime:
    assert ISO_UTC.match(text), text
    return dt.datetime.fromisoformat(text)


# -- submit ---------------------------------------------------------------------

def test_submit_prints_the_id_alone_and_stores_the_job(environ, store):
    out = ok(cli(environ, "submit", "noop"))
    assert re.fullmatch(r"\d+\n", out), out
    job = store.job_get(int(out))
    assert (job.action, job.status, job.params) == ("noop", Status.PENDING, {})
    assert [j.id for j in store.jobs_list()] == [job.id]


def test_params_strings_json_values_and_params_merged_under(environ, store):
    job_id = submit(environ, "noop", "name=5", "seconds:=5", 'hosts:=["a","b"]',
                    "flag:=true", "empty=", "eq=a=b",
                    "--params", '{"name": "under", "seconds": 1, "extra": {"x": null}}')
    assert store.job_get(job_id).params == {
        "name": "5",            # KEY=VALUE: a string, even when it looks like a number
        "seconds": 5,           # KEY:=JSON: a JSON value, winning over --params
        "hosts": ["a", "b"],
        "flag": True,
        "empty": "",
        "eq": "a=b",            # only the first = splits
        "extra": {"x": None},   # --params: kept where nothing overrides it
    }


def test_options_are_stored_as_given(environ):
    job_id = submit(environ, "noop", "--priority", "-3", "--at", "2030-01-02T03:04:05+02:00",
                    "--max-start", "2030-01-03T00:00:00Z", "--timeout", "1h30m",
                    "--retries", "2", "--needs", "scan=1", "--needs", "io=2",
                    "--key", "nightly", "--hold")
    job = show_json(environ, job_id)
    assert job["id"] == job_id
    assert job["priority"] == -3
    assert parse_time(job["run_at"]) == dt.datetime(2030, 1, 2, 1, 4, 5, tzinfo=dt.timezone.utc)
    assert job["run_at"] == "2030-01-02T01:04:05+00:00"
    assert parse_time(job["max_start_at"]) == dt.datetime(2030, 1, 3, tzinfo=dt.timezone.utc)
    assert job["timeout"] == 5400
    assert job["retries"] == 2
    assert job["needs"] == {"scan": 1, "io": 2}
    assert job["key"] == "nightly"
    assert job["status"] == "HELD"


def test_in_is_counted_from_the_submit_and_defaults_apply(environ):
    job_id = submit(environ, "noop", "--in", "10m")
    job = show_json(environ, job_id)
    delay = parse_time(job["run_at"]) - parse_time(job["created_at"])
    assert abs(delay.total_seconds() - 600) < 5
    assert job["status"] == "PENDING"
    assert job["priority"] == 0 and job["retries"] == 0
    assert job["needs"] == {"default": 1}
    assert job["timeout"] is None and job["key"] is None and job["max_start_at"] is None


def test_same_key_returns_the_same_job_and_says_when_params_differ(environ, store):
    first = submit(environ, "noop", "a=1", "--key", "k")
    again = cli(environ, "submit", "noop", "a=1", "--key", "k")
    assert ok(again) == f"{first}\n" and again.stderr == ""
    other = cli(environ, "submit", "noop", "a=2", "--key", "k")
    assert ok(other) == f"{first}\n"
    assert "not applied" in other.stderr and str(first) in other.stderr
    assert len(other.stderr.splitlines()) == 1
    assert [j.id for j in store.jobs_list()] == [first]
    assert store.job_get(first).params == {"a": "1"}


def test_a_key_is_free_again_once_its_job_is_final(environ, store):
    first = submit(environ, "noop", "--key", "k")
    assert submit(environ, "noop", "--key", "k") == first  # open: the same job
    store.job_cancel(first)
    second = submit(environ, "noop", "--key", "k")
    assert second != first
    # The new job holds the key now: the next submit returns it, not a third.
    assert submit(environ, "noop", "--key", "k") == second
    assert store.job_get(second).key == "k"
    assert [j.id for j in store.jobs_list()] == [second, first]


# -- list -------------------------------------------------------------------------

@pytest.fixture
def three_jobs(store):
    """A PENDING noop, a HELD sleep, a CANCELED noop, in that order."""
    ids = [s.id for s in store.jobs_submit(
        [JobSpec("noop"), JobSpec("sleep", {"seconds": 1}, hold=True), JobSpec("noop")])]
    store.job_cancel(ids[2])
    return ids


def listed(environ, *args) -> list[dict]:
    return json.loads(ok(cli(environ, "list", "--json", *args)))


def test_list_is_newest_first_with_a_header(environ, three_jobs):
    lines = ok(cli(environ, "list")).splitlines()
    assert "STATUS" in lines[0] and "ACTION" in lines[0]
    rows = [line.split() for line in lines[1:]]
    assert [int(r[0]) for r in rows] == three_jobs[::-1]
    assert [r[1] for r in rows] == ["CANCELED", "HELD", "PENDING"]


def test_list_filters_by_repeated_case_insensitive_status(environ, three_jobs):
    found = listed(environ, "--status", "held", "--status", "Canceled")
    assert [j["id"] for j in found] == [three_jobs[2], three_jobs[1]]
    assert [j["status"] for j in found] == ["CANCELED", "HELD"]


def test_list_filters_by_action_and_limits(environ, three_jobs):
    assert [j["id"] for j in listed(environ, "--action", "sleep")] == [three_jobs[1]]
    assert [j["id"] for j in listed(environ, "--limit", "2")] == three_jobs[:0:-1]
    assert listed(environ, "--action", "nothing-like-it") == []


def test_list_json_types(environ, three_jobs):
    found = listed(environ)
    assert [j["id"] for j in found] == three_jobs[::-1]
    for job in found:
        assert isinstance(job["id"], int) and not isinstance(job["id"], bool)
        assert job["status"] in {s.value for s in Status}
        parse_time(job["created_at"])
        parse_time(job["run_at"])
        # Unset is null, never "-" or "".
        assert job["started_at"] is None and job["key"] is None and job["output"] is None
    canceled = found[0]
    assert canceled["status"] == "CANCELED"
    parse_time(canceled["finished_at"])
    assert found[2]["finished_at"] is None


# -- show --------------------------------------------------------------------------

def test_show_text_has_every_field_and_a_timeline(environ, store):
    (submitted,) = store.jobs_submit([JobSpec("noop", {"a": 1}, key="kk")])
    store.job_cancel(submitted.id)
    out = ok(cli(environ, "show", str(submitted.id)))
    fields = dict(re.match(r"(\w+):\s+(.*)", line).groups()
                  for line in out.split("timeline:")[0].splitlines())
    assert fields["id"] == str(submitted.id)
    assert fields["action"] == "noop"
    assert fields["status"] == "CANCELED"
    assert json.loads(fields["params"]) == {"a": 1}
    assert fields["key"] == "kk"
    assert fields["error"] == "canceled before it started"
    assert fields["started_at"] == "-"
    timeline = out.split("timeline:")[1].splitlines()[1:]
    assert [line.split()[2] for line in timeline] == ["PENDING", "CANCELED"]


def test_show_json_has_its_timeline_events(environ, store):
    (submitted,) = store.jobs_submit([JobSpec("noop", hold=True)])
    store.job_cancel(submitted.id)
    job = show_json(environ, submitted.id)
    assert job["status"] == "CANCELED"
    events = job["events"]
    assert [e["status"] for e in events] == ["HELD", "CANCELED"]
    assert events[0]["previous"] is None and events[1]["previous"] == "HELD"
    times = [parse_time(e["at"]) for e in events]
    assert times == sorted(times)
    assert job["error"] == "canceled before it started"


# -- a job that ran: log, show -----------------------------------------------------

def test_log_prints_the_traceback_of_a_failed_job(environ):
    job_id = submit(environ, "fail", "message=broken on purpose")
    ok(cli_process(environ, "run", "--once", timeout=30))
    log = ok(cli(environ, "log", str(job_id)))
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: broken on purpose" in log
    job = show_json(environ, job_id)
    assert job["status"] == "FAILURE" and job["attempt"] == 1
    assert job["error"] == "RuntimeError: broken on purpose"
    assert [e["status"] for e in job["events"]] == ["PENDING", "QUEUED", "RUNNING", "FAILURE"]
    for name in ("queued_at", "started_at", "finished_at"):
        parse_time(job[name])
    # A final job cannot be canceled: exit 1, naming its status.
    refused = cli(environ, "cancel", str(job_id))
    assert refused.returncode == 1 and refused.stdout == ""
    assert "FAILURE" in refused.stderr and str(job_id) in refused.stderr


def test_log_of_a_missing_job_exits_1(environ):
    result = cli(environ, "log", "999")
    assert result.returncode == 1 and result.stdout == ""
    assert "999" in result.stderr


# -- submit --wait ------------------------------------------------------------------

def test_submit_wait_exits_with_the_final_status(environ, store):
    waiters = {action: subprocess.Popen(runjobs_cmd("submit", "--wait", action), env=environ,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for action in ("noop", "fail")}
    try:
        wait_for(lambda: len(store.jobs_list()) == 2, timeout=20, message="both submits")
        for action, waiter in waiters.items():
            assert waiter.poll() is None, f"submit --wait {action} did not wait"
        ok(cli_process(environ, "run", "--once", timeout=30))
        codes = {action: waiter.wait(timeout=20) for action, waiter in waiters.items()}
    finally:
        for waiter in waiters.values():
            if waiter.poll() is None:
                waiter.kill()
            waiter.communicate(timeout=10)
    assert codes == {"noop": 0, "fail": 4}
    by_action = {j.action: j for j in store.jobs_list()}
    assert by_action["noop"].status == Status.SUCCESS
    assert by_action["fail"].status == Status.FAILURE


def test_submit_wait_for_a_canceled_job_exits_5(environ, store):
    waiter = subprocess.Popen(runjobs_cmd("submit", "--wait", "noop", "--hold"), env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        jobs = wait_for(lambda: store.jobs_list(), timeout=20, message="the submit")
        ok(cli(environ, "cancel", str(jobs[0].id)))
        code = waiter.wait(timeout=20)
        out, _ = waiter.communicate(timeout=10)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate(timeout=10)
    assert code == 5
    assert out == f"{jobs[0].id}\n"


# -- cancel ----------------------------------------------------------------------

def test_cancel_pending_job_is_canceled(environ, store):
    (submitted,) = store.jobs_submit([JobSpec("noop")])
    out = ok(cli(environ, "cancel", str(submitted.id)))
    assert "CANCELED" in out
    job = store.job_get(submitted.id)
    assert job.status == Status.CANCELED and job.finished_at is not None


def test_cancel_final_or_missing_job_exits_1_naming_why(environ, store):
    done, pending = (s.id for s in store.jobs_submit([JobSpec("noop"), JobSpec("noop")]))
    store.job_cancel(done)
    result = cli(environ, "cancel", str(done))
    assert result.returncode == 1
    assert "CANCELED" in result.stderr and str(done) in result.stderr
    missing = cli(environ, "cancel", "999", str(pending))
    assert missing.returncode == 1
    assert "999" in missing.stderr and "does not exist" in missing.stderr
    # The other id given in the same command is still canceled.
    assert store.job_status(pending) == Status.CANCELED
