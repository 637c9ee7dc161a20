"""feste: run large compositions of LLM calls as an optimized, batched, lazy task graph.

Write ordinary Python: render prompts, call backends, feed one call's output into the
next. Nothing runs until :func:`compute`, which optimizes the graph (batching,
deduplication) and executes it (by default on an async scheduler that keeps many
requests in flight within each provider's limits). :func:`map` applies calls to the
rows of a Dask (or pandas) DataFrame, Series or Bag.
"""

from feste import context
from feste.collections import explain, map
from feste.compute import as_completed, compute, compute_async
from feste.errors import BudgetExceeded, Failure, FesteError
from feste.graph import FesteGraph
from feste.prompt import FesteEnvironment, LanguageMismatch, Prompt
from feste.task import FesteBase, FesteDelayed, feste_task
from feste.usage import record_usage

__version__ = "0.2.0.dev0"

__all__ = [
    "BudgetExceeded",
    "Failure",
    "FesteBase",
    "FesteDelayed",
    "FesteEnvironment",
    "FesteError",
    "FesteGraph",
    "LanguageMismatch",
    "Prompt",
    "as_completed",
    "compute",
    "compute_async",
    "context",
    "explain",
    "feste_task",
    "map",
    "record_usage",
]
