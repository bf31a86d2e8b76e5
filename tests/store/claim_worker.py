"""One claiming process for test_contention:
`python claim_worker.py NODE CAPACITY_JSON LIMIT_JSON`.

It opens its own store from the environment (RUNJOBS_DATABASE_URL), registers
its own runner, prints "ready", waits for a line on stdin (the barrier), then
claims, starts and finishes round after round until nothing is left, and
prints the ids it claimed as one JSON list.
"""

from __future__ import annotations

import json
import os
import sys

from runjobs.config import load_settings
from runjobs.store import open_store
from test_contention import drain  # this folder is sys.path[0]


def main() -> None:
    node, capacity, limit = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    store = open_store(load_settings(os.environ))
    runner_id = store.runner_register(node, os.getpid(), None, None, "test")
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = drain(store, runner_id, node, capacity, limit)
    print(json.dumps(claimed), flush=True)
    store.dispose()


if __name__ == "__main__":
    main()
