"""Benchmark suite of runjobs: `python -m bench [--quick] [--only W,..] [--db D]`.

Runs each workload (see bench/workloads.py) on a fresh database per run,
three times (once with --quick). Each engine run that has a yardstick (a
plain client doing the same work, bench/yardsticks.py) runs right beside it,
and their ratio is taken per pair: the report leads with the medians of
those paired ratios, then the medians of each figure and the targets, and
writes it all as JSON. Exits 1 when a workload failed (not when a target is
missed: a benchmark reports, the numbers are for people to judge).
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

from . import workloads, yardsticks
from .dbs import REPO, Target

WORKLOADS = ("cycle", "submit", "latency", "drain", "growth")
SIZES = {
    "full": dict(drain=20_000, submit=5_000, latency=200, growth=1_000_000,
                 repeat=3, budget=540),
    "quick": dict(drain=1_000, submit=300, latency=30, growth=50_000,
                  repeat=1, budget=50),
}

# The targets: (name, database, figure "workload.metric", comparison,
# bound). The ratios first: they hold across machines; absolute rates and
# times move several-fold between machines of one kind.
TARGETS = [
    # Each engine drain over the plain drain run just before it, both timed
    # from first claim to last finish (see _drain_rounds).
    ("drain PostgreSQL vs plain SQL 1 job/round trip", "postgresql",
     "drain.vs_plain_1", ">=", 2.0),
    # Each run's API submits over the plain inserts taking turns with them.
    ("API submit vs plain insert PostgreSQL", "postgresql", "submit.vs_plain", ">=", 0.6),
    ("API submit vs plain insert SQLite", "sqlite", "submit.vs_plain", ">=", 0.6),
    # Each growth drain over the drain run just before it.
    ("growth ratio PostgreSQL", "postgresql", "growth.pair_ratio", ">=", 0.95),
    ("growth ratio SQLite", "sqlite", "growth.pair_ratio", ">=", 0.95),
    ("drain PostgreSQL jobs/s (from exec)", "postgresql", "drain.jobs_per_s", ">=", 7500),
    ("drain SQLite jobs/s (from exec)", "sqlite", "drain.jobs_per_s", ">=", 7500),
    ("API submits/s PostgreSQL", "postgresql", "submit.api_per_s", ">=", 2500),
    ("API submits/s SQLite", "sqlite", "submit.api_per_s", ">=", 2500),
    ("latency PostgreSQL p50 ms", "postgresql", "latency.p50_ms", "<=", 3),
    ("latency PostgreSQL p95 ms", "postgresql", "latency.p95_ms", "<=", 5),
    ("latency SQLite max ms (poll interval 1 s)", "sqlite", "latency.max_ms", "<=", 1000),
    ("start to first claim s PostgreSQL", "postgresql", "cycle.first_claim_s", "<=", 0.25),
    ("start to first claim s SQLite", "sqlite", "cycle.first_claim_s", "<=", 0.25),
    ("idle bin/runjobs.sh --once wall s PostgreSQL", "postgresql", "cycle.idle_wall_s", "<", 0.4),
    ("idle bin/runjobs.sh --once wall s SQLite", "sqlite", "cycle.idle_wall_s", "<", 0.4),
    ("idle --once peak RSS MB PostgreSQL", "postgresql", "cycle.idle_peak_rss_mb", "<", 60),
    ("idle --once peak RSS MB SQLite", "sqlite", "cycle.idle_peak_rss_mb", "<", 60),
]

# The ratios taken within a pair of runs (an engine run and the run beside
# it), what each is over, in the order the report leads with them.
PAIRED_RATIOS = {
    "drain.vs_plain_1": "drain / plain SQL, 1 job per round trip",
    "drain.vs_plain_50": "drain / plain SQL, 50 jobs per round trip",
    "submit.vs_plain": "API single submits / plain inserts in turns",
    "growth.pair_ratio": "drain among finished jobs / the drain before it",
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
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    targets = {kind: Target(kind, root, pg_url) for kind in kinds}
    results: dict[str, dict] = {kind: {} for kind in kinds}
    code_before = _code_hash()
    try:
        for workload in args.only:
            if workload == "growth":
                continue  # in turns with the drains (parse_args adds "drain")
            for kind in kinds:
                if workload == "drain":
                    results[kind].update(_drain_rounds(targets[kind], size, "growth" in args.only,
                                                       started, notes))
                else:
                    results[kind][workload] = _run(targets[kind], workload, size)
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - started
    if _code_hash() != code_before:
        notes.append("runjobs/ changed while the benchmark ran: its figures mix versions of "
                     "the code; run it again")
    report = {
        "started": started_at,
        "mode": "quick" if args.quick else "full",
        "wall_s": round(wall, 1),
        "sizes": size,
        "machine": machine(targets),
        "notes": notes + [
            "yardsticks: a plain client on the runjobs schema as migrated (indexes and event "
            "triggers in place), in autocommit with runjobs' session settings, on analyzed "
            "tables; drains timed from first claim to last finish on both sides; the plain "
            "drains are PostgreSQL only"],
        "results": results,
        "paired_ratios": {k: _paired_ratios(results[k]) for k in kinds},
        "targets": _targets(results),
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({wall:.0f} s)")
    failed = any("error" in w for r in results.values() for w in r.values())
    return 1 if failed else 0


def _run(target: Target, workload: str, size: dict) -> dict:
    """`repeat` runs of one workload, each on a fresh database; the median
    of each figure."""
    runs = []
    for _ in range(size["repeat"]):
        figures = _run_once(target, workload, size)
        if isinstance(figures, str):
            return _entry(runs, figures)
        runs.append(figures)
    return _entry(runs)


def _drain_rounds(target: Target, size: dict, growth: bool, started: float,
                  notes: list[str]) -> dict:
    """`repeat` rounds of drains, each run on a fresh database right after
    the one before, so that the runs of a round meet the machine in the same
    state: on PostgreSQL the plain drains claiming 50 and then 1 job per
    round trip, then the engine's drain, then (with `growth`) the growth
    drain. Each ratio is taken within its round (`vs_plain_1`, `vs_plain_50`
    on the drain, `pair_ratio` on the growth drain) and the report gives the
    median of those: rates measured minutes apart moved by 10-20 % on our
    machines, and a ratio of two medians of three could land anywhere in
    that band. The growth drain is left out of the last rounds if the time
    budget ends (said in the notes); an error ends the rounds."""
    steps = (["plain_50", "plain_1"] if target.kind == "postgresql" else []) + ["drain"]
    drains: list[dict] = []
    growths: list[dict] = []
    error = None
    for _ in range(size["repeat"]):
        with_growth = growth and _growth_fits(growths, size, started)
        figures = _run_round(target, steps + (["growth"] if with_growth else []), size)
        if isinstance(figures, str):
            error = figures
            break
        drains.append(_drain_figures(figures))
        if with_growth:
            growths.append(dict(figures["growth"], pair_ratio=figures["growth"]["jobs_per_s"]
                                / figures["drain"]["jobs_per_s"]))
    if growth and not error and len(growths) < size["repeat"]:
        notes.append(f"{target.kind}: {len(growths)} growth drain(s) instead of "
                     f"{size['repeat']} to stay within the {size['budget']} s budget")
        print("bench: " + notes[-1])
    entries = {"drain": _entry(drains, error)}
    if growth:
        entries["growth"] = _entry(growths, error)
    return entries


def _run_round(target: Target, steps: list[str], size: dict) -> dict[str, dict] | str:
    """One run of each step, in order: each one's figures, or what went wrong."""
    figures = {}
    for step in steps:
        got = _run_once(target, step, size)
        if isinstance(got, str):
            return f"{step}: {got}"
        figures[step] = got
    return figures


