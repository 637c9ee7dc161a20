"""The ``feste`` command: look at and maintain the result cache and its run history.

Design
------
``feste runs list|show|diff|delete`` and ``feste cache stats|clear|prune`` open the cache
named by ``--cache PATH_OR_URL`` or the ``FESTE_CACHE`` environment variable (a SQLite
path must exist: the command never creates a cache) and print one of three ways: Rich
tables when standard output is a terminal, plain aligned text when it is piped, JSON
with ``--json``. Errors go to standard error as one line naming the problem and the fix,
with exit status 1 (2 for a command line argparse refuses).

Installed as the ``feste`` console script and runnable as ``python -m feste``; the
entry point is :func:`main`, which takes the arguments as a list for use from Python.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from feste.cache import ENVIRONMENT_VARIABLE, CacheStore, RunOutput, open_store
from feste.errors import CacheError

__all__ = ["main", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class CommandError(Exception):
    """A message for standard error, and exit status 1."""


def parse_duration(text: str) -> float:
    """Seconds in ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"`` or ``"2w"``."""
    found = _DURATION.match(text)
    if found is None:
        raise CommandError(
            f"--older-than takes a number and a unit (s, m, h, d or w), like 12h or 7d; "
            f"got {text!r}"
        )
    return float(found.group(1)) * _UNITS[found.group(2)]


# -- output -------------------------------------------------------------------------------


class _Output:
    """Prints tables: Rich on a terminal, aligned plain text otherwise, or JSON."""

    def __init__(self, stream: IO[str], as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.terminal = stream.isatty() and not as_json
        self.console = Console(file=stream) if self.terminal else None

    def json(self, value: Any) -> None:
        self.stream.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)
        else:
            self.stream.write(text + "\n")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
        if self.console is not None:
            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column)
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
            return
        widths = [len(column) for column in columns]
        for row in cells:
            widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
        self.stream.write(title + "\n")
        for row in [list(columns), *cells]:
            text = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
            self.stream.write(text.rstrip() + "\n")

    def side_by_side(self, path: str, left: tuple[str, str], right: tuple[str, str]) -> None:
        """Two texts in two columns, headed by their run names."""
        if self.console is not None:
            table = Table(title=f"output {path}", title_justify="left", show_lines=False)
            table.add_column(left[0], ratio=1, overflow="fold")
            table.add_column(right[0], ratio=1, overflow="fold")
            table.add_row(left[1], right[1])
            self.console.print(table)
            return
        total = shutil.get_terminal_size((120, 24)).columns
        width = max(20, (total - 3) // 2)
        self.stream.write(f"output {path}\n")
        self.stream.write(f"{left[0][:width]:<{width}} | {right[0][:width]}\n")
        self.stream.write(f"{'-' * width}-+-{'-' * width}\n")
        left_lines = _wrapped(left[1], width)
        right_lines = _wrapped(right[1], width)
        for one, two in itertools.zip_longest(left_lines, right_lines, fillvalue=""):
            self.stream.write(f"{one:<{width}} | {two}".rstrip() + "\n")
        self.stream.write("\n")


def _wrapped(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width, replace_whitespace=False) or [""])
    return lines


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


# -- commands -----------------------------------------------------------------------------


def _open(arguments: argparse.Namespace) -> CacheStore:
    spec = arguments.cache or arguments.cache_before or os.environ.get(ENVIRONMENT_VARIABLE)
    if not spec:
        raise CommandError(
            f"no cache given: pass --cache PATH_OR_URL or set the {ENVIRONMENT_VARIABLE} "
            "environment variable"
        )
    return open_store(spec, create=False)


def _run(store: CacheStore, name: str) -> dict[str, Any]:
    record = store.get_run(name)
    if record is None:
        known = [run["name"] for run in store.list_runs()]
        listed = ", ".join(known) if known else "none recorded yet"
        raise CommandError(f"no run named {name!r} in {store.location} (runs: {listed})")
    return record


def _calls(record: dict[str, Any]) -> int:
    return sum(record.get("graph", {}).get("calls", {}).values())


