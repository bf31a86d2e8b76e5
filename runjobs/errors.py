"""One error root for runjobs; the CLI maps these to exit codes."""


class RunjobsError(Exception):
    """Base of every error runjobs raises on purpose."""


class ConfigError(RunjobsError):
    """A setting is missing or invalid; the message names the key."""


class UsageError(RunjobsError):
    """Bad input from a caller (unknown action, malformed value)."""


class NotFound(RunjobsError):
    """A job (or runner, cron) that is not there."""


class Conflict(RunjobsError):
    """The job exists but its status forbids the operation."""


class SchemaError(RunjobsError):
    """The database schema is not at the revision this code expects."""


class StoreError(RunjobsError):
    """The database failed; wraps driver errors at the store boundary."""


class DoNotRetry(Exception):
    """Raised by an action: the job fails and is never retried.

    Deliberately not a RunjobsError: it is raised by user code, and an action
    that catches RunjobsError for its own reasons must not swallow it.
    """
