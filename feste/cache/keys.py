"""Cache keys: the content address of a call.

Design
------
A key is the SHA-256 (hex) of a canonical JSON description of everything that decides
a call's answer, and nothing else:

* for a backend call: the provider, the backend's identity (its class, base URL and
  settings: :meth:`~feste.backend.base.Backend.identity`, which never includes the API
  key), the method, every keyword parameter (the model among them) and the item. The
  :data:`ROUTING_PARAMS` (``batch_api``) say how a call is sent, not what it answers,
  and are left out: a call answered online and through a Batch API share one key;
* for a plain ``feste_task(pure=True)``: the function's module, name and code, and its
  arguments;
* a ``scope`` when the answer belongs to one run only: calls made with ``pure=False``
  are cached within a named run (so a resumed run replays them) under the run's name
  and the call's occurrence number, and are never shared with another run.

The description is JSON with sorted keys, so equal calls give equal keys in any
process; a part that JSON cannot describe (an arbitrary object among the parameters)
is described by Dask's deterministic token of it. The API key and request headers are
never part of it: they are not inputs of the answer, and the key would otherwise
carry a secret (even hashed) into a shared database.
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Callable, Mapping
from typing import Any

from dask.base import tokenize

from feste.backend.base import Backend

__all__ = [
    "KEY_VERSION",
    "ROUTING_PARAMS",
    "call_head",
    "call_key",
    "canonical",
    "function_identity",
    "item_key",
    "task_key",
]

#: Part of every key: a change in what keys describe starts a fresh address space.
KEY_VERSION = 1

#: Call parameters that choose how a call is sent (never sent to the provider, never
#: part of a key): ``batch_api`` routes a call through the provider's Batch API.
ROUTING_PARAMS = frozenset({"batch_api"})


def _fallback(value: Any) -> Any:
    # json.dumps calls this for what it cannot write itself (tuples it writes as lists).
    if isinstance(value, set | frozenset):
        return {"$set": sorted(canonical(member) for member in value)}
    return {"$token": tokenize(value)}


# One encoder for every key: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_fallback
)
# What the encoder writes for a str (most items are one), without its Python layers.
_encode_text = json.encoder.encode_basestring


def canonical(value: Any) -> str:
    """Canonical JSON for ``value`` (sorted keys; non-JSON parts by their Dask token)."""
    if type(value) is str:
        return _encode_text(value)
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError):
        # Dict keys of mixed types cannot be sorted: describe the whole value by token.
        return json.dumps({"$token": tokenize(value)})


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


# The part of a call key shared by calls of one backend, method and parameters: encoded
# once (a warm re-run computes thousands of keys that differ only in their item).
_heads: dict[Any, str] = {}
_MAX_HEADS = 4096


def _call_head(backend: Backend, method: str, params: Mapping[str, Any]) -> str:
    identity = backend.identity()
    if not ROUTING_PARAMS.isdisjoint(params):
        params = {name: value for name, value in params.items() if name not in ROUTING_PARAMS}
    try:
        memo_key: Any = (identity, method, tuple(sorted(params.items())))
        head = _heads.get(memo_key)
    except TypeError:  # a parameter value that cannot be hashed (a list of stop words)
        memo_key, head = None, None
    if head is None:
        head = canonical(
            {
                "v": KEY_VERSION,
                "kind": "call",
                "provider": backend.provider,
                "backend": identity,
                "method": method,
                "params": dict(params),
            }
        )
        if memo_key is not None:
            if len(_heads) >= _MAX_HEADS:
                _heads.clear()
            _heads[memo_key] = head
    return head


def call_key(
    backend: Backend,
    method: str,
    item: Any,
    params: Mapping[str, Any],
    *,
    scope: Any = None,
) -> str:
    """The key of ``backend.method(item, **params)``; ``scope`` confines it to one run."""
    return item_key(call_head(backend, method, params), item, scope=scope)


def call_head(backend: Backend, method: str, params: Mapping[str, Any]) -> str:
    """The part of :func:`call_key` shared by the calls of one backend, method and
    parameters, for :func:`item_key` (a caller with many calls works it out once)."""
    return _call_head(backend, method, params)


def item_key(head: str, item: Any, *, scope: Any = None) -> str:
    """:func:`call_key` of ``item`` for the calls whose :func:`call_head` is ``head``."""
    text = f"{head}\nitem:{canonical(item)}"
    if scope is not None:
        text += f"\nscope:{canonical(scope)}"
    return hashlib.sha256(text.encode()).hexdigest()


def _code_fingerprint(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _code_fingerprint(constant, digest)
        else:
            digest.update(repr(constant).encode())


def function_identity(func: Callable[..., Any]) -> str:
    """Module, qualified name and a hash of the code of ``func``.

    Editing the function's body changes it, so a cached result of the old code is not
    served for the new one (line numbers and comments do not count). Globals the
    function reads are not part of it.
    """
    code = getattr(func, "__code__", None)
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    if code is None:
        return f"{name}:{tokenize(func)}"
    digest = hashlib.sha256()
    _code_fingerprint(code, digest)
    return f"{name}:{digest.hexdigest()[:32]}"


def task_key(func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The key of a pure Python task ``func(*args, **kwargs)``."""
    parts = {
        "v": KEY_VERSION,
        "kind": "task",
        "function": function_identity(func),
        "args": list(args),
        "kwargs": dict(kwargs),
    }
    return _digest(parts)
