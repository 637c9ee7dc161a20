"""Writing a benchmark report: JSON (everything), Markdown (the table), PNG (the chart).

Design: :func:`benchmarks.harness.run_benchmarks` returns one JSON-able dict; this
module only formats it, so a saved ``latest.json`` can be re-rendered without running
anything (``python -m benchmarks --render FILE``). The chart uses matplotlib's Agg
backend (no display needed) and is skipped with a message when matplotlib is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness import GRAPH_BUILT
from feste.backend.prices import builtin_prices
from feste.backend.types import Usage

__all__ = ["markdown_table", "priced", "write_chart", "write_report"]

COLUMNS = (
    "Workload",
    "Contender",
    "Makespan (s)",
    "x ideal",
    "x best peer",
    "Requests",
    "Tokens",
    "Dollars",
    "Peak RSS MiB (growth)",
    "Correct",
    "Note",
)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _makespan(row: dict[str, Any], per_item: bool) -> str:
    text = f"{row['makespan_s']:.3f}"
    if per_item:
        text += f" ({row['per_item_us']:.1f} us/task)"
    return text


def _usage(model: str, counts: dict[str, int], minus: dict[str, int]) -> Usage:
    """The usage of ``counts`` less ``minus`` (the part billed elsewhere)."""
    return Usage(
        model,
        counts.get("prompt_tokens", 0) - minus.get("prompt_tokens", 0),
        counts.get("completion_tokens", 0) - minus.get("completion_tokens", 0),
        search_units=counts.get("search_units", 0) - minus.get("search_units", 0),
    )


def priced(
    billed: dict[str, dict[str, dict[str, int]]],
    batch: dict[str, dict[str, dict[str, int]]] | None = None,
) -> tuple[int, float | None]:
    """(tokens, dollars at feste's list prices) of what the servers billed, per provider
    and model; dollars None when a model is not in the price table. ``batch`` is the
    part of ``billed`` answered through Batch API jobs, priced at batch prices."""
    table = builtin_prices()
    tokens = 0
    dollars: float | None = 0.0
    for provider, models in billed.items():
        for model, counts in models.items():
            in_jobs = (batch or {}).get(provider, {}).get(model, {})
            parts = [(_usage(model, counts, in_jobs), False)]
            if in_jobs:
                parts.append((_usage(model, in_jobs, {}), True))
            for usage, at_batch_prices in parts:
                tokens += usage.total_tokens
                cost = table.cost(provider, usage, batch=at_batch_prices)
                dollars = None if cost is None or dollars is None else dollars + cost
    return tokens, dollars


def _billing_cells(row: dict[str, Any]) -> list[str]:
    """Tokens and dollars of a row, scaled like its makespan when it ran on a subset."""
    if "billed" not in row:
        return ["", ""]  # a report made before the servers counted tokens
    tokens, dollars = priced(row["billed"], row.get("billed_batch"))
    scale = row.get("scale", 1.0)
    shown = "unpriced" if dollars is None else f"${dollars * scale:.6f}"
    return [str(round(tokens * scale)), shown]


def _row_cells(workload: dict[str, Any], row: dict[str, Any]) -> list[str]:
    name = row["contender"] + (" **(feste)**" if row["kind"] == "feste" else "")
    if row["status"] != "ok":
        status = {"skipped": "skipped", "timeout": "timed out", "wrong": "WRONG", "error": "ERROR"}
        return [
            "",
            name,
            "-",
            "",
            "",
            str(row.get("server", {}).get("requests", "")),
            "",
            "",
            "",
            status.get(row["status"], row["status"]),
            _cell(row.get("note", ""))[:300],
        ]
    extrapolated = row.get("scale", 1.0) > 1.0
    note = row.get("note", "")
    timings = []
    built = row.get("marks", {}).get(GRAPH_BUILT)
    if built is not None and not extrapolated:
        timings.append(f"graph built in {built:.3f} s")
    for label, seconds in row.get("milestones", {}).items():
        if not extrapolated:
            timings.append(f"{label} at {seconds:.3f} s" if seconds is not None else f"no {label}")
    note = "; ".join(part for part in (*timings, note) if part)
    requests = str(row["requests"])
    refused = row.get("server", {}).get("status_counts", {}).get("429", 0)
    if refused:
        requests += f" ({refused} x 429)"
    if extrapolated:
        requests += f" (for {row['inputs_run']} inputs)"
    memory = f"{row['peak_rss_mib']:.0f} (+{row['rss_growth_mib']:.0f})"
    return [
        "",
        name,
        _makespan(row, workload["per_item"]) + (" *" if extrapolated else ""),
        _ratio(row.get("ratio_to_ideal")),
        _ratio(row.get("ratio_to_best_peer")),
        requests,
        *_billing_cells(row),
        memory,
        "yes",
        _cell(note),
    ]


def markdown_table(report: dict[str, Any]) -> str:
    """The report as Markdown: a header line, one table, and how each ideal was computed."""
    environment = report["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in environment["versions"].items())
    lines = [
        f"Run: {report['mode']}, {report['started']}, {report['repeat']} run(s) per row "
        f"(median), {report.get('duration_s', '?')} s in all. "
        f"Machine: {environment['cpu_count']} cores, Python {environment['python']}, "
        f"{environment['platform']}. Versions: {versions}. "
        f"feste scheduler: {environment['feste_default_scheduler']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for workload in report["workloads"]:
        ideal = workload["ideal"]
        ideal_time = f"{ideal['seconds']:.3f}" if ideal["seconds"] > 0 else "0 (no overhead)"
        ideal_requests = "" if ideal["requests"] is None else str(ideal["requests"])
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{workload['name']}** (n={workload['n']})",
                    "*ideal*",
                    ideal_time,
                    "1.00" if ideal["seconds"] > 0 else "",
                    "",
                    ideal_requests,
                    "",
                    "",
                    "",
                    "",
                    _cell(ideal["formula"]),
                ]
            )
            + " |"
        )
        for row in workload["rows"]:
            lines.append("| " + " | ".join(_row_cells(workload, row)) + " |")
    lines += [
        "",
        "`*` ran on a subset of the inputs; the makespan is scaled linearly to the full "
        "size. Requests are counted at the server (retries included; `(k x 429)`: k of "
        "them were answered 429); tokens are "
        "what the answers billed, and dollars those tokens at feste's list prices "
        "(feste/backend/prices.toml; Batch API prices for answers of batch jobs), "
        "scaled like the makespan on a subset. Peak RSS is "
        "the client's resident memory (worker processes included for the pool), growth is "
        "above the forked process's starting size.",
        "",
    ]
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """A bar chart per workload: makespan / ideal (us per task for overhead workloads)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return False
    workloads = [w for w in report["workloads"] if any(r["status"] == "ok" for r in w["rows"])]
    if not workloads:
        return False
    heights = [0.6 + 0.35 * len(w["rows"]) for w in workloads]
    figure, axes = plt.subplots(
        len(workloads),
        1,
        figsize=(9, sum(heights) + 0.8),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axis, workload in zip(axes[:, 0], workloads):
        rows = [row for row in workload["rows"] if row["status"] == "ok"]
        per_item = workload["per_item"]
        no_ideal_time = not per_item and workload["ideal"]["seconds"] <= 0
        if per_item:
            values = [row["per_item_us"] for row in rows]
            axis.set_xlabel("microseconds per task (ideal: 0)")
        elif no_ideal_time:
            # Nothing to divide by (a warm re-run's ideal is no time at all).
            values = [row["makespan_s"] for row in rows]
            axis.set_xlabel("makespan in seconds (ideal: 0)")
            axis.set_xscale("log")
        else:
            values = [row["ratio_to_ideal"] for row in rows]
            axis.set_xlabel("makespan / ideal (1 = ideal)")
            axis.axvline(1.0, color="black", linewidth=0.8)
            axis.set_xscale("log")
        labels = [row["contender"] + (" *" if row.get("scale", 1) > 1 else "") for row in rows]
        colors = ["tab:orange" if row["kind"] == "feste" else "tab:blue" for row in rows]
        positions = list(range(len(rows)))[::-1]
        axis.barh(positions, values, color=colors)
        # Room on the right for the value labels.
        if per_item:
            axis.set_xlim(0, max(values) * 1.15)
        elif no_ideal_time:
            axis.set_xlim(min(values) * 0.5, max(values) * 3)
        else:
            axis.set_xlim(min(0.8, min(values) * 0.8), max(values) * 1.8)
        axis.set_yticks(positions, labels, fontsize=8)
        for position, value in zip(positions, values):
            axis.annotate(
                f"{value:.2f}" if not per_item else f"{value:.1f}",
                (value, position),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        axis.set_title(f"{workload['title']} (n={workload['n']})", fontsize=9, loc="left")
    figure.suptitle(f"feste benchmarks ({report['mode']} run); * = scaled from a subset")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(report: dict[str, Any], out_dir: Path, stem: str = "latest") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    written.append(json_path)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown_table(report))
    written.append(md_path)
    png_path = out_dir / f"{stem}.png"
    if write_chart(report, png_path):
        written.append(png_path)
    return written
