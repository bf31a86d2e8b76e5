"""Settings: defaults < TOML config file < RUNJOBS_* environment variables.

Everything else receives a frozen `Settings`; nothing else reads os.environ.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import socket
import tomllib
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError
from .limits import DURATION_MAX, INT_MAX

if TYPE_CHECKING:
    from .files import Access

SYSTEM_CONFIG = Path("/etc/runjobs/runjobs.toml")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PASSWORD = re.compile(r"(://[^:/@]*:).*@", re.S)

# Keys a config file or RUNJOBS_<KEY> may set. RUNJOBS_HOME and RUNJOBS_CONFIG
# are environment only (they say where the config file is).
_KEYS = (
    "database_url", "log_dir", "lock_file", "node", "capacity", "period",
    "margin", "poll_interval", "heartbeat_interval", "heartbeat_timeout",
    "default_timeout", "retention", "retry_backoff", "timezone",
    "warning_exit_codes", "group", "grace_period", "crash_limit", "log_level",
)
LOG_LEVELS = ("debug", "info", "warning", "error")
_DURATION_KEYS = (
    "period", "margin", "poll_interval", "heartbeat_interval",
    "heartbeat_timeout", "default_timeout", "retention", "retry_backoff",
    "grace_period",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    home: Path
    config_file: Path | None
    database_url: str
    log_dir: Path
    lock_file: Path
    node: str
    capacity: Mapping[str, int]
    period: float = 60.0
    margin: float = 5.0
    poll_interval: float = 1.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    default_timeout: float | None = None
    retention: float = 30 * 86400.0
    retry_backoff: float = 10.0
    grace_period: float = 10.0
    crash_limit: int = 3
    timezone: str | None = None
    warning_exit_codes: tuple[int, ...] = ()
    group: str | None = None
    gid: int | None = None                 # the group's id, looked up once
    log_level: str = "info"                # runjobs.log; "debug" adds a line per job
    actions: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def job_log_dir(self) -> Path:
        return self.log_dir / "jobs"

    @property
    def file_mode(self) -> int:
        """Mode of the SQLite file and job logs: owner only, or owner+group."""
        return 0o660 if self.group else 0o600

    @property
    def dir_mode(self) -> int:
        return 0o770 if self.group else 0o700

    @property
    def access(self) -> "Access":
        """How files holding jobs and logs are created (modes and group)."""
        from .files import Access

        return Access(self.file_mode, self.dir_mode, self.gid)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def parse_duration(value: Any, key: str = "duration") -> float:
    """`90s`, `10m`, `1h30m`, `2d` or a number of seconds -> seconds, at most
    DURATION_MAX (100 years).

    Raises ConfigError naming `key` for anything else (negative, infinite
    or not a number included).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 90s, 10m, 1h30m, got {value!r}")
    try:
        seconds = _seconds_of(value)
    except ValueError:
        raise ConfigError(
            f"{key}: expected a duration like 90s, 10m, 1h30m, 2d, got {value!r}") from None
    except OverflowError:  # an integer too large for a float
        seconds = math.inf
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative, got {value!r}")
    if seconds > DURATION_MAX:
        raise ConfigError(f"{key}: more than the limit of 100 years ({DURATION_MAX:.0f}s), "
                          f"got {value!r}")
    return seconds


def _seconds_of(value: Any) -> float:
    """Seconds, unchecked; ValueError for what is not a duration (NaN too)."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not text or "".join(n + u for n, u in parts) != text:
                raise
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError("NaN")
    return seconds


def parse_when(value: Any, key: str = "time") -> dt.datetime:
    """ISO 8601 with a zone (or Z), or `now` -> an aware UTC datetime.

    A time without a zone is refused rather than guessed. Raises ConfigError.
    """
    text = str(value).strip()
    if text.lower() == "now":
        return dt.datetime.now(dt.timezone.utc)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{key}: {value!r} is not an ISO 8601 time (like 2026-11-22T10:00:00Z) or now"
        ) from None
    if when.tzinfo is None:
        raise ConfigError(f"{key}: {value!r} has no time zone: add Z for UTC or an offset "
                          "like +01:00")
    try:
        return when.astimezone(dt.timezone.utc)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is in year 0 in UTC
        raise ConfigError(f"{key}: {value!r} is out of range: years 1 to 9999 in UTC") from None


def pg_url(url: str) -> str:
    """A plain postgresql:// URL means psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