def _tokens(record: dict[str, Any]) -> int:
    return int(record.get("prompt_tokens", 0)) + int(record.get("completion_tokens", 0))


def runs_list(store: CacheStore, out: _Output) -> None:
    runs = store.list_runs()
    if out.as_json:
        out.json(runs)
        return
    rows = [
        (
            run["name"],
            run["status"],
            _when(run.get("started")),
            run.get("seconds", ""),
            _calls(run),
            run.get("cache_hits", ""),
            run.get("requests", ""),
            run.get("failed_requests", ""),
            _tokens(run),
            run.get("outputs", ""),
        )
        for run in runs
    ]
    columns = (
        "name",
        "status",
        "started",
        "seconds",
        "calls",
        "cache hits",
        "requests",
        "failed",
        "tokens",
        "outputs",
    )
    out.table(f"runs in {store.location}", columns, rows)


def runs_show(store: CacheStore, out: _Output, name: str) -> None:
    record = _run(store, name)
    outputs = store.run_outputs(name)
    if out.as_json:
        out.json({**record, "output_list": [output._asdict() for output in outputs]})
        return
    graph = record.get("graph", {})
    fields = [
        ("name", record["name"]),
        ("status", record["status"]),
        ("started", _when(record.get("started"))),
        ("ended", _when(record.get("ended"))),
        ("seconds", record.get("seconds", "")),
        ("scheduler", record.get("scheduler", "")),
        ("graph", f"{graph.get('nodes', 0)} nodes, depth {graph.get('depth', 0)}"),
        ("calls", _calls(record)),
        ("cache hits", record.get("cache_hits", "")),
        ("calls sent", record.get("calls_sent", "")),
        ("requests", record.get("requests", "")),
        ("retries", record.get("retries", "")),
        ("failed requests", record.get("failed_requests", "")),
        ("prompt tokens", record.get("prompt_tokens", "")),
        ("completion tokens", record.get("completion_tokens", "")),
        ("outputs", record.get("outputs", "")),
        ("failed outputs", record.get("failed_outputs", "")),
    ]
    if record.get("error"):
        fields.append(("error", record["error"]))
    out.table(f"run {name}", ("field", "value"), fields)
    planned = graph.get("planned_requests", {})
    methods = [
        (method, count, planned.get(method, ""))
        for method, count in sorted(graph.get("calls", {}).items())
    ]
    if methods:
        out.table("calls by method", ("method", "calls", "planned requests"), methods)
    if outputs:
        shown = [
            (output.path, "failed" if output.failed else "ok", _preview(output.text))
            for output in outputs
        ]
        out.table("outputs", ("output", "state", "value"), shown)


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def runs_diff(store: CacheStore, out: _Output, first: str, second: str) -> None:
    _run(store, first)
    _run(store, second)
    left = {output.path: output for output in store.run_outputs(first)}
    right = {output.path: output for output in store.run_outputs(second)}
    changed: list[tuple[RunOutput, RunOutput]] = []
    unchanged = 0
    for path, output in left.items():
        other = right.get(path)
        if other is None:
            continue
        if other.digest == output.digest:
            unchanged += 1
        else:
            changed.append((output, other))
    only_first = [path for path in left if path not in right]
    only_second = [path for path in right if path not in left]
    if out.as_json:
        out.json(
            {
                "a": first,
                "b": second,
                "changed": [
                    {"path": a.path, "a": a.text, "b": b.text, "a_key": a.key, "b_key": b.key}
                    for a, b in changed
                ],
                "unchanged": unchanged,
                "only_a": only_first,
                "only_b": only_second,
            }
        )
        return
    out.line(
        f"{first} -> {second}: {len(changed)} changed, {unchanged} unchanged, "
        f"{len(only_first)} only in {first}, {len(only_second)} only in {second}"
    )
    for path in only_first:
        out.line(f"only in {first}: output {path}")
    for path in only_second:
        out.line(f"only in {second}: output {path}")
    for a, b in changed:
        out.line()
        out.side_by_side(a.path, (first, a.text), (second, b.text))


