"""Lazy feste tasks: ``feste_task`` and the values it returns.

Design
------
* ``feste_task(fn)`` wraps a function (or a method, through the descriptor protocol).
  Calling the wrapper checks the *current* context: in eager mode it runs ``fn`` at once
  and returns a plain value; otherwise it makes one ``dask.task_spec.Task`` node and
  returns a :class:`FesteDelayed` holding it. The check happens at call time, so an
  object created outside ``context.set(eager=True)`` still runs eagerly inside it.
* :class:`FesteDelayed` is a subclass of ``dask.delayed.Delayed``: a real Dask collection
  that ``dask.compute`` and ``dask.delayed`` accept, whose operators, attribute access and
  indexing build further feste nodes, and whose ``compute()`` goes through
  ``feste.compute`` (optimizer, then feste's schedulers). Instances are immutable.
* A value holds only its own node and the lazy values the node refers to. Its graph
  (``.dask``, ``__dask_graph__()``: a ``HighLevelGraph`` of one layer named by the key)
  is put together when asked for, in one walk (:func:`feste.graph.merged_graph`);
  merging graphs at every call, as ``dask.delayed`` does, is quadratic in the length
  of a chain of calls. Building a graph is linear in its calls and in its depth.
* Keys are ``"<name>-<token>"``. For pure calls the token is a hash of what identifies
  the function and of its arguments, so identical calls share one node; impure calls
  (the default for plain functions, as in dask) get a random token. Plain arguments
  (strings, numbers, lists and dicts of them: most LLM calls) and lazy values are
  described by their ``repr()`` and keys, cheaply; anything else by ``dask.tokenize``.
  Objects embedded in a graph decide their own token through ``__dask_tokenize__``
  (backends leave their API key out of it). A wrapped function's token is worked out
  once, as ``dask.delayed`` does.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import operator
import os
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

from dask.base import is_dask_collection, tokenize
from dask.delayed import Delayed, unpack_collections
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.task_spec import Task, TaskRef
from dask.utils import funcname

from feste import context
from feste._nodes import BackendCall
from feste.backend.base import Backend, install_call_builder
from feste.cache._session import PureTask
from feste.compute import compute, run_dask_graph
from feste.graph import build_task, is_plain, merged_graph

__all__ = [
    "FesteBase",
    "FesteDelayed",
    "FesteTaskFunction",
    "eager_or_lazy",
    "feste_task",
    "is_eager",
]

F = TypeVar("F", bound=Callable[..., Any])


def is_eager() -> bool:
    """True inside ``context.set(eager=True)``."""
    return bool(context.get("eager"))


class FesteDelayed(Delayed):
    """A lazy value: the output of one node of a feste task graph.

    Behaves like ``dask.delayed.Delayed``: ``x.compute()``, ``x.key``, arithmetic and
    comparison operators, ``x[i]``, ``x.attr`` and ``x.method(...)`` all return new lazy
    values; ``len()`` and iteration work when ``nout`` was given. It refuses ``bool()``,
    since the truth of a value that has not been computed is unknown.
    """

    # ``_node``: this value's own graph node; ``_inputs``: the lazy values it refers to.
    # The graph (``.dask``) is put together from them only when asked for.
    __slots__ = ("_inputs", "_node")
    _inputs: tuple[Any, ...]
    _node: Any

    # dask.compute(feste_value) lands in feste's run path: optimizer, then scheduler.
    __dask_scheduler__ = staticmethod(run_dask_graph)

    @property
    def dask(self) -> HighLevelGraph:
        """The graph of this value: a ``HighLevelGraph`` of one layer, named by the key.

        Built when read (from this node and those it refers to), so building a chain
        of calls stays linear; a value made from a whole graph (``persist``) keeps it.
        """
        if self._dask is not None:
            return self._dask
        layer = MaterializedLayer(_DeferredGraph(self))
        return HighLevelGraph({self._layer: layer}, {self._layer: set()})

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its whole graph, flat: pickling the values each one refers to
        # would recurse once per call of a chain.
        graph = merged_graph([self])
        layers = {self._layer: MaterializedLayer(graph)}
        whole = HighLevelGraph(layers, {self._layer: set()})
        return (FesteDelayed, (self._key, whole, self._length, self._layer))

    def __feste_node__(self) -> tuple[Any, Any, tuple[Any, ...]] | None:
        """``(key, node, inputs)`` for :func:`feste.graph.merged_graph`; None when this
        value holds a whole graph instead."""
        if self._dask is not None:
            return None
        return self._key, self._node, self._inputs

    def compute(self, **kwargs: Any) -> Any:
        """Compute this value with ``feste.compute`` and return it."""
        (result,) = compute(self, **kwargs)
        return result

    def _rebuild(self, dsk: Any, *, rename: Any = None) -> FesteDelayed:
        rebuilt = super()._rebuild(dsk, rename=rename)
        return FesteDelayed(rebuilt.key, rebuilt.dask, rebuilt._length, layer=rebuilt._layer)

    def __repr__(self) -> str:
        return f"FesteDelayed({self.key!r})"

    def __bool__(self) -> bool:
        raise TypeError(
            "the truth value of a lazy feste value is unknown until it is computed; "
            "compute it first (feste.compute(x)) or use context.set(eager=True)"
        )

    def __getattr__(self, attr: str) -> FesteDelayed:
        if attr.startswith("_") or attr in _PROBED_BY_DASK:
            raise AttributeError(f"FesteDelayed has no attribute {attr!r}")
        return FesteAttribute(self, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return eager_or_lazy(_apply, (self, args, kwargs), {}, name="call", pure=False)

    def __iter__(self) -> Any:
        if self._length is None:
            raise TypeError(
                "a lazy feste value of unknown length is not iterable; "
                "give nout= to feste_task to unpack its result"
            )
        # A list, not a generator: iter() itself must raise when the length is unknown.
        return iter([self[index] for index in range(self._length)])  # type: ignore[index]

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError(
                "a lazy feste value of unknown length has no len(); give nout= to feste_task"
            )
        return int(self._length)

    def __setitem__(self, index: Any, value: Any) -> None:
        raise TypeError("lazy feste values are immutable")

    @classmethod
    def _get_binary_operator(cls, op: Callable[..., Any], inv: bool = False) -> Callable[..., Any]:
        def lazy_operator(*args: Any) -> Any:
            if inv:
                args = args[::-1]
            return eager_or_lazy(op, args, {}, name=funcname(op), pure=True)

        return lazy_operator

    _get_unary_operator = _get_binary_operator


class _DeferredGraph(Mapping[Any, Any]):
    """The graph of one lazy value as a mapping, put together on first use.

    ``is_dask_collection`` asks every object for its graph only to see that it has
    one: that question must not walk the whole graph.
    """

    __slots__ = ("_graph", "_value")

    def __init__(self, value: FesteDelayed) -> None:
        self._value = value
        self._graph: dict[Any, Any] | None = None

    def _materialized(self) -> dict[Any, Any]:
        if self._graph is None:
            self._graph = merged_graph([self._value])
        return self._graph

    def __getitem__(self, key: Any) -> Any:
        return self._materialized()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._materialized()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._materialized())

    def __len__(self) -> int:
        return len(self._materialized())


_set_slot = object.__setattr__


def _node_value(key: Any, node: Any, inputs: tuple[Any, ...], length: int | None) -> FesteDelayed:
    """A lazy value for ``node``, which refers to the values ``inputs``."""
    value = FesteDelayed.__new__(FesteDelayed)
    # Set directly: FesteDelayed, like Delayed, refuses attribute assignment.
    _set_slot(value, "_key", key)
    _set_slot(value, "_dask", None)
    _set_slot(value, "_length", length)
    _set_slot(value, "_layer", key)
    _set_slot(value, "_node", node)
    _set_slot(value, "_inputs", inputs)
    return value


def _apply(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func(*args, **kwargs)


# Dask looks these up on every object it meets to classify it (``is_dask_collection``
# probes ``x.expr``); answering with a lazy attribute would cost a node per probe.
_PROBED_BY_DASK = frozenset({"expr"})


class FesteAttribute(FesteDelayed):
    """``x.attr`` of a lazy value. Its graph is built only when asked for: Dask probes
    attributes (``x.expr``) to classify objects, and a probe must stay cheap."""

    __slots__ = ("_attr", "_obj")

    def __init__(self, obj: FesteDelayed, attr: str) -> None:
        super().__init__(f"getattr-{tokenize(obj.key, attr)}", None)
        self._obj = obj
        self._attr = attr

    def __feste_node__(self) -> tuple[Any, Any, tuple[Any, ...]]:
        node = Task(self._key, getattr, TaskRef(self._obj.key), self._attr)
        return self._key, node, (self._obj,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # x.method(...) calls the method in one node instead of fetching it first.
        return eager_or_lazy(
            _call_method, (self._obj, self._attr, args, kwargs), {}, name=self._attr, pure=True
        )


def _call_method(obj: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return getattr(obj, name)(*args, **kwargs)


for _op in (
    operator.abs,
    operator.neg,
    operator.pos,
    operator.invert,
    operator.add,
    operator.sub,
    operator.mul,
    operator.matmul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.pow,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.lshift,
    operator.rshift,
    operator.eq,
    operator.ne,
    operator.ge,
    operator.gt,
    operator.le,
    operator.lt,
    operator.getitem,
):
    FesteDelayed._bind_operator(_op)


def _contains_lazy(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    _, collections = unpack_collections([list(args), kwargs])
    return bool(collections)


def _compute_if_lazy(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """In eager mode, lazy values built earlier are computed before use."""
    if not _contains_lazy(args, kwargs):
        return args, kwargs
    computed_args, computed_kwargs = compute(list(args), kwargs, scheduler="sync")
    return tuple(computed_args), computed_kwargs


# How deep the quick token looks into nested lists, tuples and dicts that hold lazy
# values or tokenizable objects.
_TOKEN_DEPTH = 4


def _token_text(value: Any, depth: int = 0) -> str | None:
    """A deterministic text for ``value``, or None when it needs dask's tokenize.

    Plain values are their ``repr()`` (computed in C); lazy values are their key; an
    object that names its own token (``__dask_tokenize__``: backends, prompts) is that
    token when it is plain. Every part is self-delimiting, so different values give
    different texts.
    """
    if is_plain(value, depth):
        return repr(value)
    if isinstance(value, Delayed):
        return f"lazy:{value.key!r}"
    kind = type(value)
    if depth >= _TOKEN_DEPTH:
        return None
    if kind is list or kind is tuple:
        parts = []
        for item in value:
            text = _token_text(item, depth + 1)
            if text is None:
                return None
            parts.append(text)
        joined = ", ".join(parts)
        return f"[{joined}]" if kind is list else f"({joined},)"
    if kind is dict:
        entries = []
        for name, item in value.items():
            text = _token_text(item, depth + 1)
            if type(name) is not str or text is None:
                return None
            entries.append(f"{name!r}: {text}")
        return "{" + ", ".join(entries) + "}"
    if isinstance(value, type):
        return None
    tokenizer = getattr(value, "__dask_tokenize__", None)
    if tokenizer is None:
        return None
    text = _token_text(tokenizer(), depth + 1)
    if text is None:
        return None
    return f"tok:{kind.__module__}.{kind.__qualname__}:{text}"


# Functions found importable by _function_text, and their text (they live in their
# modules anyway, so keeping them here keeps nothing alive).
_importable: dict[Any, str] = {}


def _function_text(func: Any) -> str | None:
    """``"fn:module.name"`` for a function importable by that name (pickle, hence
    dask's tokenize, identify such a function by its name too), else None."""
    if type(func) is not types.FunctionType:
        return None
    known = _importable.get(func)
    if known is not None:
        return known
    module_name, qualname = func.__module__, func.__qualname__
    if "<" in qualname or module_name == "__main__":  # lambdas, local functions, scripts
        return None
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not func:
        return None
    text = _importable[func] = f"fn:{module_name}.{qualname}"
    return text


def _quick_token(
    source: Any, args: tuple[Any, ...], kwargs: dict[str, Any], head: str | None = None
) -> str | None:
    """A token for calls on plain arguments (most LLM calls: strings, numbers, lists of
    messages, earlier lazy values), many times cheaper than dask's generic
    normalization. None when the source or an argument needs that normalization.
    ``head``: the source's text, when the caller has it already."""
    if head is None and type(source) is types.FunctionType:
        head = _function_text(source)
    if head is None:
        head = _token_text(source)
        if head is None:
            return None
    if len(args) == 1 and type(args[0]) is str:
        text: str | None = repr(args)  # the common case, what _token_text would say
    else:
        text = _token_text(args)
        if text is None:
            return None
    if kwargs:
        named_items = sorted(kwargs.items())
        for _, value in named_items:
            if not is_plain(value, 1):
                named = _token_text(named_items)
                if named is None:
                    return None
                break
        else:
            named = repr(named_items)  # plain parameters: what _token_text would say
        text = f"{text}|{named}"
    return hashlib.sha1(f"{head}|{text}".encode()).hexdigest()[:32]


# Tokens of impure calls: unique, not derived from the call. A random prefix per
# process (drawn again in a forked child) and a counter: as unique as a random UUID,
# without a system call for each.
_impure_prefix = os.urandom(8).hex()
_impure_counter = itertools.count()


def _impure_token() -> str:
    return f"{_impure_prefix}{next(_impure_counter):016x}"


def _new_impure_prefix() -> None:
    global _impure_prefix
    _impure_prefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_impure_prefix)


