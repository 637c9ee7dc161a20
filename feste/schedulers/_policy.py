"""What a run means, whichever scheduler runs it: keywords, failures and callbacks.

The async engine (:mod:`feste.schedulers._engine`) and the schedulers built on dask's
``get_async`` (:mod:`feste.schedulers._local`: sync, threads, processes) differ in where
nodes run, not in what a computation promises. The promises live here, once, and both
call them.

Keywords
--------
A scheduler's keywords are feste options for this computation (``errors="return"``,
callbacks, limits), plus the few the scheduler takes itself (dask's ``num_workers`` and
``pool``); anything else is refused with a :class:`~feste.errors.SchedulerError` listing
what is accepted (:func:`split_keywords`, :func:`option_keywords`). Options travel to
worker processes without the callbacks, which stay with the caller
(:func:`portable_options`).

Failure
-------
With ``errors="raise"`` (the default) the first exception, annotated with its task key,
stops the run. With ``errors="return"`` (:func:`returns_failures`):

* a task that raises settles to a :class:`~feste.errors.Failure` holding the annotated
  exception and the number of attempts (:func:`task_failure`);
* a task that needs a failed task does not run (:func:`dependent_failure`). An item
  pick of a failed batch (``take_item``) and an alias of a failed key fail with the same
  error, under their own key. Any other dependent is *cancelled*: its failure holds a
  :class:`~feste.errors.CancelledError` naming it and the task that failed first, which
  it passes on to its own dependents (the failed task's key and exception ride along in
  ``Failure.extra`` as ``"failed_key"`` and ``"cause"``, so that a chain of
  cancellations run in worker processes names the same task);
* a batch planned by the optimizer whose inputs partly failed still goes out with the
  other items (:func:`batch_without_failed_inputs`): each failed input costs only its
  own item, whose pick is cancelled, and that item's dependents;
* everything that does not depend on a failure finishes.

Callbacks and progress
----------------------
:class:`TaskEvents` reports each settled task to the run's progress bar (which counts
the backend calls among them) on every scheduler, and reads ``on_task_done``,
``on_task_failed`` and ``on_progress`` when a run starts and calls them in the calling
process as each task settles: ``on_task_done(key, value)`` or
``on_task_failed(key, exception)`` (cancelled tasks included), then
``on_progress(settled, total)``. Literal data nodes are not tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from dask.task_spec import Alias, Task

from feste import context
from feste._nodes import take_item
from feste._progress import RunProgress
from feste.backend.types import ItemFailure
from feste.errors import CancelledError, Failure, SchedulerError, annotate_task_error

__all__ = [
    "TaskEvents",
    "batch_without_failed_inputs",
    "cancelled_item",
    "dependent_failure",
    "first_failure",
    "option_keywords",
    "passes_failure_on",
    "portable_options",
    "returns_failures",
    "split_keywords",
    "task_failure",
]


# -- keywords -------------------------------------------------------------------------


def split_keywords(
    kwargs: Mapping[str, Any], *, scheduler: str, accepted: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(options, own)``: the feste options, and the keywords ``scheduler`` takes itself.

    ``accepted`` names the scheduler's own keywords; a name in both stays the
    scheduler's. Any other keyword raises a :class:`SchedulerError` listing the valid ones.
    """
    own_names = set(accepted)
    options: dict[str, Any] = {}
    own: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in kwargs.items():
        if name in own_names:
            own[name] = value
        elif name in context.OPTIONS:
            options[name] = value
        else:
            unknown.append(name)
    if unknown:
        unknown.sort()
        names = f"keyword{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
        if own_names:
            valid = ", ".join(sorted(own_names | set(context.OPTIONS)))
            accepts = f"it accepts: {valid}"
        else:
            accepts = f"it accepts feste options: {', '.join(sorted(context.OPTIONS))}"
        raise SchedulerError(f"unknown {names} for the {scheduler!r} scheduler; {accepts}")
    return options, own


