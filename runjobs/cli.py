"""The `runjobs` command line.

Each command parses (param types raise BadParameter before anything is
written), calls one client or store function, and renders. Settings and the
database are opened lazily, so `--help` and bad arguments touch nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import click

from . import limits
from .config import parse_duration, parse_when
from .errors import ConfigError, Conflict, NotFound, RunjobsError, UsageError
from .limits import ID_MAX, INT_MAX, INT_MIN, LIST_LIMIT_MAX
from .models import FINAL, WAIT_EXIT_CODES, Status

if TYPE_CHECKING:
    from .config import Settings


# -- param types -------------------------------------------------------------

class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, "duration")
        except ConfigError as exc:  # too long, infinite or not a duration: it says which
            self.fail(str(exc).removeprefix("duration: "), param, ctx)


class WhenType(click.ParamType):
    name = "WHEN"

    def convert(self, value, param, ctx):
        if isinstance(value, dt.datetime):
            return value
        try:
            return parse_when(value)
        except ConfigError as exc:
            self.fail(str(exc).removeprefix("time: "), param, ctx)


class NeedsType(click.ParamType):
    """RES=N, repeated: --needs scan=1 --needs io=2."""

    name = "RES=N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, count = value.partition("=")
        if not sep or not name or not count.isdigit():
            self.fail(f"{value!r} is not RES=N (like scan=1)", param, ctx)
        return name, int(count)


class StatusType(click.ParamType):
    """A status name, any case; the error lists the names as the contract spells them."""

    name = "STATUS"

    def convert(self, value, param, ctx):
        if isinstance(value, Status):
            return value
        try:
            return Status(value.upper())
        except ValueError:
            self.fail(f"{value!r} is not a status: one of {', '.join(s.value for s in Status)}",
                      param, ctx)


DURATION, WHEN, NEEDS, STATUS = DurationType(), WhenType(), NeedsType(), StatusType()
# Bounded integers (runjobs.limits): refused here, before the database, with
# the option's name and its range, on SQLite and PostgreSQL alike.
PRIORITY = click.IntRange(INT_MIN, INT_MAX)
RETRIES = click.IntRange(0, INT_MAX)
JOB_ID = click.IntRange(1, ID_MAX)
LIMIT = click.IntRange(1, LIST_LIMIT_MAX)


def parse_params(items: tuple[str, ...], base_json: str | None) -> dict[str, Any]:
    """KEY=VALUE gives a string, KEY:=JSON a JSON value; --params merges under."""
    params: dict[str, Any] = {}
    if base_json is not None:
        try:
            params = limits.loads(base_json)
        except limits.LimitError as exc:
            raise click.BadParameter(str(exc), param_hint="'--params'") from None
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="'--params'") from None
        if not isinstance(params, dict):
            raise click.BadParameter("must be a JSON object", param_hint="'--params'")
    for item in items:
        params.update([_one_param(item)])
    return params


def _one_param(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key or key == ":":
        raise click.BadParameter(f"{item!r} is not KEY=VALUE or KEY:=JSON", param_hint="PARAMS")
    if key.endswith(":"):
        try:
            return key[:-1], limits.loads(value)
        except limits.LimitError as exc:  # not the item itself: it may be a megabyte
            raise click.BadParameter(f"{key}=...: {exc}", param_hint="PARAMS") from None
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{item!r}: not JSON: {exc}", param_hint="PARAMS") from None
    return key, value


# -- the lazy context ----------------------------------------------------------

class Context:
    """Settings, client and store, built on first use.

    `settings`, when given, are used as they are; otherwise they are loaded
    on first use from `environ` (None: os.environ). Tests inject either, so
    a command runs in process on a test database without reading the real
    environment. `close()` disposes whatever was opened.
    """

    def __init__(self, settings: Settings | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self.environ = environ
        self._client = None
        self._schema_store = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from .config import load_settings

            self._settings = load_settings(self.environ)
        return self._settings

    @property
    def client(self):
        if self._client is None:
            from .api import Client

            self._client = Client(self.settings)
        return self._client

    @property
    def store(self):
        return self.client.store

    @property
    def schema_store(self):
        """A store on the database as it is: no schema check, no upgrade (for `db`)."""
        if self._schema_store is None:
            from .store import Store, make_engine

            self._schema_store = Store(make_engine(self.settings), self.settings)
        return self._schema_store

    def close(self) -> None:
        """Dispose the client's store and the schema store, if opened."""
        if self._client is not None:
            self._client.close()
        if self._schema_store is not None:
            self._schema_store.dispose()


