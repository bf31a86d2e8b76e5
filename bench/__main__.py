"""Benchmark suite of runjobs: `python -m bench [--quick] [--only W,..] [--db D]`.

Runs each workload (see bench/workloads.py and bench/ceiling.py) on a fresh
database per run, three times (once with --quick), prints medians, their
ratios to the plain-SQL ceiling and the targets, and writes it all as JSON.
Exits 1 when a workload failed (not when a target is missed: a benchmark
reports, the numbers are for people to judge).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from . import workloads
from .ceiling import ceiling
from .dbs import REPO, Target

WORKLOADS = ("ceiling", "cycle", "submit", "latency", "drain", "growth")
SIZES = {
    "full": dict(drain=20_000, submit=5_000, latency=200, growth=1_000_000,
                 ceiling=20_000, insert=5_000, repeat=3, budget=540),
    "quick": dict(drain=1_000, submit=300, latency=30, growth=50_000,
                  ceiling=1_000, insert=300, repeat=1, budget=50),
}

# The targets: (name, database, figure, comparison, bound).
# A figure is "workload.metric" or a ratio "a/b" of two figures.
TARGETS = [
    ("drain PostgreSQL jobs/s", "postgresql", "drain.jobs_per_s", ">=", 7500),
    ("drain PostgreSQL vs plain SQL 1/round trip", "postgresql",
     "drain.jobs_per_s/ceiling.drain_1_per_s", ">=", 2.0),
    ("drain SQLite jobs/s", "sqlite", "drain.jobs_per_s", ">=", 7500),
    ("API submits/s PostgreSQL", "postgresql", "submit.api_per_s", ">=", 2500),
    # The plain inserts taking turns with the API's submits (workloads.submit).
    ("API submit vs plain insert PostgreSQL", "postgresql",
     "submit.api_per_s/submit.plain_insert_per_s", ">=", 0.6),
    ("API submits/s SQLite", "sqlite", "submit.api_per_s", ">=", 2500),
    ("API submit vs plain insert SQLite", "sqlite",
     "submit.api_per_s/submit.plain_insert_per_s", ">=", 0.6),
    ("latency PostgreSQL p50 ms", "postgresql", "latency.p50_ms", "<=", 3),
    ("latency PostgreSQL p95 ms", "postgresql", "latency.p95_ms", "<=", 5),
    ("latency SQLite max ms (poll interval 1 s)", "sqlite", "latency.max_ms", "<=", 1000),
    ("start to first claim s PostgreSQL", "postgresql", "cycle.first_claim_s", "<=", 0.25),
    ("start to first claim s SQLite", "sqlite", "cycle.first_claim_s", "<=", 0.25),
    ("idle bin/runjobs.sh --once wall s PostgreSQL", "postgresql", "cycle.idle_wall_s", "<", 0.4),
    ("idle bin/runjobs.sh --once wall s SQLite", "sqlite", "cycle.idle_wall_s", "<", 0.4),
    ("idle --once peak RSS MB PostgreSQL", "postgresql", "cycle.idle_peak_rss_mb", "<", 60),
    ("idle --once peak RSS MB SQLite", "sqlite", "cycle.idle_peak_rss_mb", "<", 60),
    # Each growth drain's ratio to the drain run just before it; the median
    # of those (see _run_pairs).
    ("growth ratio PostgreSQL", "postgresql", "growth.pair_ratio", ">=", 0.95),
    ("growth ratio SQLite", "sqlite", "growth.pair_ratio", ">=", 0.95),
]

# Figures printed as a ratio of their ceiling, on the same database.
RATIOS = {
    "drain.jobs_per_s": "ceiling.drain_1_per_s",
    "drain.jobs_per_s_excl_startup": "ceiling.drain_1_per_s",
    "growth.jobs_per_s": "drain.jobs_per_s",
    "submit.api_per_s": "submit.plain_insert_per_s",
    "submit.cli_batch_per_s": "submit.plain_insert_per_s",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one run each (under a minute; what CI runs)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads of: {', '.join(WORKLOADS)}")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--require-pg", action="store_true",
                        help="fail without RUNJOBS_BENCH_PG_URL instead of skipping PostgreSQL")
    args = parser.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(sorted(unknown))}")
    if "growth" in only and "drain" not in only:
        only.append("drain")  # growth is reported as a ratio to the plain drain
    args.only = [w for w in WORKLOADS if w in only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    size = SIZES["quick" if args.quick else "full"]
    notes: list[str] = []
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    pg_url = os.environ.get("RUNJOBS_BENCH_PG_URL")
    if "postgresql" in kinds and not pg_url:
        if args.require_pg or args.db == "postgresql":
            print("bench: RUNJOBS_BENCH_PG_URL is not set (PostgreSQL required)", file=sys.stderr)
            return 2
        kinds.remove("postgresql")
        notes.append("PostgreSQL skipped: RUNJOBS_BENCH_PG_URL is not set")
        print("bench: " + notes[-1])
    _byte_compile(notes)
    root = Path(tempfile.mkdtemp(prefix="runjobs-bench-"))
    # The harness's own Client reads settings from the environment: keep the
    # host's config and home out of it, as for the runner processes.
    os.environ.update(RUNJOBS_HOME=str(root / "harness"), RUNJOBS_CONFIG=str(root / "runjobs.toml"))
    started = time.monotonic()
    targets = {kind: Target(kind, root, pg_url) for kind in kinds}
    results: dict[str, dict] = {kind: {} for kind in kinds}
    code_before = _code_hash()
    try:
        paired = {"drain", "growth"} <= set(args.only)
        for workload in args.only:
            if paired and workload == "growth":
                continue  # run with the drains, below
            for kind in kinds:
                if paired and workload == "drain":
                    results[kind].update(_run_pairs(targets[kind], size, started, notes))
                    continue
                repeat = size["repeat"]
                if workload == "growth":
                    repeat = _growth_repeats(results, [kind], size, started, notes)
                results[kind][workload] = _run(targets[kind], workload, size, repeat)
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - started
    if _code_hash() != code_before:
        notes.append("runjobs/ changed while the benchmark ran: its figures mix versions of "
                     "the code; run it again")
    report = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "wall_s": round(wall, 1),
        "sizes": size,
        "machine": machine(targets),
        "notes": notes + [
            "ceiling: plain SQL on the runjobs jobs table (fresh database from the migrations, "
            "all indexes) with triggers off (session_replication_role = replica on "
            "PostgreSQL; SQLite has no insert trigger since migration 0004); drain ceilings are "
            "PostgreSQL only"],
        "results": results,
        "ratios": {k: _ratios(results[k]) for k in kinds},
        "targets": _targets(results),
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({wall:.0f} s)")
    failed = any("error" in w for r in results.values() for w in r.values())
    return 1 if failed else 0


def _run(target: Target, workload: str, size: dict, repeat: int) -> dict:
    """`repeat` runs of one workload, each on a fresh database; the median
    of each figure."""
    runs = []
    for _ in range(repeat):
        figures = _run_once(target, workload, size)
        if isinstance(figures, str):
            return _entry(runs, figures)
        runs.append(figures)
    return _entry(runs)


def _run_pairs(target: Target, size: dict, started: float, notes: list[str]) -> dict:
    """The drain and the growth drain in turns (drain, growth, drain, ...),
    each on a fresh database, so that the two of a pair meet the machine in
    the same state: their ratio is a target, and whatever ran just before
    (the other database's drains and checkpoints) weighed on whichever
    workload came next. Each growth run's `pair_ratio` is its rate over its
    pair's drain: a SQLite drain of 20,000 jobs lasts one second, and its
    rate jumps between runs by 10 %, so a ratio of two medians of three could
    land anywhere in that band. Fewer pairs than `repeat` if the time budget
    ends first (said in the notes); an error ends both workloads."""
    drains: list[dict] = []
    growths: list[dict] = []
    error = None
    for _ in range(size["repeat"]):
        if growths and not _time_left(drains[-1]["run_s"] + growths[-1]["run_s"], size, started):
            notes.append(f"{target.kind}: {len(growths)} drain and growth pair(s) instead of "
                         f"{size['repeat']} to stay within the {size['budget']} s budget")
            print("bench: " + notes[-1])
            break
        for workload, runs in (("drain", drains), ("growth", growths)):
            figures = _run_once(target, workload, size)
            if isinstance(figures, str):
                error = figures
                break
            if workload == "growth":
                figures["pair_ratio"] = figures["jobs_per_s"] / drains[-1]["jobs_per_s"]
            runs.append(figures)
        if error:
            break
    return {"drain": _entry(drains, error), "growth": _entry(growths, error)}


def _time_left(seconds: float, size: dict, started: float) -> bool:
    return size["budget"] - (time.monotonic() - started) >= seconds


def _run_once(target: Target, workload: str, size: dict) -> dict | str:
    """One run on a fresh database: its figures, or what went wrong."""
    began = time.monotonic()
    print(f"bench: {target.kind} {workload} ...", end=" ", flush=True)
    try:
        with target.fresh() as db:
            if workload == "drain":
                figures = workloads.drain(db, size["drain"])
            elif workload == "growth":
                figures = workloads.drain(db, size["drain"], preload=size["growth"])
            elif workload == "submit":
                figures = workloads.submit(db, size["submit"])
            elif workload == "latency":
                figures = workloads.latency(db, size["latency"])
            elif workload == "cycle":
                figures = workloads.cycle(db)
            else:
                figures = ceiling(db, size["ceiling"], size["insert"])
    except Exception as exc:  # keep going: the other workloads still say something
        error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {error}")
        return error
    figures["run_s"] = time.monotonic() - began
    print(f"{figures['run_s']:.1f} s")
    return figures


def _entry(runs: list[dict], error: str | None = None) -> dict:
    """A workload's runs and the median of each figure."""
    entry: dict = {"runs": runs}
    if runs:
        entry["median"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if error:
        entry["error"] = error
    return entry


def _byte_compile(notes: list[str]) -> None:
    """Compile runjobs/ to bytecode first, as installing it does. Without
    this a checkout run with PYTHONDONTWRITEBYTECODE (as on our machines)
    compiles every module of runjobs from source in every runner process:
    about 50 ms of each start-up that no installed runjobs pays."""
    import compileall

    if not compileall.compile_dir(str(REPO / "runjobs"), quiet=1):
        raise RuntimeError("bench: runjobs/ does not compile")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        notes.append("runjobs/ byte-compiled first (PYTHONDONTWRITEBYTECODE is set here)")


def _code_hash() -> str:
    """A digest of runjobs/*.py: what code the runners imported."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "runjobs").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _growth_repeats(results: dict, kinds: list[str], size: dict, started: float,
                    notes: list[str]) -> int:
    """As many growth runs (up to `repeat`) as fit the time budget, judged
    from the plain drains' run times plus the bulk insert; fewer is said."""
    per_run = 0.0
    for kind in kinds:
        drain = results[kind].get("drain", {}).get("median")
        # A growth run is a drain plus a bulk insert of `growth` rows
        # (measured here at about 15 s per million on either database).
        per_run += (drain["run_s"] if drain else 60) * 1.2 + 15 * size["growth"] / 1e6
    left = size["budget"] - (time.monotonic() - started)
    repeat = max(1, min(size["repeat"], int(left // per_run) if per_run else size["repeat"]))
    if repeat < size["repeat"]:
        notes.append(f"growth: {repeat} run(s) instead of {size['repeat']} to stay within "
                     f"the {size['budget']} s budget (about {per_run:.0f} s per run)")
        print("bench: " + notes[-1])
    return repeat


def _figure(medians: dict, name: str) -> float | None:
    if "/" in name:
        top, bottom = (_figure(medians, n) for n in name.split("/"))
        return top / bottom if top is not None and bottom else None
    workload, metric = name.split(".")
    return medians.get(workload, {}).get("median", {}).get(metric)


def _ratios(medians: dict) -> dict:
    out = {}
    for figure, ceiling_name in RATIOS.items():
        value = _figure(medians, f"{figure}/{ceiling_name}")
        if value is not None:
            out[f"{figure}/{ceiling_name}"] = value
    return out


def _targets(results: dict) -> list[dict]:
    out = []
    for name, kind, figure, op, bound in TARGETS:
        value = _figure(results[kind], figure) if kind in results else None
        met = None if value is None else {">=": value >= bound, "<=": value <= bound,
                                          "<": value < bound}[op]
        out.append({"target": name, "figure": figure, "database": kind,
                    "bound": f"{op} {bound}", "measured": value, "met": met})
    return out


def machine(targets: dict[str, Target]) -> dict:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    info = {
        "nproc": os.cpu_count(),
        "memory": first("/proc/meminfo", "MemTotal"),
        "cpu": first("/proc/cpuinfo", "model name"),
        "python": platform.python_version(),
        "sqlite": targets["sqlite"].server_version() if "sqlite" in targets else None,
        "postgresql": targets["postgresql"].server_version() if "postgresql" in targets else None,
        # runjobs changes under the benchmark: say which code was measured.
        "commit": git("rev-parse", "--short", "HEAD"),
        "runjobs_modified": bool(git("status", "--porcelain", "runjobs")),
        "runjobs_sha256": _code_hash(),
    }
    return info


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def print_report(report: dict) -> None:
    _print_figures(report)
    _print_targets(report)
    for note in report["notes"]:
        print("note: " + note)


def _figure_names(results: dict) -> list[str]:
    names = []
    for workload in WORKLOADS:
        for kind_results in results.values():
            for metric in kind_results.get(workload, {}).get("median", {}):
                if metric != "run_s" and f"{workload}.{metric}" not in names:
                    names.append(f"{workload}.{metric}")
    return names


def _print_figures(report: dict) -> None:
    results, kinds = report["results"], list(report["results"])
    print(f"\nmedians of {report['sizes']['repeat']} run(s) each ({report['mode']} sizes)")
    header = f"{'figure':<40}" + "".join(f"{k:>14}{'ratio':>8}" for k in kinds)
    print(header)
    print("-" * len(header))
    for name in _figure_names(results):
        line = f"{name:<40}"
        for kind in kinds:
            ratio = report["ratios"][kind].get(f"{name}/{RATIOS.get(name)}")
            line += f"{_fmt(_figure(results[kind], name)):>14}"
            line += f"{(_fmt(ratio) + 'x') if ratio is not None else '':>8}"
        print(line)
    print("ratio: drain to ceiling.drain_1_per_s; submit to submit.plain_insert_per_s (plain "
          "inserts in turns with the submits, same database); growth to drain (medians); "
          "growth.pair_ratio: the median of each growth drain over the drain run just before it")
    for kind in kinds:
        for workload, entry in results[kind].items():
            if "error" in entry:
                print(f"{kind} {workload}: FAILED: {entry['error']}")


def _print_targets(report: dict) -> None:
    kinds = list(report["results"])
    print(f"\n{'target':<48}{'bound':>10}{'measured':>12}  result")
    for t in report["targets"]:
        if t["database"] not in kinds:
            continue
        result = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"{t['target']:<48}{t['bound']:>10}{_fmt(t['measured']):>12}  {result}")

if __name__ == "__main__":
    sys.exit(main())