def _call_lazily(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    name: str | None = None,
    pure: bool | None = None,
    nout: int | None = None,
    key: Any = None,
    token_source: Any = None,
) -> FesteDelayed:
    """Add one node calling ``func(*args, **kwargs)`` and return the lazy value for it.

    ``token_source`` replaces ``func`` in the token when the function object itself is
    not what identifies the call (a backend method bound to its declaration).
    """
    if key is None:
        prefix = name or funcname(func)
        if pure:
            source = token_source if token_source is not None else func
            token = _quick_token(source, args, kwargs) or tokenize(source, args, kwargs)
        else:
            token = _impure_token()  # every impure call is its own node
        key = f"{prefix}-{token}"

    node, collections = build_task(key, func, args, kwargs)
    return _node_value(key, node, tuple(collections) if collections else (), nout)


def eager_or_lazy(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    name: str | None = None,
    pure: bool | None = None,
    nout: int | None = None,
    key: Any = None,
    token_source: Any = None,
) -> Any:
    """The one place that decides, when something is called, whether it runs now.

    In eager mode (``context.set(eager=True)``) lazy arguments are computed first and
    ``func`` runs at once; otherwise one node calling ``func`` is added to a new graph
    and its lazy value returned. Feste tasks, operators and method calls on lazy values,
    prompts and backend calls all come through here.
    """
    if is_eager():
        args, kwargs = _compute_if_lazy(args, kwargs)
        return func(*args, **kwargs)
    return _call_lazily(
        func, args, kwargs, name=name, pure=pure, nout=nout, key=key, token_source=token_source
    )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# "file.py:12 in func" per (code, line): calls made in a loop share one string.
