"""``feste.map``: feste calls over Dask DataFrames, Series and Bags (and pandas).

Design
------
* **One ordinary Dask task per partition.** :func:`map` returns the input's own kind of
  collection, built with ``map_partitions``: the partition task turns its rows into
  feste lazy calls (``fn(value)`` for a Series or Bag, ``fn(**row)`` for a DataFrame,
  a :class:`~feste.prompt.Prompt` taking the columns it reads as template variables),
  and computes them as :func:`feste.compute` does, on the async engine: the graph is
  built and optimized in the task's thread and run on the process's shared feste loop
  (one loop and one connection pool for the partitions running at once).
  So each partition's calls are optimized (batched, deduplicated) and sent with
  retries and the result cache, only one partition's texts are in memory in a task,
  and the result composes with whatever Dask does next (filters, joins,
  ``to_parquet``).
* **One computation for the limits.** The partitions of one mapped collection are one
  computation: in each process they join one shared
  :class:`~feste.limits.RunLimits` (:func:`feste.limits.joined_scope`), so
  ``max_concurrency=`` and the other context limits hold across partitions run in
  parallel threads instead of once per partition. On a Dask cluster each partition
  takes its limiters from the scheduler's lease board
  (:func:`feste.schedulers._leases.worker_quotas`, as the cluster scheduler's blocks
  do), so the limits hold for the whole cluster. A backend's own limits
  (``OpenAI(max_concurrency=...)``) are process-wide, or cluster-wide, as always.
* **Options are captured when the collection is built.** Context variables do not
  reach Dask's worker threads or processes, so :func:`map` snapshots the feste
  options in force (``context.set(...)``, with the ``FESTE_CACHE`` variable read
  then) into the partition tasks; a named ``run`` and callbacks stay behind.
* **Failures.** ``errors="raise"`` fails the partition (and the Dask computation)
  with the first error; ``errors="return"`` keeps every row: a failed row gets nulls
  and its message in an ``error`` column (a Bag gets a :class:`~feste.errors.Failure`
  in its place), and the other rows of its partition are unaffected.
* **Shapes.** Results form a Series (named ``"result"`` unless ``meta`` names it). A
  chat call with a Pydantic ``response_format`` expands into one column per field of
  the model. Null inputs of a Series or Bag give null results without a call.
* **explain.** :func:`explain` (``feste.explain``) finds the collections returned by
  :func:`map` that a Dask collection is computed from (their expressions or graph
  layers, by name) and explains their calls partition by partition (reading their
  input, never sending a request); anything else goes to
  :func:`feste.compute.explain`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import types
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dask
from dask.base import tokenize

from feste import context
from feste._loop import run_on_shared_loop
from feste._replay import replay_cached_calls
from feste.backend.base import Backend
from feste.cache._open import ENVIRONMENT_VARIABLE
from feste.compute import explain as explain_graph
from feste.compute import prepare
from feste.errors import Failure, OptionError
from feste.graph import GraphStats
from feste.limits import RunLimits, joined_scope
from feste.prompt import Prompt
from feste.schedulers._engine import run_graph
from feste.schedulers._leases import LeaseBoard, worker_quotas
from feste.schedulers._policy import portable_options

__all__ = ["ERROR_COLUMN", "RESULT_NAME", "explain", "map"]

#: The column holding a failed row's error message (``errors="return"``).
ERROR_COLUMN = "error"
#: The name of a result Series (and column) when ``meta`` gives none.
RESULT_NAME = "result"

# Options that stay with the caller: a named run is recorded by feste.compute in the
# caller's process, callbacks and the progress bar belong to it, and the partition task
# chooses its own scheduler (the async engine) and failure policy.
_CALLER_ONLY = frozenset(
    {"eager", "errors", "on_progress", "on_task_done", "on_task_failed", "progress", "run"}
)
_ERRORS = ("raise", "return")


# -- what a partition task carries -----------------------------------------------------


@dataclasses.dataclass
class _MapSpec:
    """Everything a partition task needs, pickled into the graph once per collection."""

    #: A backend method, a Prompt, a feste_task or a function building feste calls.
    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: "value" (Series, Bag: the value is the first argument), "row" (DataFrame rows as
    #: keywords) or "prompt" (a Prompt: a row, or a value named after its variable).
    calling: str
    #: The variable a Prompt takes a Series' values as.
    variable: str | None
    errors: str
    #: The caller's feste options (left out of repr: a cache URL may hold a password).
    options: dict[str, Any] = dataclasses.field(repr=False)
    #: Result columns and their dtypes (one column: a Series named after it).
    columns: dict[str, Any]
    #: The Pydantic model whose fields are the columns, when results expand.
    model: Any
    #: Fingerprints credentials alike on every worker of a cluster (never a key).
    salt: bytes = dataclasses.field(repr=False)
    token: str = ""

    def __post_init__(self) -> None:
        self.token = tokenize(
            self.fn,
            self.args,
            self.kwargs,
            self.calling,
            self.variable,
            self.errors,
            sorted(self.options.items(), key=lambda item: item[0]),
            list(self.columns),
        )

    def __dask_tokenize__(self) -> Any:
        return ("feste-map", self.token)

    def lazy_call(self, value: Any) -> Any:
        """The feste call for one value (Series, Bag) or one row (DataFrame, as a dict)."""
        if self.calling == "row":
            return self.fn(*self.args, **value, **self.kwargs)
        if self.calling == "prompt" and isinstance(value, Mapping):
            return self.fn(**value, **self.kwargs)
        if _is_null(value):
            return None
        if self.calling == "prompt":
            if self.variable is None:
                raise TypeError(
                    f"feste.map: this Prompt reads {sorted(self.fn.variables())}; give it a "
                    f"mapping of them per item, not a {type(value).__name__}"
                )
            return self.fn(**{self.variable: value}, **self.kwargs)
        return self.fn(value, *self.args, **self.kwargs)

    def items(self, part: Any) -> list[Any]:
        """A partition's values (Series, Bag) or rows as dicts (DataFrame)."""
        if not hasattr(part, "columns"):
            return list(part)
        wanted = list(part.columns)
        if self.calling == "prompt":
            wanted = [name for name in wanted if name in self.fn.variables()]
        records: list[Any] = part[wanted].to_dict("records")
        return records


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, pandas.NA (raises TypeError) and NaT
    except (TypeError, ValueError):
        return value is _pandas().NA