pass_context = click.make_pass_decorator(Context, ensure=True)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat()
    if isinstance(value, Status):
        return value.value
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def fmt_time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# -- errors -> exit codes ---------------------------------------------------------

class RunjobsGroup(click.Group):
    """Maps RunjobsError to exit codes: bad input 2, everything else 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UsageError, ConfigError) as exc:  # a bad setting is bad input too
            raise click.UsageError(str(exc), ctx) from None
        except RunjobsError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=RunjobsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runjobs", prog_name="runjobs")
def cli() -> None:
    """runjobs: run jobs from a database queue, one cron minute at a time."""


# -- submit ---------------------------------------------------------------------

@cli.command()
@click.argument("action", required=False)
@click.argument("params", nargs=-1)
@click.option("--batch", type=click.File("rb"), metavar="FILE",
              help="One job per line as JSON ('-' for stdin), stored in one transaction.")
@click.option("--params", "params_json", metavar="JSON", help="Params as a JSON object (KEY=VALUE wins).")
@click.option("--priority", type=PRIORITY, help="Higher runs first (default: the action's, else 0).")
@click.option("--at", "run_at", type=WHEN, help="Start at or after WHEN (ISO 8601 with a zone, or now).")
@click.option("--in", "run_in", type=DURATION, help="Start after DURATION (like 10m).")
@click.option("--max-start", "max_start_at", type=WHEN, help="EXPIRED if not started by then.")
@click.option("--timeout", type=DURATION, help="Stop the job after DURATION: FAILURE.")
@click.option("--retries", type=RETRIES, help="Retries after a failure.")
@click.option("--needs", multiple=True, type=NEEDS, help="Capacity it takes, RES=N (repeat).")
@click.option("--key", help="Idempotency key: an open job with it is returned instead.")
@click.option("--hold", is_flag=True, help="Submit HELD, until `runjobs release`.")
@click.option("--wait", is_flag=True, help="Wait for a final status; exit 0 only for SUCCESS.")
@json_option
@pass_context
def submit(obj: Context, action, params, batch, params_json, priority, run_at, run_in,
           max_start_at, timeout, retries, needs, key, hold, wait, as_json):
    """Submit a job: ACTION [KEY=VALUE | KEY:=JSON ...]; prints its id."""
    if batch is not None:
        if action or params or wait:
            raise click.UsageError("--batch takes its jobs from FILE: give no ACTION or --wait")
        from .api import batch_lines, specs_from_lines

        specs = specs_from_lines(obj.client.registry, batch_lines(batch))
        for submitted in obj.client.submit_specs(specs):
            click.echo(submitted.id)
        return
    if action is None:
        raise click.UsageError("missing ACTION (or --batch FILE)")
    if run_at is not None and run_in is not None:
        raise click.UsageError("give --at or --in, not both")
    values = parse_params(params, params_json)
    from .api import build_spec

    spec = build_spec(obj.client.registry, action, values, priority=priority, run_at=run_at,
                      run_in=run_in, max_start_at=max_start_at, timeout=timeout,
                      retries=retries, needs=dict(needs) if needs else None, key=key, hold=hold)
    submitted = obj.client.submit_specs([spec])[0]
    if submitted.params_differ:
        click.echo(f"job {submitted.id} already has key {key!r}: its params were kept, "
                   "the new ones not applied", err=True)
    if as_json:
        emit_json(job_json(obj.store.job_get(submitted.id)))
    else:
        click.echo(submitted.id)
    if wait:
        sys.exit(_wait_exit_code(obj, submitted.id))


def _wait_exit_code(obj: Context, job_id: int) -> int:
    while (status := obj.store.job_status(job_id)) not in FINAL:
        time.sleep(0.2)
    return WAIT_EXIT_CODES[status]


# -- list, show, log -------------------------------------------------------------

def job_json(job, events=None) -> dict[str, Any]:
    data = job.as_dict()
    data["status"] = job.status.value
    if events is not None:
        data["events"] = [
            {"at": e.at, "status": e.status.value,
             "previous": e.previous.value if e.previous else None,
             "runner_id": e.runner_id, "attempt": e.attempt, "note": e.note}
            for e in events]
    return data


@cli.command("list")
@click.option("--status", "statuses", multiple=True, type=STATUS, help="Only these (repeat).")
@click.option("--action", help="Only this action.")
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@json_option
@pass_context
def list_command(obj: Context, statuses, action, limit, as_json):
    """Jobs, newest first."""
    found = obj.store.jobs_list(list(statuses), action, limit)
    if as_json:
        emit_json([job_json(j) for j in found])
        return
    click.echo(f"{'ID':>8}  {'STATUS':<9}  {'ACTION':<20}  {'PRI':>4}  {'TRY':>3}  "
               f"{'RUN AT (UTC)':<19}  {'FINISHED (UTC)':<19}")
    for job in found:
        click.echo(f"{job.id:>8}  {job.status.value:<9}  {job.action[:20]:<20}  {job.priority:>4}  "
                   f"{job.attempt:>3}  {fmt_time(job.run_at):<19}  {fmt_time(job.finished_at):<19}")


@cli.command()
@click.argument("job_id", type=JOB_ID, metavar="ID")
@json_option
@pass_context
def show(obj: Context, job_id, as_json):
    """One job: every field, its timeline, its last error."""
    job = obj.store.job_get(job_id)
    events = obj.store.job_events(job_id)
    if as_json:
        emit_json(job_json(job, events))
        return
    for name, value in job.as_dict().items():
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        click.echo(f"{name + ':':<18}{'-' if value is None else value}")
    click.echo("timeline:")
    for event in events:
        runner = f" runner {event.runner_id}" if event.runner_id else ""
        note = f"  {event.note}" if event.note else ""
        click.echo(f"  {fmt_time(event.at)}  {event.status.value:<9} attempt {event.attempt}"
                   f"{runner}{note}")


@cli.command("log")
@click.argument("job_id", type=JOB_ID, metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job is final.")
@pass_context
def log_command(obj: Context, job_id, follow):
    """The job's own log."""
    obj.store.job_get(job_id)  # NotFound for a job that is not there
    path = obj.settings.job_log_dir / f"{job_id}.log"
    offset = _print_from(path, 0)
    while follow and obj.store.job_status(job_id) not in FINAL:
        time.sleep(0.3)
        offset = _print_from(path, offset)
    if follow:
        _print_from(path, offset)