_call_sites: dict[tuple[types.CodeType, int], str] = {}
_MAX_CALL_SITES = 4096


def _user_call_site() -> str | None:
    """``"file.py:12 in func"`` of the innermost frame outside feste and outside a
    backend's own methods (a user-defined backend's ``embed``), for error messages."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(_PACKAGE_DIR) and not (
            # Only a method's frame can belong to a backend: look at self then.
            code.co_argcount
            and code.co_varnames[0] == "self"
            and isinstance(frame.f_locals.get("self"), Backend)
        ):
            break
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None
    code = frame.f_code
    where = (code, frame.f_lineno)
    site = _call_sites.get(where)
    if site is None:
        if len(_call_sites) >= _MAX_CALL_SITES:
            _call_sites.clear()
        site = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        _call_sites[where] = site
    return site


# The token text of a BackendCall (backend identity, credential fingerprint, method),
# per those three: every call of one backend method shares it.
_call_heads: dict[tuple[str, str | None, str], str] = {}
_MAX_CALL_HEADS = 1024


def _call_head(call: BackendCall) -> str | None:
    backend = call.backend
    memo_key = (backend.identity(), backend.credential_fingerprint(), call.method)
    head = _call_heads.get(memo_key)
    if head is None:
        head = _token_text(call)
        if head is None:
            return None
        if len(_call_heads) >= _MAX_CALL_HEADS:
            _call_heads.clear()
        _call_heads[memo_key] = head
    return head


_MAX_CALL_FUNCTIONS = 1024


def _call_function(backend: Backend, method: str, pure: bool, site: str | None) -> BackendCall:
    """The node function of a call, shared by the calls one line of code makes: a
    BackendCall never changes, and a graph of many calls then holds one per line.

    Found through weak references kept on the backend itself (never pickled): a strong
    one would make a cycle (the call refers to its backend), and a backend nobody uses
    any more must be freed at once, closing its connections.
    """
    functions = backend.__dict__.get("_call_functions")
    if functions is None or len(functions) >= _MAX_CALL_FUNCTIONS:
        functions = backend.__dict__["_call_functions"] = {}
    reference = functions.get((method, pure, site))
    call = reference() if reference is not None else None
    if call is None:
        call = BackendCall(backend, method, pure, site)
        functions[(method, pure, site)] = weakref.ref(call)
    return call


def _backend_call(
    backend: Backend, method: str, item: Any, params: dict[str, Any], pure: bool
) -> Any:
    """How a backend method call becomes a node (installed as the backends' builder)."""
    call = _call_function(backend, method, pure, _user_call_site())
    name = f"{backend.provider}-{method}"
    if is_eager():
        return eager_or_lazy(call, (item,), params, name=name, pure=pure)
    args = (item,)
    plain = is_plain(item) and all(is_plain(value, 1) for value in params.values())
    if not pure:
        key = f"{name}-{_impure_token()}"  # every impure call is its own node
    elif plain and (head := _call_head(call)) is not None:
        # What _quick_token says for plain arguments, without looking at them again.
        text = f"{head}|{args!r}|{sorted(params.items())!r}" if params else f"{head}|{args!r}"
        key = f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:32]}"
    else:
        token = _quick_token(call, args, params, head=_call_head(call))
        key = f"{name}-{token or tokenize(call, args, params)}"
    if plain:  # no lazy value inside: the node is the call as it is
        return _node_value(key, Task(key, call, item, **params), (), None)
    node, collections = build_task(key, call, args, params)
    return _node_value(key, node, tuple(collections) if collections else (), None)


