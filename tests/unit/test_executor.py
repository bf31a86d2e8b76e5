"""Executing one job into an Outcome, with real job log files and real
processes for command actions; and the action registry."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from runjobs import config
from runjobs.actions import BUILTINS, Action, JobContext, JobLog, Registry
from runjobs.config import load_settings
from runjobs.errors import ConfigError, DoNotRetry, UsageError
from runjobs.files import Access
from runjobs.executor import classify_return, command_argv, execute
from runjobs.models import Status

# exits with argv[1] after writing argv[2] to stdout and argv[3] to stderr
EXIT_WITH = textwrap.dedent("""
    import sys
    print(sys.argv[2] if len(sys.argv) > 2 else "", flush=True)
    print(sys.argv[3] if len(sys.argv) > 3 else "", file=sys.stderr, flush=True)
    sys.exit(int(sys.argv[1]))
""")


def run_job(tmp_path: Path, action: Action, params: dict | None = None, job_id: int = 7):
    """Execute `action` as job `job_id`; returns (Outcome, the job log's text)."""
    job_log = JobLog(tmp_path / "logs" / "jobs" / f"{job_id}.log", Access())
    ctx = JobContext(job_id, params or {}, 1, job_log)
    outcome = execute(action, ctx, job_log, grace=2.0)
    for handler in ctx.log.handlers:
        handler.close()
    text = job_log.path.read_text() if job_log.path.exists() else ""
    return outcome, text


def callable_action(function) -> Action:
    return Action("test", function=function)


# -- classify_return --------------------------------------------------------------

@pytest.mark.parametrize("value, status, output, error", [
    (None, Status.SUCCESS, None, None),
    ("SUCCESS", Status.SUCCESS, None, None),
    ("warning", Status.WARNING, None, None),
    ("Failure", Status.FAILURE, None, None),
    (("FAILURE", "out", "err"), Status.FAILURE, "out", "err"),
    (("WARNING", "half done"), Status.WARNING, "half done", None),
    (("SUCCESS", "", ""), Status.SUCCESS, None, None),
    (("success",), Status.SUCCESS, None, None),
])
def test_classify_return(value, status, output, error):
    outcome = classify_return(value)
    assert (outcome.status, outcome.output, outcome.error) == (status, output, error)


@pytest.mark.parametrize("value", [
    "DONE", 0, 1, True, ["SUCCESS"], {"status": "SUCCESS"}, ("SUCCESS", "o", "e", "x"), (),
    b"SUCCESS",
])
def test_unexpected_return_values_fail_without_retry(value):
    outcome = classify_return(value)
    assert outcome.status == Status.FAILURE and outcome.retry is False
    assert repr(value) in outcome.error


# -- callables -----------------------------------------------------------------------

def test_return_value_of_a_callable_is_classified(tmp_path):
    outcome, _ = run_job(tmp_path, callable_action(lambda ctx: ("WARNING", "o", "e")))
    assert (outcome.status, outcome.output, outcome.error) == (Status.WARNING, "o", "e")


def test_callable_gets_its_context(tmp_path):
    seen = {}

    def action(ctx):
        seen.update(id=ctx.id, params=ctx.params, attempt=ctx.attempt)
        ctx.log.info("hello from %s", ctx.id)

    outcome, log = run_job(tmp_path, callable_action(action), {"a": 1}, job_id=42)
    assert outcome.status == Status.SUCCESS
    assert seen == {"id": 42, "params": {"a": 1}, "attempt": 1}
    assert "INFO hello from 42" in log


def test_an_exception_is_failure_with_its_message_and_retry(tmp_path):
    def action(ctx):
        raise ValueError("disk is full\nsecond line")

    outcome, log = run_job(tmp_path, callable_action(action))
    assert outcome.status == Status.FAILURE and outcome.retry is True
    assert outcome.error == "ValueError: disk is full"
    assert "Traceback (most recent call last)" in log and "ValueError: disk is full" in log


def test_do_not_retry_is_failure_without_retry(tmp_path):
    def action(ctx):
        raise DoNotRetry("bad input, retrying will not help")

    outcome, log = run_job(tmp_path, callable_action(action))
    assert outcome.status == Status.FAILURE and outcome.retry is False
    assert "bad input, retrying will not help" in outcome.error
    assert "bad input, retrying will not help" in log


def test_builtin_fail_and_noop(tmp_path):
    failed, _ = run_job(tmp_path, BUILTINS["fail"], {"message": "as asked"})
    assert failed.status == Status.FAILURE and failed.error == "RuntimeError: as asked"
    assert run_job(tmp_path, BUILTINS["noop"])[0].status == Status.SUCCESS


def test_builtin_sleep_accepts_a_number_as_a_string(tmp_path):
    assert run_job(tmp_path, BUILTINS["sleep"], {"seconds": "0.05"})[0].status == Status.SUCCESS
    bad, _ = run_job(tmp_path, BUILTINS["sleep"], {"seconds": "forever"})
    assert bad.status == Status.FAILURE and bad.retry is False and "seconds" in bad.error


def test_registered_callable_target_is_imported_and_run(tmp_path):
    path = tmp_path / "ids.txt"
    action = Action("append", target="tests.sample_actions:append_id")
    outcome, _ = run_job(tmp_path, action, {"path": str(path)}, job_id=5)
    assert outcome.status == Status.SUCCESS and path.read_text() == "5\n"


# -- commands --------------------------------------------------------------------------

def exit_with_action(**options) -> Action:
    return Action("cmd", command=(sys.executable, "-c", EXIT_WITH, "{code}", "{out}", "{err}"),
                  **options)


@pytest.mark.parametrize("code, status, retry", [
    (0, Status.SUCCESS, True),
    (1, Status.FAILURE, True),
    (3, Status.WARNING, True),
    (9, Status.FAILURE, False),
])
def test_command_exit_codes(tmp_path, code, status, retry):
    action = exit_with_action(warning_exit_codes=frozenset({3}), final_exit_codes=frozenset({9}))
    outcome, _ = run_job(tmp_path, action, {"code": code, "out": "", "err": ""})
    assert outcome.status == status
    if status == Status.FAILURE:
        assert outcome.retry is retry and outcome.error == f"exited with code {code}"


def test_command_stdout_and_stderr_land_in_the_job_log(tmp_path):
    outcome, log = run_job(tmp_path, exit_with_action(),
                           {"code": 0, "out": "to-stdout", "err": "to-stderr"})
    assert outcome.status == Status.SUCCESS
    assert "to-stdout" in log and "to-stderr" in log
    assert (tmp_path / "logs" / "jobs" / "7.log").stat().st_mode & 0o777 == 0o600


def test_command_that_cannot_start_fails_without_retry(tmp_path):
    action = Action("cmd", command=(str(tmp_path / "no-such-program"),))
    outcome, _ = run_job(tmp_path, action)
    assert outcome.status == Status.FAILURE and outcome.retry is False
    assert "no-such-program" in outcome.error


def test_argv_substitution_keeps_each_param_in_its_own_element():
    template = ("/bin/echo", "{x}", "--host={host}", "{n}", "{hosts}", "{{literal}}")
    argv = command_argv(template, {"x": "; touch /tmp/x", "host": "a b", "n": 5,
                                   "hosts": ["a", "b"]})
    assert argv == ["/bin/echo", "; touch /tmp/x", "--host=a b", "5", '["a", "b"]', "{literal}"]


def test_a_param_never_becomes_a_command(tmp_path):
    target = tmp_path / "pwned"
    sneaky = [f"; touch {target}1", f"$(touch {target}2)", f"`touch {target}3`",
              f"x && touch {target}4", f"x\ntouch {target}5"]
    script = tmp_path / "args.py"
    script.write_text("import sys, json\nprint(json.dumps(sys.argv[1:]))\n")
    action = Action("cmd", command=(sys.executable, str(script), "{a}", "{b}", "{c}", "{d}", "{e}"))
    outcome, log = run_job(tmp_path, action, dict(zip("abcde", sneaky)))
    assert outcome.status == Status.SUCCESS
    assert list(tmp_path.glob("pwned*")) == []
    # The script printed its argv as JSON: each param arrived as one literal argument.
    (printed,) = [line for line in log.splitlines() if line.startswith('["')]
    assert json.loads(printed) == sneaky


def test_echo_prints_the_param_literally(tmp_path):
    target = tmp_path / "x"
    action = Action("cmd", command=("/bin/echo", "{x}"))
    outcome, log = run_job(tmp_path, action, {"x": f"; touch {target}"})
    assert outcome.status == Status.SUCCESS
    assert not target.exists()
    assert f"; touch {target}\n" in log


@pytest.mark.parametrize("placeholder", ["{a.b}", "{a[0]}", "{a.b!s}", "{0}", "{}"])
def test_attribute_and_index_placeholders_are_refused(tmp_path, placeholder):
    with pytest.raises(DoNotRetry):
        command_argv(("/bin/echo", placeholder), {"a": {"b": 1}})
    outcome, _ = run_job(tmp_path, Action("cmd", command=("/bin/echo", placeholder)),
                         {"a": {"b": 1}})
    assert outcome.status == Status.FAILURE and outcome.retry is False


def test_missing_param_fails_without_retry(tmp_path):
    marker = tmp_path / "ran"
    action = Action("cmd", command=(sys.executable, "-c",
                                    f"open({str(marker)!r}, 'w').close()", "{needed}"))
    outcome, _ = run_job(tmp_path, action, {"other": 1})
    assert outcome.status == Status.FAILURE and outcome.retry is False
    assert "needed" in outcome.error
    assert not marker.exists()


# -- the registry ------------------------------------------------------------------------

@pytest.fixture
def settings_with_actions(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "etc.toml")
    path = tmp_path / "runjobs.toml"
    path.write_text(textwrap.dedent("""
        warning_exit_codes = [2]
        [actions.append]
        callable = "tests.sample_actions:append_id"
        timeout = "10m"
        retries = 2
        priority = -1
        needs = {scan = 1}
        isolation = "process"
        [actions.backup]
        command = ["/bin/echo", "{target}"]
        final_exit_codes = [9]
        warning_exit_codes = [3]
    """))
    return load_settings({"RUNJOBS_HOME": str(tmp_path), "RUNJOBS_CONFIG": str(path)})


def test_builtins_are_registered(settings_with_actions):
    registry = Registry(settings_with_actions)
    for name in ("sleep", "fail", "noop"):
        assert registry.get(name) is BUILTINS[name]


def test_actions_from_settings(settings_with_actions, tmp_path):
    registry = Registry(settings_with_actions)
    append = registry.get("append")
    assert append.target == "tests.sample_actions:append_id" and append.command is None
    assert (append.timeout, append.retries, append.priority) == (600, 2, -1)
    assert dict(append.needs) == {"scan": 1} and append.isolation == "process"
    backup = registry.require("backup")
    assert backup.command == ("/bin/echo", "{target}") and backup.target is None
    assert backup.final_exit_codes == {9}
    assert backup.warning_exit_codes == {2, 3}   # the action's and the global setting's
    outcome, log = run_job(tmp_path, backup, {"target": "db1"})
    assert outcome.status == Status.SUCCESS and "db1" in log


def test_unknown_name_is_none_and_require_raises(settings_with_actions):
    registry = Registry(settings_with_actions)
    assert registry.get("nope") is None
    with pytest.raises(UsageError, match="nope"):
        registry.require("nope")


def test_an_unregistered_module_path_imports_nothing(settings_with_actions, tmp_path,
                                                     monkeypatch):
    marker = tmp_path / "imported"
    monkeypatch.setenv("RUNJOBS_TEST_IMPORT_MARKER", str(marker))
    monkeypatch.delitem(sys.modules, "tests.import_marker", raising=False)
    modules = set(sys.modules)
    registry = Registry(settings_with_actions)
    assert registry.get("os:system") is None
    assert registry.get("tests.import_marker:run") is None
    with pytest.raises(UsageError):
        registry.require("tests.import_marker:run")
    assert not marker.exists()
    assert "tests.import_marker" not in sys.modules
    assert not {m for m in set(sys.modules) - modules if not m.startswith("importlib")}


@pytest.mark.parametrize("table, names", [
    ('command = "/bin/echo {x}"', "actions.bad.command"),
    ("command = []", "actions.bad.command"),
    ('callable = "a:b"\nisolation = "fork"', "actions.bad.isolation"),
    ('callable = "a:b"\ntimeout = "soon"', "actions.bad.timeout"),
    ('callable = "a:b"\nretries = -1', "actions.bad.retries"),
    ('callable = "a:b"\nretries = 2147483648', "actions.bad.retries"),
    ('callable = "a:b"\npriority = -2147483649', "actions.bad.priority"),
    ('callable = "a:b"\ntimeout = inf', "actions.bad.timeout"),
    ('callable = "a:b"\nneeds = {scan = "x"}', "actions.bad.needs"),
    ('command = ["/bin/true"]\nfinal_exit_codes = ["x"]', "actions.bad.final_exit_codes"),
])
def test_bad_action_tables_name_the_key(tmp_path, monkeypatch, table, names):
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "etc.toml")
    path = tmp_path / "runjobs.toml"
    path.write_text(f"[actions.bad]\n{table}\n")
    settings = load_settings({"RUNJOBS_HOME": str(tmp_path), "RUNJOBS_CONFIG": str(path)})
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        Registry(settings)