# The database URLs runjobs supports: SQLite, and PostgreSQL through psycopg2
# (`pg_url` maps postgresql:// and postgres:// to it).
_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg2")


def database_url(value: Any) -> str:
    """The URL runjobs connects to, checked: a supported database, a numeric
    port, and a password with an unencoded '@' read up to the last '@'
    before the host. Read with urllib, not SQLAlchemy: importing SQLAlchemy
    to check a setting would cost `run` 0.3 s on the path that finds the
    lock held and exits. Messages never hold the URL: it may hold a
    password. Raises ConfigError.
    """
    url = pg_url(str(value).strip())
    scheme, sep, _ = url.partition("://")
    if not sep or not re.fullmatch(r"[\w+]+", scheme):
        raise ConfigError("database_url: not a database URL like sqlite:///PATH or "
                          "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    if scheme not in _DRIVERS:
        raise ConfigError(f"database_url: {scheme!r} is not supported: runjobs runs on "
                          "sqlite:///PATH or postgresql://... (through psycopg2)")
    if scheme.startswith("postgresql"):
        url = _password_at_encoded(url)
    try:
        port = urllib.parse.urlsplit(url).port
    except ValueError:  # not a number, or past 65535
        port = 0
    if port == 0:
        raise ConfigError("database_url: the port is not a number from 1 to 65535")
    return url


def _password_at_encoded(url: str) -> str:
    """A host never holds an '@': every '@' before the last one in the
    URL's authority belongs to the password, and is encoded as %40, or the
    driver would name part of the password as the host in its connection
    error."""
    authority = urllib.parse.urlsplit(url).netloc
    userinfo, at, host = authority.rpartition("@")
    if not at or "@" not in userinfo:
        return url
    return url.replace(authority, userinfo.replace("@", "%40") + "@" + host, 1)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***: safe to print or log.

    Everything from `://user:` to the last '@' is masked: a password may
    hold an unencoded '@' (or a newline), and masking too much is harmless.
    """
    return _PASSWORD.sub(r"\1***@", url)


def default_home(environ: Mapping[str, str]) -> Path:
    if environ.get("RUNJOBS_HOME"):
        return Path(environ["RUNJOBS_HOME"]).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/runjobs")
    return Path.home() / ".local" / "state" / "runjobs"


def _config_path(environ: Mapping[str, str], home: Path) -> Path | None:
    if environ.get("RUNJOBS_CONFIG"):
        path = Path(environ["RUNJOBS_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"RUNJOBS_CONFIG: no such file: {path}")
        return path
    for path in (SYSTEM_CONFIG, home / "runjobs.toml"):
        if path.is_file():
            return path
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None


def _env_value(key: str, text: str) -> Any:
    """Environment values are text; tables and lists are given as JSON."""
    if key == "capacity":
        return _parse_capacity_text(text)
    if key == "warning_exit_codes":
        try:
            return [int(x) for x in re.split(r"[,\s]+", text.strip("[] ")) if x]
        except ValueError:
            raise ConfigError(
                f"warning_exit_codes: expected exit codes like 3,4, got {text!r}") from None
    return text


def _parse_capacity_text(text: str) -> Any:
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"RUNJOBS_CAPACITY: bad JSON: {text!r}") from None
    table = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = item.partition("=")
        if not sep:
            raise ConfigError(
                f"RUNJOBS_CAPACITY: expected NAME=N[,NAME=N] or JSON, got {text!r}")
        table[name.strip()] = count.strip()
    return table


def validate_capacity(table: Any, key: str = "capacity") -> dict[str, int]:
    """A table of resource name -> whole number from 0 to INT_MAX."""
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{key}: expected a table like {{default = 4}}, got {table!r}")
    return {str(name): _whole_number(count, f"{key}.{name}", 0) for name, count in table.items()}


def _whole_number(value: Any, key: str, low: int) -> int:
    """An int, or its text, from `low` to INT_MAX: 1.5, true and inf are not."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        number = low - 1
    if isinstance(value, bool) or not low <= number <= INT_MAX \
            or str(number) != str(value).strip():
        raise ConfigError(f"{key}: expected a whole number from {low} to {INT_MAX}, "
                          f"got {value!r}")
    return number


def _validate(raw: dict[str, Any], home: Path, config_file: Path | None) -> Settings:
    values: dict[str, Any] = {}
    for key in _DURATION_KEYS:
        if raw.get(key) is not None:
            values[key] = parse_duration(raw[key], key)
    if "default_timeout" in values and values["default_timeout"] == 0:
        values["default_timeout"] = None
    capacity = validate_capacity(raw.get("capacity", {"default": 4}))
    try:
        codes = tuple(int(c) for c in raw.get("warning_exit_codes", ()))
    except (TypeError, ValueError, OverflowError):  # OverflowError: inf
        raise ConfigError(
            f"warning_exit_codes: expected a list of numbers, got {raw['warning_exit_codes']!r}"
        ) from None
    log_dir = Path(raw.get("log_dir") or home / "logs").expanduser()
    values["crash_limit"] = _whole_number(raw.get("crash_limit", 3), "crash_limit", 1)
    values["log_level"] = _log_level(raw.get("log_level", "info"))
    settings = Settings(
        home=home,
        config_file=config_file,
        database_url=database_url(raw.get("database_url") or f"sqlite:///{home / 'runjobs.db'}"),
        log_dir=log_dir,
        lock_file=Path(raw.get("lock_file") or home / "runjobs.lock").expanduser(),
        node=str(raw.get("node") or socket.gethostname()),
        capacity=capacity,
        timezone=raw.get("timezone") or None,
        warning_exit_codes=codes,
        group=raw.get("group") or None,
        gid=_group_id(raw.get("group")),
        actions=_validate_actions(raw.get("actions", {})),
        **values,
    )
    _check_timing(settings)
    return settings


def _group_id(name: Any) -> int | None:
    if not name:
        return None
    import grp

    try:
        return grp.getgrnam(str(name)).gr_gid
    except KeyError:
        raise ConfigError(f"group: no such group on this host: {name!r}") from None


def _log_level(value: Any) -> str:
    level = str(value).strip().lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _check_timing(s: Settings) -> None:
    if s.period <= 0:
        raise ConfigError(f"period: must be more than 0, got {s.period:g}s")
    if not 0 <= s.margin < s.period:
        raise ConfigError(
            f"margin: must be at least 0 and less than period ({s.period:g}s), got {s.margin:g}s")
    if s.poll_interval <= 0:
        raise ConfigError("poll_interval: must be more than 0")
    if s.heartbeat_interval <= 0:
        raise ConfigError("heartbeat_interval: must be more than 0")
    # A runner is declared dead only after several missed heartbeats, and never
    # faster than it polls: otherwise a busy but healthy runner gets rescued.
    if s.heartbeat_timeout < 3 * s.heartbeat_interval or s.heartbeat_timeout <= s.poll_interval:
        raise ConfigError(
            "heartbeat_timeout: must be at least 3 heartbeat_interval and more than "
            f"poll_interval, got {s.heartbeat_timeout:g}s")


def _validate_actions(table: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(table, Mapping):
        raise ConfigError("actions: expected [actions.NAME] tables")
    actions = {}
    for name, spec in table.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"actions.{name}: expected a table")
        if ("callable" in spec) == ("command" in spec):
            raise ConfigError(f"actions.{name}: give exactly one of callable or command")
        actions[str(name)] = dict(spec)
    return actions


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults < config file < environment < overrides.

    Raises ConfigError, naming the key, for any invalid value.
    """
    environ = os.environ if environ is None else environ
    home = default_home(environ)
    config_file = _config_path(environ, home)
    raw: dict[str, Any] = _read_toml(config_file) if config_file else {}
    unknown = set(raw) - set(_KEYS) - {"actions"}
    if unknown:
        raise ConfigError(f"{config_file}: unknown setting(s): {', '.join(sorted(unknown))}")
    sources = dict.fromkeys(raw, f"in {config_file}")
    try:
        for key in _KEYS:
            text = environ.get("RUNJOBS_" + key.upper())
            if text:
                sources[key] = "from RUNJOBS_" + key.upper()
                raw[key] = _env_value(key, text)
        for key, value in overrides.items():
            if value is not None:  # the caller's own value: no source to name
                raw[key] = value
                sources.pop(key, None)
        return _validate(raw, home, config_file)
    except ConfigError as exc:
        raise ConfigError(_with_source(str(exc), sources)) from None


def _with_source(message: str, sources: Mapping[str, str]) -> str:
    """The message with where its setting was set. Messages name their key
    first ('margin: ...', 'capacity.default: ...'); one that names a file or
    a variable instead already says where."""
    key = re.match(r"\w*", message).group()
    return f"{message} ({sources[key]})" if key in sources else message
