"""Settings: defaults < TOML file < environment, durations, capacity,
validation messages that name the key, database URLs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from runjobs import config
from runjobs.config import load_settings, mask_url, parse_duration, pg_url
from runjobs.errors import ConfigError


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch, tmp_path):
    """The machine's /etc/runjobs/runjobs.toml must not leak into these tests."""
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "etc" / "runjobs.toml")


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def env(home: Path, **values: str) -> dict[str, str]:
    return {"RUNJOBS_HOME": str(home), **{f"RUNJOBS_{k.upper()}": v for k, v in values.items()}}


def with_file(home: Path, text: str, **values: str) -> dict[str, str]:
    path = home / "custom.toml"
    path.write_text(text)
    return {**env(home, **values), "RUNJOBS_CONFIG": str(path)}


def test_defaults(home):
    s = load_settings(env(home))
    assert s.home == home and s.config_file is None
    assert s.database_url == f"sqlite:///{home / 'runjobs.db'}"
    assert s.log_dir == home / "logs" and s.job_log_dir == home / "logs" / "jobs"
    assert s.lock_file == home / "runjobs.lock"
    assert s.node == socket.gethostname()
    assert dict(s.capacity) == {"default": 4}
    assert (s.period, s.margin, s.poll_interval) == (60, 5, 1)
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (5, 30)
    assert s.default_timeout is None
    assert s.retention == 30 * 86400 and s.retry_backoff == 10
    assert s.timezone is None and s.warning_exit_codes == ()
    assert dict(s.actions) == {}
    assert s.database_url.startswith("sqlite:")
    assert (s.file_mode, s.dir_mode) == (0o600, 0o700)


def test_group_setting_opens_modes_to_the_group(home):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name  # a group that exists here
    s = load_settings(env(home, group=group))
    assert (s.file_mode, s.dir_mode, s.gid) == (0o660, 0o770, os.getgid())


def test_home_default_without_runjobs_home():
    expected = (Path("/var/lib/runjobs") if os.geteuid() == 0
                else Path.home() / ".local" / "state" / "runjobs")
    assert config.default_home({}) == expected


def test_home_config_file_is_read(home):
    (home / "runjobs.toml").write_text('node = "from-home-file"\n')
    s = load_settings(env(home))
    assert s.node == "from-home-file" and s.config_file == home / "runjobs.toml"


def test_file_overrides_defaults_and_environment_overrides_file(home):
    environ = with_file(home, 'node = "file-node"\nperiod = "2m"\nmargin = 10\n'
                              'capacity = {default = 2, scan = 1}\n'
                              'log_dir = "/tmp/file-logs"\n',
                        node="env-node", margin="15s")
    s = load_settings(environ)
    assert s.config_file == home / "custom.toml"
    assert s.node == "env-node"        # environment wins
    assert s.margin == 15
    assert s.period == 120             # from the file
    assert dict(s.capacity) == {"default": 2, "scan": 1}
    assert s.log_dir == Path("/tmp/file-logs")


def test_runjobs_config_wins_over_the_home_file(home):
    (home / "runjobs.toml").write_text('node = "home-file"\n')
    assert load_settings(with_file(home, 'node = "named-file"\n')).node == "named-file"


def test_runjobs_config_naming_a_missing_file(home):
    environ = {**env(home), "RUNJOBS_CONFIG": str(home / "nope.toml")}
    with pytest.raises(ConfigError, match="RUNJOBS_CONFIG.*nope.toml"):
        load_settings(environ)


def test_broken_toml_names_the_file(home):
    with pytest.raises(ConfigError, match="custom.toml"):
        load_settings(with_file(home, "period = \n"))


