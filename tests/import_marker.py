"""Importing this module leaves a marker file: proof that something imported it.
Tests name it in a job row for an action that is not registered."""

import os

_path = os.environ.get("RUNJOBS_TEST_IMPORT_MARKER")
if _path:
    open(_path, "w").close()


def run(ctx):
    pass