def _pandas() -> Any:
    """pandas, imported when a collection needs it (importing feste does not)."""
    import pandas

    return pandas


# -- limits shared by the partitions of one collection ---------------------------------

# Per process: the computation that the running partitions of a collection share. Weak:
# once no partition of it runs, a later one starts afresh (no overlap, same limits).
_scopes: weakref.WeakValueDictionary[str, RunLimits] = weakref.WeakValueDictionary()
_scopes_lock = threading.Lock()


def _cluster_worker() -> Any:
    """The Dask worker running this task, or None outside a cluster."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


_boards: weakref.WeakSet[Any] = weakref.WeakSet()


def _ensure_board(worker: Any) -> None:
    """Make sure the scheduler holds the lease board (once per worker process)."""
    if worker in _boards:
        return
    from distributed import get_client

    LeaseBoard.register(get_client())
    _boards.add(worker)


@contextmanager
def _collection_limits(spec: _MapSpec) -> Iterator[None]:
    """Inside, computations are parts of the collection's one computation."""
    worker = _cluster_worker()
    if worker is not None:
        _ensure_board(worker)
    # On a cluster's worker: cluster-wide limiters, leased from the board; elsewhere
    # nothing changes (the process's own limiters).
    with worker_quotas(spec.salt, spec.token):
        with _scopes_lock:
            scope = _scopes.get(spec.token)
            if scope is None:
                # Made here, so it captures the spec's options and the cluster's quotas.
                scope = _scopes[spec.token] = RunLimits()
        with joined_scope(scope):
            yield


# -- running one partition -------------------------------------------------------------


def _settled(spec: _MapSpec, items: list[Any]) -> list[Any]:
    """The values of ``items``' calls, computed as one feste computation."""
    with (
        context.set(**spec.options, eager=False, progress=False, errors=spec.errors),
        _collection_limits(spec),
    ):
        calls = [spec.lazy_call(item) for item in items]
        # feste.compute's steps, the graph built and optimized here, in the task's
        # thread; run on the process's shared loop, so that partitions running at once
        # share one loop and its connections rather than running one loop each.
        prepared = prepare(calls)
        if not prepared.keys:
            return calls
        graph = replay_cached_calls(prepared.graph)
        (values,) = prepared.finish(run_on_shared_loop(run_graph(graph, prepared.keys)))
    return list(values)


def _error_text(failure: Failure) -> str:
    error = failure.exception
    cause = failure.extra.get("cause") if failure.cancelled else None
    if cause is not None:
        error = cause
    return f"{type(error).__name__}: {error}"


def _fields(value: Any, model: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, model):
        return dict(value.model_dump())
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        f"feste.map expected a {model.__name__} (the response_format) for each row, "
        f"got {type(value).__name__}"
    )