def test_overrides_win_over_environment(home):
    s = load_settings(env(home, period="2m", margin="1s"), period=10.0)
    assert (s.period, s.margin) == (10, 1)


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("3s", 3),
    ("1.5s", 1.5), ("45", 45), ("0.5", 0.5), (5, 5), (2.5, 2.5), (" 10M ", 600),
])
def test_durations(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["5x", "", "m", "10m5", "1h 30m", "-5", "-5s", "nan", True, "ten"])
def test_bad_durations_name_the_key(text):
    with pytest.raises(ConfigError, match="^retention: "):
        parse_duration(text, "retention")


def test_bad_duration_in_environment_names_the_key(home):
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        load_settings(env(home, heartbeat_interval="5x"))


def test_bad_duration_in_file_names_the_key(home):
    with pytest.raises(ConfigError, match="retry_backoff"):
        load_settings(with_file(home, 'retry_backoff = "soon"\n'))


def test_default_timeout_from_environment(home):
    assert load_settings(env(home, default_timeout="1h")).default_timeout == 3600


@pytest.mark.parametrize("text, table", [
    ('{"default": 2, "scan": 1}', {"default": 2, "scan": 1}),
    ("default=4,scan=1", {"default": 4, "scan": 1}),
    (" default = 3 , scanCheck=1 ", {"default": 3, "scanCheck": 1}),
])
def test_capacity_from_environment(home, text, table):
    assert dict(load_settings(env(home, capacity=text)).capacity) == table


@pytest.mark.parametrize("text, names", [
    ("default=x", "capacity.default"),
    ("default=-1", "capacity.default"),
    ('{"default": 1.5}', "capacity.default"),
    ("default", "RUNJOBS_CAPACITY"),
    ("{default: 1}", "RUNJOBS_CAPACITY"),
])
def test_bad_capacity_names_the_key(home, text, names):
    with pytest.raises(ConfigError, match=names):
        load_settings(env(home, capacity=text))


def test_warning_exit_codes_from_environment_and_file(home):
    assert load_settings(env(home, warning_exit_codes="3,4")).warning_exit_codes == (3, 4)
    assert load_settings(with_file(home, "warning_exit_codes = [7]\n")).warning_exit_codes == (7,)
    with pytest.raises(ConfigError, match="warning_exit_codes"):
        load_settings(with_file(home, 'warning_exit_codes = ["x"]\n'))


@pytest.mark.parametrize("values, names", [
    ({"margin": "60s"}, "margin"),
    ({"period": "10s", "margin": "20s"}, "margin"),
    ({"period": "0"}, "period"),
    ({"heartbeat_timeout": "10s"}, "heartbeat_timeout"),       # < 3 x 5s heartbeats
    ({"heartbeat_interval": "1s", "heartbeat_timeout": "3s", "poll_interval": "5s"},
     "heartbeat_timeout"),                                      # not more than the poll
    ({"poll_interval": "0"}, "poll_interval"),
])
def test_timing_validation_names_the_key(home, values, names):
    with pytest.raises(ConfigError, match=f"^{names}: "):
        load_settings(env(home, **values))


def test_sane_short_timings_are_accepted(home):
    s = load_settings(env(home, period="10s", margin="2s", heartbeat_interval="1s",
                          heartbeat_timeout="3s", poll_interval="0.2s"))
    assert (s.period, s.margin, s.heartbeat_timeout) == (10, 2, 3)


def test_unknown_keys_in_the_file_are_named(home):
    with pytest.raises(ConfigError, match="perod"):
        load_settings(with_file(home, 'perod = "60s"\n'))


def test_home_and_config_are_not_file_settings(home):
    with pytest.raises(ConfigError, match="home"):
        load_settings(with_file(home, 'home = "/elsewhere"\n'))


def test_actions_from_the_file(home):
    s = load_settings(with_file(home, '[actions.scan]\ncallable = "pkg.mod:scan"\nretries = 2\n'
                                      '[actions.backup]\ncommand = ["/bin/echo", "{x}"]\n'))
    assert dict(s.actions) == {"scan": {"callable": "pkg.mod:scan", "retries": 2},
                               "backup": {"command": ["/bin/echo", "{x}"]}}


