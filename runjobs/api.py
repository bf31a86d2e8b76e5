"""The Python API for applications that create jobs, and the submit logic the
CLI shares with it: validate, apply the action's defaults, store."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

from . import limits
from .actions import Registry
from .config import Settings, load_settings, parse_duration, parse_when, validate_capacity
from .errors import ConfigError, UsageError
from .limits import DURATION_MAX, INT_MAX, INT_MIN
from .models import FINAL, Job, JobSpec, Status
from .store import Store, Submitted, open_store

_SPEC_FIELDS = ("action", "params", "priority", "run_at", "run_in", "max_start_at", "timeout",
                "retries", "needs", "key", "hold")


def build_spec(registry: Registry, action: str, params: Mapping[str, Any] | None = None, *,
               priority: int | None = None, run_at: dt.datetime | None = None,
               run_in: float | None = None, max_start_at: dt.datetime | None = None,
               timeout: float | None = None, retries: int | None = None,
               needs: Mapping[str, int] | None = None, key: str | None = None,
               hold: bool = False, rerun_of: int | None = None) -> JobSpec:
    """A validated JobSpec with the action's registered defaults applied.

    Every bound of runjobs.limits is checked here, so the Python API keeps
    them as the CLI does. Raises UsageError naming the bad part; nothing is
    written.
    """
    registered = registry.require(_action(action))
    if run_at is not None and run_in is not None:
        raise UsageError("give run_at or run_in, not both")
    return JobSpec(
        action=action, params=_params(params),
        priority=_whole("priority", registered.priority if priority is None else priority,
                        INT_MIN),
        run_at=_when("run_at", run_at), run_in=_seconds("run_in", run_in),
        max_start_at=_when("max_start_at", max_start_at),
        timeout=_seconds("timeout", timeout, positive=True),
        retries=_whole("retries", registered.retries if retries is None else retries),
        needs=_needs(needs if needs is not None else registered.needs),
        key=_key(key), hold=_flag("hold", hold), rerun_of=rerun_of,
    )


def _action(action: Any) -> str:
    if not isinstance(action, str):
        raise UsageError(f"action: expected a name, got a {type(action).__name__}")
    return action


def _params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    params = dict(params or {})
    if params:  # most jobs have none: no JSON to check
        try:
            limits.params_text(params)
        except limits.LimitError as exc:
            raise UsageError(f"params: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"params: not JSON: {exc}") from None
    return params


def _when(name: str, value: Any) -> dt.datetime | None:
    """An aware datetime, in UTC: a time near year 1 or 9999 whose offset
    carries it out of datetime's range is refused here, not in the store."""
    if value is None:
        return None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise UsageError(f"{name}: expected a datetime with a time zone, got {value!r}")
    try:
        return value.astimezone(dt.timezone.utc)
    except OverflowError:
        raise UsageError(f"{name}: {value.isoformat()} is out of range: "
                         "years 1 to 9999 in UTC") from None