def _print_from(path, offset: int) -> int:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return offset
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return offset + len(chunk)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID, metavar="ID...")
@pass_context
def cancel(obj: Context, job_ids):
    """HELD/PENDING -> CANCELED; QUEUED/RUNNING -> TO_CANCEL (the runner stops it)."""
    failed = False
    for job_id in job_ids:
        try:
            status = obj.client.cancel(job_id)
            click.echo(f"job {job_id}: {status.value}")
        except (NotFound, Conflict) as exc:
            click.echo(f"Error: {exc}", err=True)
            failed = True
    if failed:
        sys.exit(1)


# -- run ------------------------------------------------------------------------

@cli.command()
@click.option("--once", is_flag=True, help="Claim until nothing is due, wait for those jobs, exit.")
@click.option("--period", type=DURATION, help="Cycle length (default: setting period, 60s).")
@click.option("--margin", type=DURATION, help="Exit this long before the boundary (default 5s).")
@pass_context
def run(obj: Context, once, period, margin):
    """One cycle: what bin/runjobs.sh (and so cron) runs."""
    from .cycle import run_cycle

    from .config import load_settings

    overrides = {k: v for k, v in (("period", period), ("margin", margin)) if v is not None}
    try:
        settings = load_settings(obj.environ, **overrides) if overrides else obj.settings
    except ConfigError as exc:
        if not overrides:
            raise
        raise click.UsageError(str(exc)) from None  # --period/--margin that do not fit
    sys.exit(run_cycle(settings, once=once))


