"""The benchmark harness: workloads, contenders, isolated runs, measurements.

Design
------
A :class:`Workload` describes one job to do (its inputs, the server knobs it runs
under, how to check the answers, and the ideal makespan computed from those knobs)
and lists its :class:`Contender` s: feste and its peers, each one plain function
``run(job) -> outputs`` written the way that tool's users write it.

:func:`run_benchmarks` starts two local test servers, one standing for OpenAI and
one for Cohere (each provider has its own limits), each in its own process (so the
client measured and the servers never share a GIL), then for each workload
reconfigures them and runs every contender ``repeat`` times. Each run happens
in a child forked from this process: every contender starts from the same state (no
warm connection pools, event loops or thread pools left by another one), its memory
is measured alone, and a contender that hangs is killed at a time cap without
stopping the benchmark. Modules are imported once, before forking, and each child
first does an untimed warm-up run on two inputs (lazy imports inside the libraries,
SSL contexts, compiled templates), so one-time start-up costs are never part of a
makespan; the clients, pools and connections of the timed run are its own.

Per run the child measures the makespan (wall clock around ``run``, building the
graph included), the CPU time of its own process (``cpu_s``: what a client costs,
steadier than the makespan when other work shares the machine), the peak resident
memory (the kernel's high-water mark, reset at the start of the run; plus sampled
worker processes for contenders that start them), and checks every output. The
parent reads the servers' statistics (requests, statuses, peak concurrency) between
runs. A row reports the median run.

With ``profile_dir`` set (``python -m benchmarks --profile``), the child runs the timed
run under ``cProfile`` and writes one ``.pstats`` file per contender run there; the
row keeps the median run's file and its top functions (:func:`top_functions`), which
the command line prints. Profiling slows a run down (several times for pure-Python
hot paths), so the makespans of a profiled run are not comparable with others.

Slow peers (two requests in flight for thousands of calls) may run on the first
``subset`` inputs; their makespan is scaled linearly to the full size and the row
says so. Linear scaling is exact for a closed loop at fixed concurrency, which is
what those peers are; a fixed start-up cost the contender marks (``SETUP_MARK``, e.g.
starting a pool's workers) is kept out of the scaling.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import importlib.util
import math
import multiprocessing
import os
import pstats
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Contender",
    "GRAPH_BUILT",
    "Ideal",
    "Job",
    "MemoryMeter",
    "SETUP_MARK",
    "ServerPair",
    "Size",
    "Workload",
    "profile_path",
    "run_benchmarks",
    "top_functions",
]

# The API key every contender sends; the local server accepts any key unless told.
API_KEY = "feste-benchmark-key"

Kind = Literal["feste", "peer", "reference"]

# A contender calls ``job.mark(SETUP_MARK)`` after its fixed start-up work; when it runs on
# a subset, only the time after the mark is scaled to the full size.
SETUP_MARK = "setup done"
# Contenders that build a lazy graph mark when it exists: the report shows that time.
GRAPH_BUILT = "graph built"


@dataclass(frozen=True)
class Size:
    """A count for the full run and a smaller one for the ``--quick`` smoke run."""

    full: int
    quick: int

    def pick(self, quick: bool) -> int:
        return self.quick if quick else self.full


@dataclass(frozen=True)
class Ideal:
    """The best makespan the server's settings allow, and how it was computed."""

    seconds: float
    formula: str
    requests: int | None = None


@dataclass
class Job:
    """What a contender receives: inputs, the server's addresses, workload settings."""

    inputs: list[Any]
    openai_base_url: str
    cohere_base_url: str
    settings: Mapping[str, Any]
    api_key: str = API_KEY
    marks: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def mark(self, phase: str) -> None:
        """Record the seconds since the run started, e.g. ``job.mark("graph built")``."""
        self.marks[phase] = time.perf_counter() - self.started