def _frame_of(spec: _MapSpec, values: list[Any], index: Any) -> Any:
    """The partition's result: a Series, or a DataFrame of fields and errors."""
    pandas = _pandas()
    errors: list[str | None] = []
    plain: list[Any] = []
    for value in values:
        if isinstance(value, Failure):
            errors.append(_error_text(value))
            plain.append(None)
        else:
            errors.append(None)
            plain.append(value)
    data: dict[str, Any] = {}
    if spec.model is not None:
        rows = [_fields(value, spec.model) for value in plain]
        for name in spec.columns:
            data[name] = [row.get(name) for row in rows]
    else:
        (name,) = spec.columns
        data[name] = plain
    columns = {
        name: pandas.Series(column, index=index, dtype=spec.columns[name], name=name)
        for name, column in data.items()
    }
    if spec.errors == "return":
        columns[ERROR_COLUMN] = pandas.Series(
            errors, index=index, dtype="string", name=ERROR_COLUMN
        )
    if len(columns) == 1:
        (series,) = columns.values()
        return series
    return pandas.DataFrame(columns, index=index)


def _run_frame_partition(part: Any, spec: _MapSpec) -> Any:
    """The task of one DataFrame or Series partition (also a whole pandas object)."""
    return _frame_of(spec, _settled(spec, spec.items(part)), part.index)


def _run_bag_partition(part: Any, spec: _MapSpec) -> list[Any]:
    """The task of one Bag partition: a list of results, failures in place."""
    return _settled(spec, list(part))


# -- building the collection -----------------------------------------------------------


def _kind(collection: Any) -> str:
    pandas = _pandas()
    if isinstance(collection, pandas.Series):
        return "pandas-series"
    if isinstance(collection, pandas.DataFrame):
        return "pandas-frame"
    module = type(collection).__module__
    if module.startswith("dask.bag"):
        return "bag"
    if module.startswith("dask.dataframe") or module.startswith("dask_expr"):
        import dask.dataframe

        if isinstance(collection, dask.dataframe.Series):
            return "series"
        if isinstance(collection, dask.dataframe.DataFrame):
            return "frame"
    raise TypeError(
        f"feste.map maps over a dask.dataframe Series or DataFrame, a dask.bag Bag, or a "
        f"pandas Series or DataFrame; got {type(collection).__module__}."
        f"{type(collection).__qualname__} (build one with dask.dataframe.from_pandas, "
        f"dask.dataframe.read_parquet or dask.bag.from_sequence)"
    )


def _response_model(kwargs: Mapping[str, Any]) -> Any:
    """The Pydantic model asked for with ``response_format=``, else None."""
    model = kwargs.get("response_format")
    if inspect.isclass(model) and hasattr(model, "model_fields"):
        return model
    return None


_DTYPES = {str: "string", int: "Int64", float: "Float64", bool: "boolean"}


def _field_dtype(annotation: Any) -> Any:
    """A nullable pandas dtype for a field's annotation (``Optional`` and a ``Literal``
    of one type included); object for anything else."""
    arguments = [argument for argument in typing.get_args(annotation) if argument is not None]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        kinds = {type(argument) for argument in arguments}
        return _DTYPES.get(kinds.pop(), object) if len(kinds) == 1 else object
    if origin is typing.Union or origin is types.UnionType:  # Optional[X]: X
        others = [argument for argument in arguments if argument is not type(None)]
        return _field_dtype(others[0]) if len(others) == 1 else object
    return _DTYPES.get(annotation, object)


def _default_dtype(fn: Any, kwargs: Mapping[str, Any]) -> Any:
    """What a result column holds when ``meta`` does not say: text for a plain chat call
    or a prompt, lists of floats for an embedding (an Arrow list type, which Parquet
    stores as it is), else Python objects."""
    if isinstance(fn, Prompt):
        return "string"
    owner = getattr(fn, "__self__", None)
    method = getattr(fn, "__name__", "")
    if not isinstance(owner, Backend):
        return object
    if method == "chat" and "response_format" not in kwargs and not kwargs.get("full"):
        return "string"
    if method == "embed" and not kwargs:
        import pyarrow

        return _pandas().ArrowDtype(pyarrow.list_(pyarrow.float64()))
    return object