def option_keywords(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of the async engine: feste options only; anything else is refused."""
    options, _ = split_keywords(kwargs, scheduler="async")
    return options


def portable_options() -> dict[str, Any]:
    """Options worth sending to another process (callbacks stay behind)."""
    return {name: value for name, value in context.snapshot().items() if not callable(value)}


# -- failure --------------------------------------------------------------------------


def returns_failures() -> bool:
    """Whether failed tasks settle to :class:`Failure` values (``errors="return"``)."""
    return bool(context.get("errors") == "return")


def task_failure(key: Hashable, exc: BaseException) -> Failure:
    """The failure of task ``key``, which raised ``exc``.

    A :class:`CancelledError` that names the task that failed first (an item of a batch
    whose input failed) makes ``key`` cancelled, like any other dependent.
    """
    failed_key = getattr(exc, "failed_key", None)
    if isinstance(exc, CancelledError) and failed_key is not None:
        return _cancelled(key, failed_key, getattr(exc, "cause", exc))
    annotated = annotate_task_error(exc, key)
    return Failure(annotated, key, getattr(exc, "attempts", None) or 1)


def passes_failure_on(node: Any) -> bool:
    """Whether ``node`` reading a failed value fails with the same error.

    True for an alias of the failed key and for an item pick of a failed batch; any
    other node is cancelled instead.
    """
    node_type = type(node)
    return node_type is Alias or (node_type is Task and node.func is take_item)


def dependent_failure(key: Hashable, upstream: Failure, *, same_error: bool) -> Failure:
    """The failure of task ``key``, not run because its input ``upstream`` failed.

    ``same_error`` (see :func:`passes_failure_on`): ``key`` only passes a failed value
    on, and fails with its error; otherwise it is cancelled.
    """
    if upstream.cancelled:
        failed_key = upstream.extra.get("failed_key", upstream.key)
        cause = upstream.extra.get("cause", upstream.exception)
        return _cancelled(key, failed_key, cause)
    if same_error:
        return Failure(upstream.exception, key, upstream.attempts)
    return _cancelled(key, upstream.key, upstream.exception)


def _cancelled(key: Hashable, failed_key: Hashable, cause: BaseException) -> Failure:
    error = CancelledError(
        f"task {key!r} was not run because task {failed_key!r} failed: "
        f"{type(cause).__name__}: {cause}"
    )
    return Failure(error, key, 0, cancelled=True, extra={"failed_key": failed_key, "cause": cause})


def cancelled_item(upstream: Failure) -> ItemFailure:
    """The entry of a batch item not sent because its input ``upstream`` failed."""
    failed_key = upstream.extra.get("failed_key", upstream.key)
    cause = upstream.extra.get("cause", upstream.exception)
    error = CancelledError(
        f"not sent because its input, task {failed_key!r}, failed: {type(cause).__name__}: {cause}"
    )
    error.failed_key = failed_key  # type: ignore[attr-defined]
    error.cause = cause  # type: ignore[attr-defined]
    return ItemFailure(error)


def batch_without_failed_inputs(
    items: Sequence[Any], failures: Sequence[Failure | None]
) -> tuple[list[Any], Callable[[list[Any]], list[Any]]]:
    """The items of a batch worth sending, and how to put their results back in place.

    ``failures[i]`` is the failure of item ``i``'s input, or None. Returns the items
    whose inputs succeeded and a function that takes their results and returns one
    entry per original item: its result, or a :func:`cancelled_item`.
    """
    kept = [item for item, failure in zip(items, failures) if failure is None]

    def merged(results: list[Any]) -> list[Any]:
        entries: list[Any] = []
        position = 0
        for failure in failures:
            if failure is None:
                entries.append(results[position])
                position += 1
            else:
                entries.append(cancelled_item(failure))
        return entries

    return kept, merged


def first_failure(values: Iterable[Any]) -> Failure | None:
    """The first :class:`Failure` among ``values``, looking inside lists, tuples and dicts."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, Failure):
            return value
        if isinstance(value, (list, tuple, set)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return None


# -- callbacks ------------------------------------------------------------------------


class TaskEvents:
    """The per-task callbacks of one run, read from the options when it starts."""

    __slots__ = ("on_progress", "on_task_done", "on_task_failed", "progress", "settled", "total")

    def __init__(self, total: int = 0, progress: RunProgress | None = None) -> None:
        self.on_task_done = context.get("on_task_done")
        self.on_task_failed = context.get("on_task_failed")
        self.on_progress = context.get("on_progress")
        self.progress = progress
        self.total = total
        self.settled = 0

    @property
    def wanted(self) -> bool:
        """Whether any callback or progress bar is on (else a run can skip the calls)."""
        return not (
            self.on_task_done is None
            and self.on_task_failed is None
            and self.on_progress is None
            and self.progress is None
        )

    def done(self, key: Hashable, value: Any) -> None:
        """Task ``key`` finished with ``value``."""
        self.settled += 1
        if self.progress is not None:
            self.progress.settled(key, True)
        if self.on_task_done is not None:
            self.on_task_done(key, value)
        if self.on_progress is not None:
            self.on_progress(self.settled, self.total)

    def failed(self, key: Hashable, error: BaseException) -> None:
        """Task ``key`` failed with ``error``, or was cancelled (a ``CancelledError``)."""
        self.settled += 1
        if self.progress is not None:
            self.progress.settled(key, False)
        if self.on_task_failed is not None:
            self.on_task_failed(key, error)
        if self.on_progress is not None:
            self.on_progress(self.settled, self.total)
