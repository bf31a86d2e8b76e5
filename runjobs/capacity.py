"""A node's capacity and a job's needs: maps of resource name to count.

Pure arithmetic, shared by the store's claim (what fits the free capacity)
and the runner (its own free slots).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

DEFAULT_NEEDS = {"default": 1}


def needs_of(raw: Mapping[str, int] | None) -> dict[str, int]:
    return dict(raw) if raw else dict(DEFAULT_NEEDS)


def fits(needs: Mapping[str, int], free: Mapping[str, int]) -> bool:
    return all(free.get(name, 0) >= count for name, count in needs.items())


def fitting(candidates: Iterable[tuple[int, Any]], free: dict[str, int], most: int) -> list[int]:
    """Ids of the candidates, in order, that fit `free` (which it consumes)."""
    chosen = []
    for job_id, raw_needs in candidates:
        if len(chosen) >= most:
            break
        needs = needs_of(raw_needs)
        if fits(needs, free):
            chosen.append(job_id)
            for name, count in needs.items():
                free[name] -= count
    return chosen


def usage(needs_list: Iterable[Mapping[str, int] | None]) -> dict[str, int]:
    used: dict[str, int] = {}
    for raw in needs_list:
        for name, count in needs_of(raw).items():
            used[name] = used.get(name, 0) + count
    return used