def _result_columns(fn: Any, kwargs: Mapping[str, Any], meta: Any) -> tuple[dict[str, Any], Any]:
    """The result columns with their dtypes, and the model the rows expand from."""
    model = _response_model(kwargs)
    if meta is not None:
        import dask.dataframe.utils

        made = dask.dataframe.utils.make_meta(meta)
        if hasattr(made, "columns"):
            columns = {str(name): dtype for name, dtype in made.dtypes.items()}
            if ERROR_COLUMN in columns:
                raise ValueError(
                    f"feste.map: meta names a column {ERROR_COLUMN!r}, which feste adds "
                    f"itself with errors='return'; describe the results only"
                )
            return columns, model
        if model is not None:
            raise ValueError(
                "feste.map: meta for a response_format model must be a DataFrame (one "
                "column per field of the model), or leave meta out"
            )
        name = RESULT_NAME if made.name is None else str(made.name)
        return {name: made.dtype}, None
    if model is not None:
        return {
            name: _field_dtype(field.annotation) for name, field in model.model_fields.items()
        }, model
    return {RESULT_NAME: _default_dtype(fn, kwargs)}, None


def _meta_of(spec: _MapSpec) -> Any:
    pandas = _pandas()
    return _frame_of(spec, [], pandas.RangeIndex(0))


def _captured_options() -> dict[str, Any]:
    """The caller's feste options, as the partition tasks will run with them."""
    options = {
        name: value for name, value in portable_options().items() if name not in _CALLER_ONLY
    }
    options.pop("scheduler", None)
    if options.get("cache") is None and os.environ.get(ENVIRONMENT_VARIABLE):
        options["cache"] = os.environ[ENVIRONMENT_VARIABLE]
    return options


def _calling(fn: Any, kind: str, args: tuple[Any, ...]) -> tuple[str, str | None]:
    """How ``fn`` is called per item, and the variable a Prompt takes a value as."""
    if isinstance(fn, Prompt):
        if args:
            raise TypeError(
                "feste.map: a Prompt takes its variables by name; pass extra variables as "
                "keywords (feste.map(prompt, frame, tone='formal'))"
            )
        names = sorted(fn.variables())
        if kind in ("series", "pandas-series") and len(names) != 1:
            raise TypeError(
                f"feste.map: a Prompt over a Series needs exactly one template variable "
                f"to fill with its values; this one reads {names}: map it over a "
                f"DataFrame whose columns are named after them"
            )
        return "prompt", names[0] if len(names) == 1 else None
    if not callable(fn):
        raise TypeError(
            f"feste.map: fn must be a backend method (llm.chat), a Prompt, a feste_task or "
            f"a function building feste calls; got {type(fn).__name__}"
        )
    if kind in ("frame", "pandas-frame"):
        return "row", None
    return "value", None


def map(
    fn: Callable[..., Any],
    collection: Any,
    *args: Any,
    errors: str = "raise",
    meta: Any = None,
    **kwargs: Any,
) -> Any:
    """Apply a feste call to every value or row of ``collection``; return the results
    as the same kind of collection, lazily (pandas in: pandas out, computed now).

    ``fn`` is a backend method (``llm.chat``, ``llm.embed``), a
    :class:`~feste.prompt.Prompt`, a ``feste_task`` or any function that builds feste
    calls. Over a Series or a Bag each value is its first argument (``args`` and
    ``kwargs`` follow); over a DataFrame each row's columns are keyword arguments (a
    Prompt takes the columns it reads as its variables; over a Series, a Prompt with
    one variable takes the values as it). Results form a Series named ``"result"``;
    with a Pydantic ``response_format=`` they expand into one column per field.
    ``meta`` (as in Dask: a name and dtype, or an empty pandas object) names and types
    the results instead.

    ``errors="raise"`` fails the computation with the first error; ``"return"`` gives a
    failed row nulls and its message in an ``error`` column (a Bag: a
    :class:`~feste.errors.Failure` in its place). The partitions of the collection
    share the feste options in force now (limits, cache, retries) as one computation,
    across threads and across a cluster's workers.
    """
    if errors not in _ERRORS:
        raise ValueError(f"feste.map: errors must be 'raise' or 'return', got {errors!r}")
    kind = _kind(collection)
    calling, variable = _calling(fn, kind, args)
    columns, model = _result_columns(fn, kwargs, meta)
    options = _captured_options()
    if options.get("max_cost") is not None:
        # Partitions run as separate computations, in Dask's threads, processes or on a
        # cluster's workers: no one budget would bound them all, so none is promised.
        raise OptionError(
            "feste.map does not keep a max_cost budget: its partitions run as separate "
            "computations on Dask's workers, which cannot share one budget. Leave "
            "max_cost unset around feste.map (set it around feste.compute of lists of "
            "calls instead), or bound the spend with max_concurrency and the rows mapped"
        )
    spec = _MapSpec(
        fn=fn,
        args=args,
        kwargs=kwargs,
        calling=calling,
        variable=variable,
        errors=errors,
        options=options,
        columns=columns,
        model=model,
        salt=os.urandom(16),
    )
    if kind.startswith("pandas"):
        return _run_frame_partition(collection, spec)
    if kind == "bag":
        mapped = collection.map_partitions(_run_bag_partition, spec, token="feste-map")
        _remember(mapped.name, collection, spec)
        return mapped
    mapped = collection.map_partitions(
        _run_frame_partition, spec, meta=_meta_of(spec), token="feste-map"
    )
    _remember(mapped._name, collection, spec)
    return mapped