@dataclass(frozen=True)
class Contender:
    """One way of doing a workload.

    ``subset`` runs it on the first inputs only and scales the makespan; ``requires``
    names modules that must be importable (else the row says "not installed");
    ``spawns_processes`` adds its worker processes' memory to the peak. ``prepare(job)``
    runs untimed before the timed run, in the same process, after the warm-up (e.g. a
    first run that fills a cache for a timed re-run); its requests are not counted.
    """

    name: str
    run: Callable[[Job], Any]
    kind: Kind = "peer"
    note: str = ""
    subset: Size | None = None
    requires: tuple[str, ...] = ()
    spawns_processes: bool = False
    prepare: Callable[[Job], None] | None = None


@dataclass(frozen=True)
class Workload:
    """A job, its server settings, its ideal, its answer check and its contenders.

    ``make_inputs(n)`` builds the inputs; ``ideal(n, server)`` returns the
    :class:`Ideal` for ``n`` inputs under the server knobs; ``check(inputs, outputs)``
    returns None when every output is right, else a message naming the first wrong one.
    ``per_item`` makes the report show microseconds per input (scheduler overhead).
    ``milestones`` maps a label to a server route, e.g. ``{"first embedding request":
    "/v1/embeddings"}``: each row reports when that route's first request arrived,
    in seconds from the start of the run (``row["milestones"]``).
    """

    name: str
    title: str
    description: str
    size: Size
    server: Mapping[str, Any]
    settings: Mapping[str, Any]
    make_inputs: Callable[[int], list[Any]]
    ideal: Callable[[int, Mapping[str, Any]], Ideal]
    check: Callable[[list[Any], Any], str | None]
    contenders: tuple[Contender, ...]
    per_item: bool = False
    milestones: Mapping[str, str] = field(default_factory=dict)
    # Seconds a single run may take before it is killed (full run; quick runs use 60).
    time_cap: float = 120.0


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def _proc_status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            text = status.read()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    """Reset this process's high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak resident memory of this process during a run, plus sampled children.

    The kernel's high-water mark (``VmHWM``) is exact and costs nothing while the run
    goes on; it is reset when the meter starts. Worker processes are not in it, so for
    contenders that start some, a thread samples the whole process tree with psutil
    every 20 ms (when psutil is installed).
    """

    def __init__(self, include_children: bool = False) -> None:
        self.include_children = include_children
        self.baseline_kib = 0
        self.method = "VmHWM"
        self._sampled_peak_kib = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        if not _reset_peak_rss():
            self.method = "ru_maxrss"
        self.baseline_kib = _proc_status_kib("VmRSS") or _ru_maxrss_kib()
        if self.include_children and importlib.util.find_spec("psutil") is not None:
            self.method += "+psutil tree"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            total = 0
            with contextlib.suppress(psutil.Error):
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
            self._sampled_peak_kib = max(self._sampled_peak_kib, total // 1024)

    def stop(self) -> tuple[float, float]:
        """(baseline MiB, peak MiB)."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        own_peak = _proc_status_kib("VmHWM") or _ru_maxrss_kib()
        peak = max(own_peak, self._sampled_peak_kib)
        return self.baseline_kib / 1024, peak / 1024


def _ru_maxrss_kib() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


# ---------------------------------------------------------------------------
# One run, in a forked child
# ---------------------------------------------------------------------------


WARM_UP_INPUTS = 2


def _child_main(
    workload: Workload,
    contender: Contender,
    job: Job,
    connection: Any,
    profile_to: Path | None = None,
) -> None:
    """Warm up, wait for the parent's go, run ``contender`` once, measure, check, report.

    With ``profile_to``, the timed run runs under cProfile and its statistics are
    written there."""
    # Its own process group, so that a run killed at the cap takes its workers with it.
    os.setpgrp()
    outcome: dict[str, Any]
    try:
        # An untimed run on two inputs: lazy imports inside the libraries, first-use
        # set-up (SSL contexts, compiled templates) happen here and not in the timing.
        warm_up = Job(
            inputs=job.inputs[:WARM_UP_INPUTS],
            openai_base_url=job.openai_base_url,
            cohere_base_url=job.cohere_base_url,
            settings=job.settings,
            api_key=job.api_key,
        )
        warm_up.started = time.perf_counter()
        contender.run(warm_up)
        if contender.prepare is not None:
            job.started = time.perf_counter()
            contender.prepare(job)
            job.marks.clear()
        # What is alive now (the harness's imports, the warm-up's leftovers) is not the
        # run's: frozen, so no contender's collections traverse (and, in a forked child,
        # copy) the harness's heap.
        gc.collect()
        gc.freeze()
        connection.send({"status": "ready"})
        connection.recv()  # the parent has reset the servers' statistics
        meter = MemoryMeter(include_children=contender.spawns_processes)
        profiler = cProfile.Profile() if profile_to is not None else None
        meter.start()
        cpu_started = time.process_time()
        job.started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        outputs = contender.run(job)
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - job.started
        cpu_seconds = time.process_time() - cpu_started
        baseline, peak = meter.stop()
        if profiler is not None and profile_to is not None:
            profiler.dump_stats(profile_to)
        problem = workload.check(job.inputs, outputs)
        outcome = {
            "status": "ok" if problem is None else "wrong",
            "seconds": seconds,
            "cpu_s": cpu_seconds,
            "baseline_rss_mib": round(baseline, 1),
            "peak_rss_mib": round(peak, 1),
            "memory_method": meter.method,
            "marks": dict(job.marks),
            "problem": problem,
        }
    except BaseException as error:  # report everything; the parent decides
        outcome = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=8),
        }
    try:
        connection.send(outcome)
        connection.close()
    finally:
        # Skip interpreter teardown: leftover client threads or loops must not block exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _receive(connection: Any, seconds: float) -> dict[str, Any]:
    if not connection.poll(seconds):
        return {"status": "timeout", "error": f"killed after the {seconds:g} s cap"}
    try:
        return dict(connection.recv())
    except EOFError:
        return {"status": "error", "error": "the run's process died without a result"}


def _run_isolated(
    workload: Workload,
    contender: Contender,
    job: Job,
    cap: float,
    before_run: Callable[[], None],
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Fork a child that warms up and runs ``contender``; ``before_run`` is called
    between the warm-up and the timed run (profiled into ``profile_to`` when given)."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe(duplex=True)
    child = context.Process(
        target=_child_main,
        args=(workload, contender, job, theirs, profile_to),
        name=contender.name,
    )
    child.start()
    theirs.close()
    outcome: dict[str, Any] = {"status": "error", "error": "interrupted"}
    try:
        outcome = _receive(ours, cap)
        if outcome["status"] == "ready":
            before_run()
            ours.send("go")
            outcome = _receive(ours, cap)
        child.join(5)
    finally:
        ours.close()
        # Whatever the run left behind (pool workers included) goes with its group.
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
        child.join()
    return outcome


# ---------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------


class ServerPair:
    """Two local test servers, one standing for OpenAI and one for Cohere.

    Real providers limit concurrency each on its own; one server per provider keeps
    that true when a workload mixes them. Both get the workload's knobs; statistics
    are added up (``max_in_flight`` is kept per server).
    """

    def __init__(self) -> None:
        from feste.testing import TestServer

        self.openai = TestServer(mode="process")
        self.cohere = TestServer(mode="process")

    def __enter__(self) -> ServerPair:
        self.openai.start()
        try:
            self.cohere.start()
        except BaseException:
            self.openai.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cohere.stop()
        self.openai.stop()

    @property
    def openai_base_url(self) -> str:
        return str(self.openai.openai_base_url)

    @property
    def cohere_base_url(self) -> str:
        return str(self.cohere.cohere_base_url)

    def configure(self, **knobs: Any) -> None:
        self.openai.configure(**knobs)
        self.cohere.configure(**knobs)

    def reset_stats(self) -> None:
        self.openai.reset_stats()
        self.cohere.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Requests, per-route counts, items and statuses summed over both servers."""
        summary: dict[str, Any] = {
            "requests": 0,
            "by_route": {},
            "items": 0,
            "status_counts": {},
            "max_in_flight": {},
            "first_arrival": {},
            "billed": {},
            "billed_batch": {},
        }
        for name, server in (("openai", self.openai), ("cohere", self.cohere)):
            stats = server.stats()
            summary["requests"] += stats.get("requests", 0)
            # What the answers billed, per provider and model (priced in the report).
            summary["billed"][name] = stats.get("billed", {})
            # The part of it answered through Batch API jobs (priced at batch prices).
            summary["billed_batch"][name] = stats.get("batches", {}).get("billed", {})
            summary["items"] += stats.get("items", 0)
            for key in ("by_route", "status_counts"):
                for route, count in stats.get(key, {}).items():
                    summary[key][route] = summary[key].get(route, 0) + count
            for route, seconds in stats.get("first_arrival", {}).items():
                earliest = summary["first_arrival"].get(route, seconds)
                summary["first_arrival"][route] = min(earliest, seconds)
            if stats.get("requests", 0):
                summary["max_in_flight"][name] = stats.get("max_in_flight", 0)
        return summary


def _missing_modules(contender: Contender) -> list[str]:
    return [name for name in contender.requires if importlib.util.find_spec(name) is None]


def _preimport(workloads: Sequence[Workload]) -> None:
    """Import what the contenders use before forking, so no run pays for imports."""
    names = {"feste", "dask", "openai", "cohere", "aiohttp"}
    for workload in workloads:
        for contender in workload.contenders:
            names.update(contender.requires)
    for name in sorted(names):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Submodules imported lazily by the libraries themselves.
    for name in ("feste.backend", "langchain_openai", "langchain_core.prompts"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["seconds"])
    return ordered[(len(ordered) - 1) // 2]


class _RowRuns:
    """The runs of one contender of a workload, taken in turn with the others'."""

    def __init__(self, workload: Workload, contender: Contender, size: int, quick: bool) -> None:
        self.contender = contender
        self.row: dict[str, Any] = {"contender": contender.name, "kind": contender.kind}
        self.notes = [contender.note] if contender.note else []
        self.missing = _missing_modules(contender)
        self.size = size
        self.run_size = size
        if contender.subset is not None:
            self.run_size = min(size, contender.subset.pick(quick))
        if self.run_size < size:
            self.notes.append(
                f"ran {self.run_size} of {size}, time scaled x{size / self.run_size:.3g}"
            )
        self.runs: list[dict[str, Any]] = []

    @property
    def active(self) -> bool:
        """Still to run: installed, and no run failed."""
        return not self.missing and all(run["status"] == "ok" for run in self.runs)


def _run_once(
    server: ServerPair,
    workload: Workload,
    row_runs: _RowRuns,
    inputs: list[Any],
    run_index: int,
    cap: float,
    profile_dir: Path | None,
) -> None:
    """One timed run of one contender, added to its runs."""

    def before_run() -> None:
        # Same fault sequence for everyone: reseed, then count from zero.
        server.configure(seed=int(workload.server.get("seed", 0)))
        server.reset_stats()

    contender = row_runs.contender
    job = Job(
        inputs=inputs[: row_runs.run_size],
        openai_base_url=server.openai_base_url,
        cohere_base_url=server.cohere_base_url,
        settings=workload.settings,
    )
    profile_to = None
    if profile_dir is not None:
        profile_to = profile_path(profile_dir, workload.name, contender.name, run_index)
    outcome = _run_isolated(workload, contender, job, cap, before_run, profile_to)
    outcome["server"] = server.stats()
    if profile_to is not None and outcome["status"] == "ok":
        outcome["profile"] = str(profile_to)
    row_runs.runs.append(outcome)


def _measure_workload(
    server: ServerPair,
    workload: Workload,
    inputs: list[Any],
    repeat: int,
    cap: float,
    quick: bool,
    log: Callable[[str], None],
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``workload``: run ``repeat`` rounds, each running every contender
    once in turn, so that a drift of the machine's state during the workload reaches
    every row alike (the ratios are measured side by side)."""
    rows = [_RowRuns(workload, contender, len(inputs), quick) for contender in workload.contenders]
    for run_index in range(repeat):
        for row_runs in rows:
            if row_runs.active:
                _run_once(server, workload, row_runs, inputs, run_index, cap, profile_dir)
    return [_summarize_row(row_runs, workload, log) for row_runs in rows]


def _summarize_row(
    row_runs: _RowRuns, workload: Workload, log: Callable[[str], None]
) -> dict[str, Any]:
    contender = row_runs.contender
    row = row_runs.row
    notes = row_runs.notes
    if row_runs.missing:
        missing = row_runs.missing
        row.update(status="skipped", note=f"not installed: {', '.join(missing)}")
        log(f"  {contender.name:<34} skipped (not installed: {', '.join(missing)})")
        return row
    runs = row_runs.runs
    size = row_runs.size
    run_size = row_runs.run_size
    last = runs[-1]
    if last["status"] != "ok":
        detail = last.get("problem") or last.get("error", "")
        row.update(status=last["status"], note="; ".join([*notes, detail]), server=last["server"])
        if "traceback" in last:
            row["traceback"] = last["traceback"]
        log(f"  {contender.name:<34} {last['status'].upper()}: {detail}")
        return row
    median = _median_run(runs)
    scale = size / run_size
    # A fixed start-up cost (a pool's workers starting) is not scaled with the inputs.
    fixed = median["marks"].get(SETUP_MARK, 0.0) if scale > 1 else 0.0
    makespan = fixed + (median["seconds"] - fixed) * scale
    row.update(
        status="ok",
        makespan_s=makespan,
        measured_s=median["seconds"],
        runs_s=[run["seconds"] for run in runs],
        # CPU seconds of the client process (its threads included, its worker processes
        # not) in the median run: steadier than the makespan on a loaded machine.
        cpu_s=median["cpu_s"],
        scale=scale,
        inputs_run=run_size,
        requests=median["server"]["requests"],
        server=median["server"],
        peak_rss_mib=median["peak_rss_mib"],
        rss_growth_mib=round(median["peak_rss_mib"] - median["baseline_rss_mib"], 1),
        memory_method=median["memory_method"],
        marks=median["marks"],
        correct=True,
        note="; ".join(notes),
    )
    if workload.milestones:
        # Seconds from the servers' reset, which comes just before the run starts.
        arrivals = median["server"].get("first_arrival", {})
        row["milestones"] = {
            label: arrivals.get(route) for label, route in workload.milestones.items()
        }
    row["billed"] = median["server"]["billed"]  # priced in the report (report.priced)
    row["billed_batch"] = median["server"].get("billed_batch", {})
    if workload.per_item:
        row["per_item_us"] = makespan / size * 1e6
    log(
        f"  {contender.name:<34} {makespan:8.3f} s"
        f"  ({len(runs)} run{'s' if len(runs) > 1 else ''}, {row['requests']} requests,"
        f" peak {row['peak_rss_mib']:.0f} MiB, {row['cpu_s']:.3f} s CPU)"
    )
    if "profile" in median:
        row["profile"] = {"file": median["profile"], "top": top_functions(median["profile"])}
        log(f"    profile of the median run: {median['profile']}")
        for entry in row["profile"]["top"]:
            log(
                f"    {entry['own_s']:7.3f} s own {entry['cumulative_s']:7.3f} s cum"
                f" {entry['calls']:>8} calls  {entry['function']}"
            )
    return row


def profile_path(directory: Path, workload: str, contender: str, run_index: int) -> Path:
    """Where the cProfile statistics of one contender run go (one file per run)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", contender).strip("-").lower()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{workload}--{slug}--run{run_index + 1}.pstats"


def _short_path(filename: str) -> str:
    """A source file named from its package down (``feste/_calls.py``), not its full path."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index + 1 :])
    for package in ("feste", "benchmarks"):
        if package in parts:
            index = len(parts) - 1 - parts[::-1].index(package)
            return "/".join(parts[index:])
    return filename


def top_functions(stats_file: str | Path, count: int = 15) -> list[dict[str, Any]]:
    """The ``count`` functions with the most time of their own in a cProfile file:
    own seconds, cumulative seconds, calls and ``path:line(name)``."""
    stats = pstats.Stats(str(stats_file))
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = name if filename == "~" else f"{_short_path(filename)}:{line}({name})"
        entries.append(
            {"function": where, "own_s": own, "cumulative_s": cumulative, "calls": calls}
        )
    entries.sort(key=lambda entry: entry["own_s"], reverse=True)
    return entries[:count]


def _add_ratios(rows: list[dict[str, Any]], ideal: Ideal) -> None:
    peers = [row["makespan_s"] for row in rows if row["kind"] == "peer" and row["status"] == "ok"]
    best_peer = min(peers) if peers else None
    for row in rows:
        if row["status"] != "ok":
            continue
        row["ratio_to_ideal"] = row["makespan_s"] / ideal.seconds if ideal.seconds > 0 else None
        row["ratio_to_best_peer"] = row["makespan_s"] / best_peer if best_peer else None


def _server_knobs(workload: Workload) -> dict[str, Any]:
    """Every knob the benchmarks touch, set explicitly so no workload inherits another's."""
    knobs: dict[str, Any] = {
        "latency": 0.0,
        "latency_per_item": 0.0,
        "max_concurrency": None,
        "requests_per_minute": None,
        "retry_after": 0.05,
        "fault_429_retry_after": None,
        "fault_429": 0.0,
        "fault_500": 0.0,
        "fault_hang": 0.0,
        "fault_drop": 0.0,
        "seed": 0,
        "batch_completion_delay": 0.0,
    }
    knobs.update(workload.server)
    return knobs


def _environment() -> dict[str, Any]:
    import platform

    versions: dict[str, str] = {}
    for name in ("feste", "dask", "openai", "cohere", "aiohttp", "langchain_openai"):
        with contextlib.suppress(Exception):
            module = importlib.import_module(name)
            versions[name] = str(getattr(module, "__version__", "?"))
    if "langchain_openai" in versions and versions["langchain_openai"] == "?":
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            versions["langchain_openai"] = metadata.version("langchain-openai")
    scheduler = "?"
    with contextlib.suppress(Exception):
        from feste import context
        from feste.schedulers import DEFAULT_SCHEDULER

        scheduler = context.get("scheduler") or DEFAULT_SCHEDULER
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "feste_default_scheduler": scheduler,
    }


def run_benchmarks(
    workloads: Sequence[Workload],
    *,
    quick: bool = False,
    repeat: int = 3,
    log: Callable[[str], None] = print,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Run every contender of every workload; return the report as a JSON-able dict.

    With ``profile_dir``, every timed run is profiled (cProfile) into a file there."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    _preimport(workloads)
    started = time.time()
    report: dict[str, Any] = {
        "format": 1,
        "mode": "quick" if quick else "full",
        "repeat": repeat,
        "profiled": profile_dir is not None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "environment": _environment(),
        "workloads": [],
    }
    with ServerPair() as server:
        log(
            f"test servers (separate processes): openai {server.openai_base_url}, "
            f"cohere {server.cohere_base_url}"
        )
        for workload in workloads:
            knobs = _server_knobs(workload)
            server.configure(**knobs)
            size = workload.size.pick(quick)
            inputs = workload.make_inputs(size)
            ideal = workload.ideal(size, knobs)
            cap = 60.0 if quick else workload.time_cap
            log(f"{workload.name}: {workload.title} (n={size}, ideal {ideal.seconds:.3f} s)")
            rows = _measure_workload(server, workload, inputs, repeat, cap, quick, log, profile_dir)
            _add_ratios(rows, ideal)
            report["workloads"].append(
                {
                    "name": workload.name,
                    "title": workload.title,
                    "description": workload.description,
                    "n": size,
                    "server": {k: v for k, v in knobs.items() if v is not None},
                    "ideal": {
                        "seconds": ideal.seconds,
                        "formula": ideal.formula,
                        "requests": ideal.requests,
                    },
                    "per_item": workload.per_item,
                    "rows": rows,
                }
            )
    report["duration_s"] = round(time.time() - started, 1)
    return report


def ceil_div(numerator: int, denominator: int) -> int:
    return math.ceil(numerator / denominator)