def runs_delete(store: CacheStore, out: _Output, name: str) -> None:
    if not store.delete_run(name):
        _run(store, name)  # raises, listing the runs there are
    if out.as_json:
        out.json({"deleted": name})
    else:
        out.line(f"deleted run {name} from {store.location}")


def cache_stats(store: CacheStore, out: _Output) -> None:
    stats = store.stats()
    if out.as_json:
        out.json(stats)
        return
    fields = [
        ("location", stats["location"]),
        ("schema version", stats["schema_version"]),
        ("cached results", stats["entries"]),
        ("size of values", _size(stats["value_bytes"])),
        ("oldest", _when(stats["oldest"])),
        ("newest", _when(stats["newest"])),
        ("runs", stats["runs"]),
    ]
    out.table("cache", ("field", "value"), fields)
    if stats["by_label"]:
        out.table("cached results by call", ("call", "results"), sorted(stats["by_label"].items()))


def cache_clear(store: CacheStore, out: _Output) -> None:
    removed = store.clear()
    if out.as_json:
        out.json({"removed": removed})
    else:
        out.line(f"removed {removed} cached results from {store.location} (run history kept)")


def cache_prune(store: CacheStore, out: _Output, older_than: str) -> None:
    seconds = parse_duration(older_than)
    removed = store.prune(seconds)
    if out.as_json:
        out.json({"removed": removed, "older_than_seconds": seconds})
    else:
        out.line(f"removed {removed} cached results older than {older_than.strip()}")


# -- the command line ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache",
        metavar="PATH_OR_URL",
        help=f"the cache: a SQLite file or a postgresql:// URL (default: ${ENVIRONMENT_VARIABLE})",
    )
    common.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    parser = argparse.ArgumentParser(
        prog="feste", description="Inspect feste's result cache and run history."
    )
    # Also accepted before the command; its own dest, since a subcommand's default
    # would overwrite a value parsed here.
    parser.add_argument("--cache", dest="cache_before", metavar="PATH_OR_URL", help="the cache")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{runs,cache}")

    runs = groups.add_parser("runs", help="recorded runs").add_subparsers(
        dest="command", required=True, metavar="{list,show,diff,delete}"
    )
    runs.add_parser("list", parents=[common], help="list the recorded runs")
    show = runs.add_parser("show", parents=[common], help="one run: counts, calls, outputs")
    show.add_argument("name")
    diff = runs.add_parser("diff", parents=[common], help="which outputs changed between runs")
    diff.add_argument("a")
    diff.add_argument("b")
    delete = runs.add_parser("delete", parents=[common], help="delete a run and its outputs")
    delete.add_argument("name")

    cache = groups.add_parser("cache", help="cached results").add_subparsers(
        dest="command", required=True, metavar="{stats,clear,prune}"
    )
    cache.add_parser("stats", parents=[common], help="size and contents of the cache")
    cache.add_parser("clear", parents=[common], help="delete every cached result")
    prune = cache.add_parser("prune", parents=[common], help="delete old cached results")
    prune.add_argument(
        "--older-than", required=True, metavar="AGE", help="age: 30s, 15m, 12h, 7d or 2w"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``feste`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    arguments = _parser().parse_args(argv)
    out = _Output(sys.stdout, arguments.json)
    try:
        store = _open(arguments)
        command = (arguments.group, arguments.command)
        if command == ("runs", "list"):
            runs_list(store, out)
        elif command == ("runs", "show"):
            runs_show(store, out, arguments.name)
        elif command == ("runs", "diff"):
            runs_diff(store, out, arguments.a, arguments.b)
        elif command == ("runs", "delete"):
            runs_delete(store, out, arguments.name)
        elif command == ("cache", "stats"):
            cache_stats(store, out)
        elif command == ("cache", "clear"):
            cache_clear(store, out)
        else:
            cache_prune(store, out, arguments.older_than)
    except (CommandError, CacheError) as error:
        sys.stderr.write(f"feste: error: {error}\n")
        return 1
    except BrokenPipeError:
        # Piped into `head`: stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0