# -- explain ---------------------------------------------------------------------------

# The collections map() returned, by name: their input and spec (for explain). Bounded:
# old entries go first; explaining a forgotten one falls back to the graph's own count.
_made: dict[str, tuple[Any, _MapSpec]] = {}
_MADE_KEPT = 256
_made_lock = threading.Lock()


def _remember(name: str, collection: Any, spec: _MapSpec) -> None:
    with _made_lock:
        _made[name] = (collection, spec)
        while len(_made) > _MADE_KEPT:
            del _made[next(iter(_made))]


def _names_in(obj: Any) -> list[str]:
    """The names of the expressions (DataFrame, Series) or graph layers (Bag) that
    ``obj`` is computed from, itself included; empty for anything else."""
    expression = getattr(obj, "expr", None)
    if expression is not None and hasattr(expression, "walk"):
        return [part._name for part in expression.walk()]
    if _kind_or_none(obj) == "bag":
        return list(obj.dask.layers)
    return []


def _mapped_in(obj: Any) -> list[tuple[Any, _MapSpec]]:
    """The collections returned by :func:`map` that ``obj`` is, or is computed from."""
    with _made_lock:
        found = {name: _made[name] for name in _names_in(obj) if name in _made}
    return list(found.values())


def _kind_or_none(obj: Any) -> str | None:
    try:
        return _kind(obj)
    except TypeError:
        return None


def _explain_partition(part: Any, spec: _MapSpec) -> GraphStats:
    with context.set(**spec.options, eager=False):
        return explain_graph([spec.lazy_call(item) for item in spec.items(part)])


def _merged(parts: list[GraphStats]) -> GraphStats:
    calls: dict[str, int] = {}
    requests: dict[str, int] = {}
    at_run_time: dict[str, int] = {}
    usage: dict[str, Any] = {}
    cost: dict[str, float | None] = {}
    batch_api: dict[str, int] = {}
    for stats in parts:
        counted = ((calls, stats.calls), (requests, stats.requests), (batch_api, stats.batch_api))
        for total, counts in counted:
            for method, count in counts.items():
                total[method] = total.get(method, 0) + count
        for method, count in stats.at_run_time.items():
            at_run_time[method] = at_run_time.get(method, 0) + count
        for method, used in stats.estimated_usage.items():
            usage[method] = usage[method] + used if method in usage else used
        for method, dollars in stats.estimated_cost.items():
            if method in cost:
                before = cost[method]
                cost[method] = None if before is None or dollars is None else before + dollars
            else:
                cost[method] = dollars
    dates = [stats.price_date for stats in parts if stats.price_date]
    return GraphStats(
        nodes=sum(stats.nodes for stats in parts),
        depth=max((stats.depth for stats in parts), default=0),
        calls=calls,
        requests=requests,
        at_run_time=at_run_time,
        estimated_usage=usage,
        estimated_cost=cost,
        unknown_inputs=sum(stats.unknown_inputs for stats in parts),
        price_date=dates[0] if dates else None,
        batch_api=batch_api,
    )


def explain(*objs: Any, optimize_graph: bool = True) -> GraphStats:
    """:func:`feste.compute.explain`, and for a Dask collection returned by :func:`map`
    or computed from such collections (a filter, an ``assign``): the calls and requests
    of those maps, summed over their partitions, each partition's calls optimized as
    they will run. Reading their input runs its Dask graph (a Parquet read, say); no
    request is sent."""
    parts: list[GraphStats] = []
    others: list[Any] = []
    for obj in objs:
        found = _mapped_in(obj)
        if not found:
            others.append(obj)
        for collection, spec in found:
            pieces = [
                dask.delayed(_explain_partition)(piece, spec) for piece in collection.to_delayed()
            ]
            parts.extend(dask.compute(*pieces))
    if others or not parts:
        parts.append(explain_graph(*others, optimize_graph=optimize_graph))
    if len(parts) == 1:
        return parts[0]
    return _merged(parts)
