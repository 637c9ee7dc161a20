"""Graph optimization: an :class:`Optimizer` runs a list of :class:`Optimization` passes.

A pass takes the graph dict (key -> ``dask.task_spec`` node) and the output keys, and
returns a new graph in which every output key still yields the same value. Passes may
add nodes (batched requests) and rewrite others (to pick their item out of a batch),
but never remove an output key. ``feste.compute`` runs the default optimizer on the
graph dict itself before dispatch, so the same optimized graph reaches every scheduler,
a distributed Client included (which does not apply a collection's
``__dask_optimize__``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dask.core import flatten

__all__ = ["Optimization", "Optimizer", "default_optimizer"]


class Optimization:
    """One graph rewrite. Subclasses implement :meth:`apply`."""

    name = "optimization"

    def apply(self, graph: dict[Any, Any], keys: Sequence[Any]) -> dict[Any, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Optimizer:
    """Applies its passes in order."""

    def __init__(self, optimizations: Iterable[Optimization] = ()) -> None:
        self.optimizations = list(optimizations)
        for optimization in self.optimizations:
            if not isinstance(optimization, Optimization):
                raise TypeError(f"Optimizer takes Optimization instances, got {optimization!r}")

    def optimize(self, graph: Mapping[Any, Any], keys: Any) -> dict[Any, Any]:
        flat_keys = list(flatten(keys)) if isinstance(keys, list) else [keys]
        optimized = dict(graph)
        for optimization in self.optimizations:
            optimized = optimization.apply(optimized, flat_keys)
        return optimized

    def __repr__(self) -> str:
        return f"Optimizer({self.optimizations!r})"


def default_optimizer() -> Optimizer:
    """The passes ``feste.compute`` applies when ``optimize_graph=True``."""
    return Optimizer([])