def _whole(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT_MAX:
        raise UsageError(f"{name}: expected a whole number from {low} to {INT_MAX}, "
                         f"got {value!r}")
    return value


def _seconds(name: str, value: Any, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= DURATION_MAX or (positive and value == 0):
        raise UsageError(f"{name}: expected a number of seconds up to {DURATION_MAX:.0f} "
                         f"(100 years), got {value!r}")
    return float(value)


def _needs(needs: Mapping[str, int] | None) -> dict[str, int] | None:
    if needs is None:
        return None
    try:
        return validate_capacity(needs, "needs")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > 255:
        raise UsageError(f"key: expected 1 to 255 characters, got {key!r}")
    if "\x00" in key:  # PostgreSQL's text cannot hold one; SQLite's could
        raise UsageError(f"key: holds a NUL character: {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, as argv decodes them
        raise UsageError(f"key: not UTF-8 text: {key!r}") from None
    return key


def _flag(name: str, value: Any) -> bool:
    # Only a boolean (or None, unset, as for every other field): bool("no")
    # is True, and would hold a job asked not to be held.
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UsageError(f"{name}: expected true or false, got {value!r}")
    return value


# Fields of a `submit --batch` line, as the CLI options name them, and how
# each is read.
_LINE_FIELDS = {
    "action": ("action", None), "params": ("params", None), "priority": ("priority", None),
    "at": ("run_at", "when"), "run_at": ("run_at", "when"),
    "in": ("run_in", "duration"), "run_in": ("run_in", "duration"),
    "max_start": ("max_start_at", "when"), "max_start_at": ("max_start_at", "when"),
    "timeout": ("timeout", "duration"), "retries": ("retries", None),
    "needs": ("needs", None), "key": ("key", None), "hold": ("hold", None),
}


def specs_from_lines(registry: Registry, lines: Iterable[str | bytes]) -> list[JobSpec]:
    """One JobSpec per non-empty JSON line (text, or UTF-8 bytes as
    `batch_lines` reads them); UsageError names the first bad line, so a bad
    line rejects the whole batch before anything is written."""
    specs = []
    for number, line in enumerate(lines, 1):
        try:
            text = _line_text(line)
            if text.strip():
                specs.append(_spec_from_line(registry, text))
        except (UsageError, ConfigError) as exc:
            raise UsageError(f"line {number}: {exc}") from None
    return specs


def batch_lines(handle: BinaryIO) -> Iterator[bytes]:
    """The lines of a batch file, each read with a bound: a line longer than
    BATCH_LINE_MAX_BYTES comes out cut (and is refused as too long) instead
    of being read whole into memory."""
    while line := handle.readline(limits.BATCH_LINE_MAX_BYTES + 1):
        yield line


def _line_text(line: str | bytes) -> str:
    if len(line.rstrip(b"\r\n" if isinstance(line, bytes) else "\r\n")) \
            > limits.BATCH_LINE_MAX_BYTES:
        raise UsageError(f"longer than the limit of {limits.BATCH_LINE_MAX_BYTES} bytes")
    if isinstance(line, str):
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"not UTF-8 text (byte {exc.start + 1})") from None


def _spec_from_line(registry: Registry, line: str) -> JobSpec:
    try:
        # One level more than params: the line's object holds them.
        fields = limits.loads(line, outer=1)
    except limits.LimitError as exc:
        raise UsageError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"not JSON: {exc}") from None
    if not isinstance(fields, dict) or "action" not in fields:
        raise UsageError('expected an object with an "action", like {"action": "noop"}')
    unknown = sorted(set(fields) - set(_LINE_FIELDS))
    if unknown:
        raise UsageError(f"unknown field(s): {', '.join(unknown)}")
    options: dict[str, Any] = {}
    for name, value in fields.items():
        target, kind = _LINE_FIELDS[name]
        if kind == "when" and value is not None:
            value = parse_when(value, name)
        elif kind == "duration" and value is not None:
            value = parse_duration(value, name)
        options[target] = value
    if not isinstance(options.get("params", {}), dict):
        raise UsageError("params: expected a JSON object")
    return build_spec(registry, options.pop("action"), **options)


class Client:
    """Submit and follow jobs on one database. Build it with `connect()`."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings)
        self._store = store

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def submit(self, action: str, params: Mapping[str, Any] | None = None, **options: Any) -> int:
        """Store one job; returns its id (an open job's id for a known `key`)."""
        return self.submit_specs([build_spec(self.registry, action, params, **options)])[0].id

    def submit_many(self, jobs: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store several jobs in one transaction; all or none."""
        specs = []
        for number, job in enumerate(jobs, 1):
            unknown = set(job) - set(_SPEC_FIELDS)
            if unknown or "action" not in job:
                problem = f"unknown field(s) {sorted(unknown)}" if unknown else "no action"
                raise UsageError(f"job {number}: {problem}")
            fields = dict(job)
            try:
                specs.append(build_spec(self.registry, fields.pop("action"), **fields))
            except UsageError as exc:
                raise UsageError(f"job {number}: {exc}") from None
        return [s.id for s in self.submit_specs(specs)]

    def submit_specs(self, specs: list[JobSpec]) -> list[Submitted]:
        return self.store.jobs_submit(specs) if specs else []

    def get(self, job_id: int) -> Job:
        return self.store.job_get(job_id)

    def cancel(self, job_id: int) -> Status:
        return self.store.job_cancel(job_id)

    def wait(self, job_id: int, timeout: float | None = None, interval: float = 0.2) -> Job:
        """Poll until the job is final; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.store.job_get(job_id)
            if job.status in FINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status.value}")
            time.sleep(interval)

    def close(self) -> None:
        if self._store is not None:
            self._store.dispose()


def connect(database_url: str | None = None) -> Client:
    """A client on `database_url`, else on the configured database."""
    return Client(load_settings(database_url=database_url))


_default: Client | None = None


def _default_client() -> Client:
    global _default
    if _default is None:
        _default = connect()
    return _default


def submit(action: str, params: Mapping[str, Any] | None = None, *,
           priority: int | None = None, run_at: dt.datetime | None = None,
           max_start_at: dt.datetime | None = None, timeout: float | None = None,
           retries: int | None = None, needs: Mapping[str, int] | None = None,
           key: str | None = None, hold: bool = False) -> int:
    """Submit one job with the configured settings; returns its id.

    None for priority, retries or needs means the action's registered
    default (else 0, 0, {default = 1}); None for timeout means the action's,
    else the `default_timeout` setting, decided when the job runs. Raises
    UsageError for an unknown action or a bad value, writing nothing.
    """
    return _default_client().submit(
        action, params, priority=priority, run_at=run_at, max_start_at=max_start_at,
        timeout=timeout, retries=retries, needs=needs, key=key, hold=hold)


def submit_many(jobs: Iterable[Mapping[str, Any]]) -> list[int]:
    """Submit several jobs in one transaction; returns their ids in order."""
    return _default_client().submit_many(jobs)
