"""Two checkouts of runjobs, paired: is a change (a reshaping, a new hot
path) slower than what it replaces?

    python -m bench.trees A B [--workload drain|submit] [--db sqlite|postgresql]
                              [--size N] [--pairs N]

Each pair runs the workload once in checkout A, then once in checkout B,
each with its own `.venv/bin/python` and its own `bench/` and `runjobs/`,
on a fresh database; the ratio B / A is taken per pair and the median of
the pairs reported, so the machine's drift between pairs cancels out.
Beside the rate, the CPU time runjobs' processes spent per job (the
harness's and its runners', not the database server's) is paired too: on
a shared machine a rate moves with what else runs, CPU time much less.
Both checkouts need this harness's `bench/dbs.py` and `bench/workloads.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# The figure each workload is judged by, as bench/workloads.py names it.
FIGURES = {"drain": "jobs_per_s_excl_startup", "submit": "api_per_s"}

# Run in a checkout: one run of one workload on a fresh database, its
# figures as JSON on the last line.
ONE_RUN = """
import json, resource, sys, tempfile, time
from pathlib import Path
from bench import dbs, workloads
kind, size, pg_url = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
target = dbs.Target(kind, Path(tempfile.mkdtemp(prefix="trees-")), pg_url)
def cpu():
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in (own, children))
try:
    with target.fresh() as db:
        before = cpu()
        figures = getattr(workloads, sys.argv[4])(db, size)
        figures["cpu_us_per_job"] = (cpu() - before) / size * 1e6
finally:
    target.close()
print(json.dumps(figures))
"""


def one_run(tree: Path, workload: str, kind: str, size: int) -> dict[str, float]:
    argv = [str(tree / ".venv" / "bin" / "python"), "-c", ONE_RUN, kind, str(size),
            os.environ.get("RUNJOBS_BENCH_PG_URL", ""), workload]
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        raise SystemExit(f"bench.trees: {tree}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--workload", choices=sorted(FIGURES), default="drain")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    figure = FIGURES[args.workload]
    for tree in (args.a, args.b):
        # As an install does, and as `python -m bench` does: machines that set
        # PYTHONDONTWRITEBYTECODE would otherwise compile every module from
        # source in every runner, and a checkout with more modules pay more.
        subprocess.run([str(tree / ".venv" / "bin" / "python"), "-m", "compileall", "-q",
                        str(tree / "runjobs"), str(tree / "bench")], check=True,
                       capture_output=True)
    ratios: dict[str, list[float]] = {figure: [], "cpu_us_per_job": []}
    for number in range(1, args.pairs + 1):
        run_a = one_run(args.a, args.workload, args.db, args.size)
        run_b = one_run(args.b, args.workload, args.db, args.size)
        for name, values in ratios.items():
            values.append(run_b[name] / run_a[name])
        print(f"pair {number}: " + "; ".join(
            f"{name} A {run_a[name]:,.1f} B {run_b[name]:,.1f} B/A {values[-1]:.3f}"
            for name, values in ratios.items()), flush=True)
    for name, values in ratios.items():
        print(f"{args.workload} {args.db} {name}: B/A median {statistics.median(values):.3f} "
              f"over {len(values)} pairs ({', '.join(f'{r:.3f}' for r in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