# -- runners ----------------------------------------------------------------------

@cli.command()
@click.option("--limit", type=LIMIT, default=50, show_default=True)
@json_option
@pass_context
def runners(obj: Context, limit, as_json):
    """Runners, newest first: node, pid, state, heartbeat age, jobs. A runner
    whose heartbeat is too old (or whose process is gone) is shown dead."""
    from .rescue import runner_state
    from .runner import boot_id

    rows = obj.store.runners_list(limit)
    my_boot = boot_id()
    states = {r.id: runner_state(r, obj.settings, my_boot).value for r in rows}
    if as_json:
        emit_json([{"id": r.id, "node": r.node, "pid": r.pid, "state": states[r.id],
                    "started_at": r.started_at, "heartbeat_at": r.heartbeat_at,
                    "heartbeat_age": round(r.heartbeat_age, 3), "deadline": r.deadline,
                    "exited_at": r.exited_at, "jobs": list(r.running)} for r in rows])
        return
    click.echo(f"{'ID':>6}  {'NODE':<20}  {'PID':>7}  {'STATE':<9}  {'HEARTBEAT':>9}  JOBS")
    for r in rows:
        age = f"{r.heartbeat_age:.0f}s ago" if states[r.id] != "exited" else "-"
        click.echo(f"{r.id:>6}  {r.node[:20]:<20}  {r.pid:>7}  {states[r.id]:<9}  {age:>9}  "
                   f"{' '.join(map(str, r.running)) or '-'}")


# -- db --------------------------------------------------------------------------

@cli.group()
def db() -> None:
    """Schema migrations."""


@db.command()
@pass_context
def upgrade(obj: Context):
    """Upgrade the database schema to this version's head."""
    from . import migrate
    from .config import mask_url

    store = obj.schema_store
    before = store.schema_revision()
    migrate.upgrade(store)
    after = store.schema_revision()
    where = mask_url(obj.settings.database_url)
    click.echo(f"{where}: {before or 'empty'} -> {after}" if before != after
               else f"{where}: already at {after}")


@db.command()
@pass_context
def current(obj: Context):
    """The schema revision the database is at, and the one this code needs."""
    from .config import mask_url
    from .schema import HEAD_REVISION

    revision = obj.schema_store.schema_revision()
    state = "at head" if revision == HEAD_REVISION else f"needs {HEAD_REVISION}: run `runjobs db upgrade`"
    click.echo(f"{mask_url(obj.settings.database_url)}: {revision or 'empty'} ({state})")
    if revision != HEAD_REVISION:
        sys.exit(1)


def run_cli(argv: Sequence[str] | None = None, obj: Context | None = None) -> int:
    """Run the command line on `argv` (None: sys.argv[1:]) and return its
    exit code: errors are one line on stderr (bad input 2, a missing job or
    a status that forbids the command 1). `obj` is the context the commands
    get (None: a lazy one on os.environ); it is closed before returning.
    """
    obj = Context() if obj is None else obj
    try:
        code = cli.main(args=argv, prog_name="runjobs", standalone_mode=False, obj=obj)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help())
        code = 0
    except click.ClickException as exc:
        click.echo(f"runjobs: error: {exc.format_message()}", err=True)
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("runjobs: aborted", err=True)
        code = 1
    except SystemExit as exc:  # a command's own exit code: submit --wait, cancel, run
        code = exc.code
    finally:
        obj.close()
    return code if isinstance(code, int) else 0


def main() -> None:
    """Entry point (`runjobs`, `python -m runjobs`)."""
    sys.exit(run_cli())
