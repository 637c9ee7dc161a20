"""Scheduler overhead: tens of thousands of trivial Python tasks, no I/O at all.

Each task adds one to its input; a last task sums them all. Whatever time this takes
is the price of building the graph and scheduling it, which in a real workload is paid
on top of the model calls. The ideal is zero overhead; the report gives microseconds
per task and the ratio to dask's own schedulers on the same graph. A plain Python loop
is shown for reference (it is not a peer: it builds no graph).

Size: 10,000 tasks, not 50,000. With dask 2026.8, building (and culling) a graph whose
last task takes a list of N delayed values costs time quadratic in N, for
``dask.delayed`` and for ``feste_task`` alike (both go through dask's
``unpack_collections`` and per-layer culling); at 50,000 a single run takes minutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask

from benchmarks.harness import GRAPH_BUILT, Contender, Ideal, Job, Size, Workload

__all__ = ["WORKLOAD", "increment"]


def increment(value: int) -> int:
    return value + 1


def total(values: list[int]) -> int:
    return sum(values)


def make_numbers(n: int) -> list[int]:
    return list(range(n))


def check_total(inputs: list[int], output: Any) -> str | None:
    expected = sum(inputs) + len(inputs)
    return None if output == expected else f"total {output!r}, expected {expected}"


def overhead_ideal(n: int, server: Mapping[str, Any]) -> Ideal:
    return Ideal(seconds=0.0, formula="no I/O: any time spent is scheduling overhead")


def run_feste(job: Job) -> int:
    import feste
    from feste import feste_task

    lazy_increment = feste_task(increment)
    lazy_total = feste_task(total)
    result = lazy_total([lazy_increment(value) for value in job.inputs])
    job.mark(GRAPH_BUILT)
    (value,) = feste.compute(result)
    return int(value)


def _dask(job: Job, scheduler: str) -> int:
    result = dask.delayed(total)([dask.delayed(increment)(value) for value in job.inputs])
    job.mark(GRAPH_BUILT)
    (value,) = dask.compute(result, scheduler=scheduler)
    return int(value)


def run_dask_threads(job: Job) -> int:
    return _dask(job, "threads")


def run_plain_loop(job: Job) -> int:
    return total([increment(value) for value in job.inputs])


WORKLOAD = Workload(
    name="scheduler_overhead",
    title="scheduler overhead: trivial Python tasks",
    description="N tasks adding one to a number, then one task summing them; no I/O.",
    size=Size(full=10_000, quick=1_000),
    server={},
    settings={},
    make_inputs=make_numbers,
    ideal=overhead_ideal,
    check=check_total,
    contenders=(
        Contender("feste", run_feste, kind="feste"),
        Contender("dask.delayed, threaded scheduler", run_dask_threads),
        Contender("plain Python loop", run_plain_loop, kind="reference", note="no graph"),
    ),
    per_item=True,
)