def _drain_figures(figures: dict[str, dict]) -> dict:
    """The engine drain's figures, with its plain drains' rates and its
    ratios to them when there are any (PostgreSQL)."""
    drain = dict(figures["drain"])
    for batch in (1, 50):
        plain = figures.get(f"plain_{batch}")
        if plain:
            drain[f"plain_{batch}_per_s"] = plain["per_s"]
            drain[f"vs_plain_{batch}"] = drain["jobs_per_s_excl_startup"] / plain["per_s"]
    return drain


def _growth_fits(growths: list[dict], size: dict, started: float) -> bool:
    """Whether another growth drain fits the time budget, judged by the
    last one (the first always runs)."""
    return not growths or _time_left(growths[-1]["run_s"], size, started)


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
            elif workload in ("plain_1", "plain_50"):
                batch = int(workload.split("_")[1])
                figures = yardsticks.plain_drain(db, size["drain"], batch)
            elif workload == "growth":
                figures = workloads.drain(db, size["drain"], preload=size["growth"])
            elif workload == "submit":
                figures = workloads.submit(db, size["submit"])
            elif workload == "latency":
                figures = workloads.latency(db, size["latency"])
            else:
                figures = workloads.cycle(db)
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


def _figure(results: dict, name: str) -> float | None:
    """The median of a figure "workload.metric", None if not measured."""
    workload, metric = name.split(".")
    return results.get(workload, {}).get("median", {}).get(metric)


def _paired_ratios(results: dict) -> dict:
    """The median and each pair's value of every paired ratio measured."""
    out = {}
    for name in PAIRED_RATIOS:
        workload, metric = name.split(".")
        runs = results.get(workload, {}).get("runs", [])
        if runs and metric in runs[0]:
            out[name] = {"median": _figure(results, name), "pairs": [r[metric] for r in runs]}
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
    _print_paired_ratios(report)
    _print_figures(report)
    _print_targets(report)
    for note in report["notes"]:
        print("note: " + note)


def _print_paired_ratios(report: dict) -> None:
    kinds = list(report["results"])
    print(f"\npaired ratios: median, then each pair's ({report['mode']} sizes)")
    for name, meaning in PAIRED_RATIOS.items():
        for kind in kinds:
            ratio = report["paired_ratios"][kind].get(name)
            if ratio:
                pairs = ", ".join(_fmt(r) for r in ratio["pairs"])
                print(f"{name + ' ' + kind:<36}{_fmt(ratio['median']):>8}  ({pairs})  {meaning}")


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
    print(f"\nmedians of {report['sizes']['repeat']} run(s) each; rates and times depend on "
          "the machine")
    header = f"{'figure':<40}" + "".join(f"{k:>14}" for k in kinds)
    print(header)
    print("-" * len(header))
    for name in _figure_names(results):
        print(f"{name:<40}" + "".join(f"{_fmt(_figure(results[k], name)):>14}" for k in kinds))
    for kind in kinds:
        for workload, entry in results[kind].items():
            if "error" in entry:
                print(f"{kind} {workload}: FAILED: {entry['error']}")


def _print_targets(report: dict) -> None:
    kinds = list(report["results"])
    print(f"\n{'target':<52}{'bound':>10}{'measured':>12}  result")
    for t in report["targets"]:
        if t["database"] not in kinds:
            continue
        result = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"{t['target']:<52}{t['bound']:>10}{_fmt(t['measured']):>12}  {result}")


if __name__ == "__main__":
    sys.exit(main())