@pytest.mark.parametrize("text", [
    '[actions.both]\ncallable = "a:b"\ncommand = ["/bin/true"]\n',
    "[actions.both]\ntimeout = 5\n",
])
def test_an_action_needs_exactly_one_of_callable_or_command(home, text):
    with pytest.raises(ConfigError, match="actions.both"):
        load_settings(with_file(home, text))


def test_postgresql_url_means_psycopg2(home):
    s = load_settings(env(home, database_url="postgresql://u:pw@db.example:5432/jobs"))
    assert s.database_url == "postgresql+psycopg2://u:pw@db.example:5432/jobs"
    assert not s.database_url.startswith("sqlite")
    from_file = load_settings(with_file(home, 'database_url = "postgresql://h/j"\n'))
    assert from_file.database_url == "postgresql+psycopg2://h/j"


@pytest.mark.parametrize("url, expected", [
    ("postgresql://h/db", "postgresql+psycopg2://h/db"),
    ("postgres://h/db", "postgresql+psycopg2://h/db"),
    ("postgresql+psycopg2://h/db", "postgresql+psycopg2://h/db"),
    ("postgresql+psycopg://h/db", "postgresql+psycopg://h/db"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_pg_url(url, expected):
    assert pg_url(url) == expected


@pytest.mark.parametrize("url, expected", [
    ("postgresql+psycopg2://jobs:s3cret@db:5432/runjobs",
     "postgresql+psycopg2://jobs:***@db:5432/runjobs"),
    ("postgresql://jobs:pa:ss%40word@db/runjobs", "postgresql://jobs:***@db/runjobs"),
    ("postgresql://jobs@db/runjobs", "postgresql://jobs@db/runjobs"),
    ("sqlite:////var/lib/runjobs/runjobs.db", "sqlite:////var/lib/runjobs/runjobs.db"),
    # An unencoded '@' (or newline) in the password: masked to the last '@'.
    ("postgresql://jobs:s3cret@ss%40word@db:5432/runjobs", "postgresql://jobs:***@db:5432/runjobs"),
    ("postgresql://jobs:s3c@ret@ss@word@db/runjobs", "postgresql://jobs:***@db/runjobs"),
    ("postgresql://jobs:s3cret\nss%40word@db/runjobs", "postgresql://jobs:***@db/runjobs"),
    ("postgresql://:s3cret@ss%40word@db/runjobs", "postgresql://:***@db/runjobs"),
])
def test_mask_url_hides_the_password(url, expected):
    assert mask_url(url) == expected
    assert "s3cret" not in mask_url(url) and "ss%40word" not in mask_url(url)


@pytest.mark.parametrize("url, expected", [
    ("postgresql://jobs:s3cr@p4ss@db:5432/runjobs",
     "postgresql+psycopg2://jobs:s3cr%40p4ss@db:5432/runjobs"),
    ("postgresql://jobs:a@b:c@d@db/runjobs", "postgresql+psycopg2://jobs:a%40b:c%40d@db/runjobs"),
    ("postgresql://jobs:s3cr%40p4ss@db/runjobs", "postgresql+psycopg2://jobs:s3cr%40p4ss@db/runjobs"),
    ("postgresql://jobs:pw@db/runjobs?application_name=a@b",
     "postgresql+psycopg2://jobs:pw@db/runjobs?application_name=a@b"),
    ("sqlite:////var/lib/a@b/runjobs.db", "sqlite:////var/lib/a@b/runjobs.db"),
])
def test_database_url_reads_a_password_to_the_last_at(url, expected):
    import sqlalchemy as sa

    assert config.database_url(url) == expected
    assert "@" not in (sa.make_url(expected).host or "")


@pytest.mark.parametrize("url, names", [
    ("garbage", "not a database URL"),
    ("", "not a database URL"),
    ("jobs:s3cret@db/runjobs", "not a database URL"),
    ("mysql://jobs:s3cret@db/runjobs", "'mysql' is not supported"),
    ("postgresql+psycopg://jobs:s3cret@db/runjobs", "psycopg2"),
    ("postgresql://jobs:s3cret@db:abc/runjobs", "port"),
    ("postgresql://jobs:s3cret@db:0/runjobs", "port"),
    ("postgresql://jobs:s3c@ret@db:65536/runjobs", "port"),
])
def test_bad_database_urls_never_print_the_password(url, names):
    with pytest.raises(ConfigError, match="^database_url: ") as caught:
        config.database_url(url)
    assert names in str(caught.value)
    assert "s3c" not in str(caught.value) and "ret" not in str(caught.value)


def test_a_bad_setting_names_where_it_came_from(home):
    with pytest.raises(ConfigError, match=r"^period: .* \(from RUNJOBS_PERIOD\)$"):
        load_settings(env(home, period="inf"))
    with pytest.raises(ConfigError, match=r"^crash_limit: .* \(in .*custom.toml\)$"):
        load_settings(with_file(home, "crash_limit = inf\n"))
    with pytest.raises(ConfigError, match=r"^capacity.default: .*inf \(in .*custom.toml\)$"):
        load_settings(with_file(home, "capacity = {default = inf}\n"))
    with pytest.raises(ConfigError, match=r"^capacity.default: .* \(from RUNJOBS_CAPACITY\)$"):
        load_settings(env(home, capacity='{"default": 1e999}'))
    with pytest.raises(ConfigError, match=r"^warning_exit_codes: .*'abc' \(from RUNJOBS_WA"):
        load_settings(env(home, warning_exit_codes="abc"))
    with pytest.raises(ConfigError, match=r"^database_url: .* \(from RUNJOBS_DATABASE_URL\)$"):
        load_settings(with_file(home, 'database_url = "sqlite:///x"\n', database_url="x"))
    with pytest.raises(ConfigError, match="^margin: .*[^)]$"):  # given by the caller
        load_settings(env(home), margin=120.0)


def test_toml_that_is_not_utf8_names_the_file(home):
    path = home / "custom.toml"
    path.write_bytes(b'node = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"custom.toml: not UTF-8 text \(byte 12\)"):
        load_settings({**env(home), "RUNJOBS_CONFIG": str(path)})


@pytest.mark.parametrize("text", ["inf", "1e300", "99999999999d", "36501d", 10**400, 1e300,
                                  float("inf"), "9" * 400 + "s"])
def test_durations_past_100_years_are_refused(text):
    with pytest.raises(ConfigError, match="^retention: more than the limit of 100 years"):
        parse_duration(text, "retention")


def test_a_duration_of_100_years_is_accepted():
    assert parse_duration("36500d", "x") == 36500 * 86400


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_times_outside_years_1_to_9999_in_utc_are_refused(text):
    with pytest.raises(ConfigError, match="^at: .* out of range: years 1 to 9999 in UTC"):
        config.parse_when(text, "at")


def test_times_at_the_edges_of_the_range_are_accepted():
    assert config.parse_when("0001-01-01T00:00:00Z").year == 1
    assert config.parse_when("0001-01-01T00:00:00-01:00").hour == 1
    assert config.parse_when("9999-12-31T23:59:59+14:00").hour == 9


def test_settings_are_frozen(home):
    s = load_settings(env(home))
    with pytest.raises(AttributeError):
        s.period = 1  # type: ignore[misc]
    assert s.replace(period=120.0).period == 120 and s.period == 60


def test_log_level_from_file_and_environment(home):
    assert load_settings(env(home)).log_level == "info"
    assert load_settings(with_file(home, 'log_level = "DEBUG"\n')).log_level == "debug"
    assert load_settings(env(home, log_level="warning")).log_level == "warning"
    with pytest.raises(ConfigError, match="^log_level: .*'loud'"):
        load_settings(env(home, log_level="loud"))