install_call_builder(_backend_call)


class FesteTaskFunction:
    """A function whose calls build graph nodes (or run at once in eager mode).

    Created by :func:`feste_task`. Works as a plain function and, through ``__get__``,
    as a method: ``self`` then becomes the first argument of the node.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None = None,
        pure: bool | None = None,
        nout: int | None = None,
    ) -> None:
        self.func = func
        self.name = name
        self.pure = pure
        self.nout = nout
        functools.update_wrapper(self, func)
        # Worked out at the first pure call and kept, as dask.delayed keeps its
        # function's token: tokenizing a function (pickling a closure) costs far more
        # than the rest of a call.
        self._cached_token: tuple[Any, str] | None = None  # (function, its token)
        self._cached_pure_task: PureTask | None = None

    def __repr__(self) -> str:
        return f"feste_task({funcname(self.func)})"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return types.MethodType(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pure = kwargs.pop("pure", self.pure)
        key = kwargs.pop("dask_key_name", None)
        if is_eager():
            args, kwargs = _compute_if_lazy(args, kwargs)
            return self.func(*args, **kwargs)
        func: Callable[..., Any] = self.func
        token_source: Any = func
        if pure:
            token_source = self._function_token()
            # Pure tasks may be answered by the result cache (when one is on); the
            # node's key is still that of the function itself.
            func = self._pure_task()
        return _call_lazily(
            func,
            args,
            kwargs,
            name=self.name or funcname(self.func),
            pure=pure,
            nout=self.nout,
            key=key,
            token_source=token_source,
        )

    def _function_token(self) -> str:
        """What identifies the wrapped function in the keys of pure calls."""
        cached = self._cached_token
        if cached is None or cached[0] is not self.func:  # func is a public attribute
            token = _function_text(self.func) or f"fn:{tokenize(self.func)}"
            cached = self._cached_token = (self.func, token)
        return cached[1]

    def _pure_task(self) -> Callable[..., Any]:
        """The node function of pure calls: the cache-aware wrapper (not for coroutine
        functions, which the engine awaits itself)."""
        if inspect.iscoroutinefunction(self.func):
            return self.func
        if self._cached_pure_task is None or self._cached_pure_task.func is not self.func:
            self._cached_pure_task = PureTask(self.func)
        return self._cached_pure_task

    def __dask_tokenize__(self) -> Any:
        return ("feste_task", tokenize(self.func), self.name, self.nout)


@overload
def feste_task(
    func: Callable[..., Any],
    *,
    name: str | None = ...,
    pure: bool | None = ...,
    nout: int | None = ...,
) -> FesteTaskFunction: ...


@overload
def feste_task(
    func: None = ..., *, name: str | None = ..., pure: bool | None = ..., nout: int | None = ...
) -> Callable[[Callable[..., Any]], FesteTaskFunction]: ...


def feste_task(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    pure: bool | None = None,
    nout: int | None = None,
) -> Any:
    """Make ``func`` lazy: calling it builds a graph node instead of running it.

    Use as ``@feste_task``, ``@feste_task(pure=True, nout=2)`` or ``feste_task(fn)``, on
    functions and on methods. ``pure=True`` gives identical calls one shared node (the key
    is a hash of the function and its arguments); ``name`` is the key prefix; ``nout``
    makes the result unpackable (``a, b = f(x)``). Call-time keywords ``pure=`` and
    ``dask_key_name=`` override per call, as in ``dask.delayed``.
    """
    if nout is not None:
        if isinstance(nout, bool) or not isinstance(nout, int):
            raise TypeError(
                f"feste_task: nout must be a non-negative integer or None, got {nout!r}"
            )
        if nout < 0:
            raise ValueError(f"feste_task: nout must be a non-negative integer, got {nout}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"feste_task: name must be a string, got {name!r}")
    if func is None:
        return functools.partial(feste_task, name=name, pure=pure, nout=nout)
    if not callable(func):
        raise TypeError(
            f"feste_task expects a function or method to wrap, got {type(func).__name__} "
            f"{func!r}; use it as @feste_task above a def, or feste_task(some_function)"
        )
    if isinstance(func, FesteTaskFunction):
        # Wrapping again keeps the function once; options given now override the old ones.
        if name is None and pure is None and nout is None:
            return func
        return FesteTaskFunction(
            func.func,
            name=func.name if name is None else name,
            pure=func.pure if pure is None else pure,
            nout=func.nout if nout is None else nout,
        )
    return FesteTaskFunction(func, name=name, pure=pure, nout=nout)


class FesteBase:
    """Base class for objects whose methods are feste tasks (backends, prompts).

    Methods decorated with :func:`feste_task` check eager mode each time they are called,
    so an object created anywhere behaves eagerly inside ``context.set(eager=True)``.
    Subclasses say what identifies them in graph keys by overriding
    :meth:`_token_state`; by default it is every public attribute.
    """

    def _token_state(self) -> Any:
        return {
            name: value for name, value in sorted(vars(self).items()) if not name.startswith("_")
        }

    def __dask_tokenize__(self) -> Any:
        return (type(self).__module__, type(self).__qualname__, tokenize(self._token_state()))


def lazy_values_in(obj: Any) -> bool:
    """True when ``obj`` is, or contains, a lazy Dask/feste value."""
    if is_dask_collection(obj):
        return True
    _, collections = unpack_collections(obj)
    return bool(collections)


def lazy_call(
    func: Callable[..., Any],
    *args: Any,
    name: str | None = None,
    pure: bool | None = None,
    token_source: Any = None,
    **kwargs: Any,
) -> FesteDelayed:
    """Internal: build a node for ``func(*args, **kwargs)`` (used by prompts and backends)."""
    return _call_lazily(func, args, kwargs, name=name, pure=pure, token_source=token_source)
