"""runjobs: a cron minute-cycle job engine on SQLite or PostgreSQL.

The Python API (`submit`, `submit_many`, `connect`) is imported lazily so that
`import runjobs` stays cheap for the runner's idle path.
"""

from .errors import DoNotRetry, RunjobsError

__version__ = "0.1.0"
__all__ = ["DoNotRetry", "RunjobsError", "connect", "submit", "submit_many", "__version__"]


def __getattr__(name):
    if name in ("connect", "submit", "submit_many", "Client"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'runjobs' has no attribute {name!r}")
