"""The registry of workloads: one module each, listed once in :data:`WORKLOAD_MODULES`.

A workload module defines ``WORKLOAD``, a :class:`benchmarks.harness.Workload` holding
its inputs, server knobs, ideal, answer check and contenders. To add one (a warm-cache
re-run, a Dask cluster, a local model), write ``benchmarks/workloads/<name>.py`` and
add its name here; the harness, the report and the chart pick it up.
"""

from __future__ import annotations

import importlib

from benchmarks.harness import Workload

__all__ = ["WORKLOAD_MODULES", "load_workloads"]

#: Module names under benchmarks.workloads, in report order.
WORKLOAD_MODULES: tuple[str, ...] = (
    "fanout",
    "embed_batching",
    "pipeline",
    "scheduler_overhead",
    "faults",
    "random_429",
    "overload",
    "staggered",
    "warm_rerun",
    "batch_cost",
    "cluster",
    "dataframe",
    "local_embed",
)


def load_workloads() -> list[Workload]:
    workloads = []
    for name in WORKLOAD_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        workloads.append(module.WORKLOAD)
    return workloads
