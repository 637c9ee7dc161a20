"""``python -m benchmarks.graph_build``: how fast feste builds and plans graphs, alone.

A micro-benchmark of the steps before any request: building lazy values (backend
calls, prompts, chains of dependent calls) and the static batching pass. No server is
needed: nothing is sent. Each figure is the best of a few runs in CPU time of this
process (the machine may be shared), with the cycle collector on, as in user code.

    python -m benchmarks.graph_build            # every figure
    python -m benchmarks.graph_build --calls 20000 --chain 2000

Figures:

* embed calls: ``OpenAI.embed(f"text {i}", model=...)`` calls, microseconds per call,
  and the memory the graph holds (tracemalloc's peak while building, and the growth
  of the resident size);
* chat calls and prompt renderings, microseconds per call;
* chains of dependent calls, seconds to build: ``feste_task`` chains and backend chat
  chains (``v = llm.chat(v, model=...)``), at two lengths to show that building is
  linear in the depth;
* the static pass for 5,000 embed calls: the batching optimization (fused batches and
  item picks), and collecting plus optimizing (``feste.compute``'s preparation).
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from benchmarks.harness import _proc_status_kib, _reset_peak_rss
from feste import feste_task
from feste.backend import OpenAI
from feste.compute import prepare
from feste.graph import FesteGraph
from feste.optimization import default_optimizer
from feste.prompt import Prompt

__all__ = ["main"]

BASE_URL = "http://127.0.0.1:9"  # never contacted: nothing is sent
EMBED_MODEL = "text-embedding-3-small"
CHAT_MODEL = "gpt-4o-mini"


def increment(value: int) -> int:
    return value + 1


def best_cpu_seconds(build: Callable[[], Any], runs: int) -> float:
    """The least CPU time of ``runs`` calls of ``build`` (its result dropped after each)."""
    best = float("inf")
    for _ in range(runs):
        gc.collect()
        started = time.process_time()
        result = build()
        best = min(best, time.process_time() - started)
        del result
    return best


def _status_mib(name: str) -> float:
    kib = _proc_status_kib(name)
    return kib / 1024 if kib is not None else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_build")
    parser.add_argument("--calls", type=int, default=100_000, help="embed calls to build")
    parser.add_argument("--chain", type=int, default=8_000, help="longest chain to build")
    parser.add_argument("--batch", type=int, default=5_000, help="embeds for the static pass")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (best kept)")
    arguments = parser.parse_args(argv)

    llm = OpenAI(base_url=BASE_URL, api_key="sk-graph-build")
    lazy_increment = feste_task(increment, pure=True)
    summary = Prompt("Summarize in {{ words }} words: {{ text }}")

    def embeds(count: int) -> list[Any]:
        return [llm.embed(f"text {index}", model=EMBED_MODEL) for index in range(count)]

    def chats(count: int) -> list[Any]:
        return [llm.chat(f"question {index}", model=CHAT_MODEL) for index in range(count)]

    def prompts(count: int) -> list[Any]:
        return [summary(text=f"document {index}", words=20) for index in range(count)]

    def task_chain(length: int) -> Any:
        value: Any = 0
        for _ in range(length):
            value = lazy_increment(value)
        return value

    def chat_chain(length: int) -> Any:
        value: Any = "start"
        for _ in range(length):
            value = llm.chat(value, model=CHAT_MODEL)
        return value

    embeds(100)  # first calls: lazy imports, caches
    calls, runs = arguments.calls, arguments.runs
    per_call = best_cpu_seconds(lambda: embeds(calls), runs) / calls * 1e6
    print(f"{calls:,} embed calls: {per_call:.2f} us/call")
    small = max(calls // 10, 1)
    chat_us = best_cpu_seconds(lambda: chats(small), runs) / small * 1e6
    print(f"{small:,} chat calls: {chat_us:.2f} us/call")
    print(
        f"{small:,} prompt renderings: "
        f"{best_cpu_seconds(lambda: prompts(small), runs) / small * 1e6:.2f} us/call"
    )

    # Resident growth first, without tracemalloc (its own records take memory too).
    gc.collect()
    measured_rss = _reset_peak_rss()
    before = _status_mib("VmRSS")
    held = embeds(calls)
    rss = f", resident +{_status_mib('VmHWM') - before:.0f} MiB" if measured_rss else ""
    del held
    gc.collect()
    tracemalloc.start()
    held = embeds(calls)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    print(f"memory of {calls:,} embed calls: tracemalloc peak {traced_peak / 2**20:.0f} MiB{rss}")

    for length in (arguments.chain // 4, arguments.chain):
        tasks = best_cpu_seconds(lambda length=length: task_chain(length), runs)
        chat = best_cpu_seconds(lambda length=length: chat_chain(length), runs)
        print(f"chain of {length:,}: feste_task {tasks:.3f} s, chat {chat:.3f} s")

    values = embeds(arguments.batch)
    graph, collections, _ = FesteGraph.collect(values)
    graph_dict = graph.to_dict()
    keys = [collection.__dask_keys__() for collection in collections]
    optimizer = default_optimizer()
    static = best_cpu_seconds(lambda: optimizer.optimize(graph_dict, keys), max(runs, 5))
    prepared = best_cpu_seconds(lambda: prepare(values), max(runs, 5))
    print(
        f"static pass for {arguments.batch:,} embeds: {static * 1000:.1f} ms "
        f"(with collecting: {prepared * 1000:.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
