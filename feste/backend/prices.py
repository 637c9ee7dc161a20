"""Prices per provider and model, and what a usage costs in dollars.

Design
------
The prices live in one dated data file, ``feste/backend/prices.toml`` (package data):
per provider and model, dollars per 1M input, cached input and output tokens, per
rerank search, and the providers' Batch API prices. :func:`price_table` is that table
merged with the ``prices`` option (a TOML file or a mapping of the same layout,
merged model by model, so a user can correct one price or add a model). Dollar
amounts anywhere in feste (:mod:`feste.usage`, ``feste.explain``) go through
:meth:`PriceTable.cost`.

Batch API requests (:mod:`feste._batch_jobs`) are priced with ``batch=True``: a
model's ``batch_input`` / ``batch_output`` prices, or, where the table has none, half
its list prices (:data:`BATCH_DISCOUNT`, the providers' Batch API discount).

A reported model name may carry a snapshot suffix (OpenAI answers
``gpt-4o-mini-2024-07-18`` for ``gpt-4o-mini``): a name not in the table takes the
price of the longest table name it extends by ``-`` and digits. A model that is not
priced costs ``None`` (unknown), never zero.
"""

from __future__ import annotations

import os
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from feste import context
from feste.backend.types import Usage
from feste.errors import OptionError

__all__ = ["BATCH_DISCOUNT", "Price", "PriceTable", "builtin_prices", "price_table"]

#: The share of the list price a Batch API request costs where the table names no
#: batch price (OpenAI's and others' Batch APIs bill half).
BATCH_DISCOUNT = 0.5

_PER_TOKENS = 1_000_000
_SNAPSHOT_SUFFIX = re.compile(r"-[0-9][0-9-]*")


@dataclass(frozen=True)
class Price:
    """One model's prices: dollars per 1M tokens (``input``, ``cached_input``,
    ``output``, ``batch_input``, ``batch_output``) and per ``search``; None: not
    priced (a usage that needs it costs ``None``)."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None
    search: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None

    def cost(self, usage: Usage, *, batch: bool = False) -> float | None:
        """Dollars for ``usage`` at the standard prices (``batch=True``: the Batch API
        prices); None when a price it needs is missing. Cached prompt tokens cost
        ``cached_input`` (``input`` without one)."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        input_price, cached_price, output_price = self.input, self.cached_input, self.output
        if cached_price is None:
            cached_price = input_price
        if batch:
            input_price = _batch_price(self.batch_input, self.input)
            cached_price = _batch_price(None, cached_price)
            output_price = _batch_price(self.batch_output, self.output)
        # (count, dollars per unit, units per price)
        parts = (
            (usage.prompt_tokens - cached, input_price, _PER_TOKENS),
            (cached, cached_price, _PER_TOKENS),
            (usage.completion_tokens, output_price, _PER_TOKENS),
            (usage.search_units, self.search, 1),
        )
        total = 0.0
        for count, price, per in parts:
            if not count:
                continue
            if price is None:
                return None
            total += count * price / per
        return _rounded(total)


def _batch_price(batch_price: float | None, list_price: float | None) -> float | None:
    if batch_price is not None:
        return batch_price
    return None if list_price is None else list_price * BATCH_DISCOUNT


def _rounded(dollars: float) -> float:
    # Twelve decimals: sums of many small amounts compare equal to the arithmetic.
    return round(dollars, 12)


_FIELDS = tuple(field.name for field in fields(Price))


@dataclass(frozen=True)
class PriceTable:
    """Prices per provider and model, with the date and sources they were read from."""

    prices: Mapping[str, Mapping[str, Price]]
    date: str | None = None
    currency: str = "USD"
    sources: tuple[str, ...] = ()

    def price(self, provider: str, model: str | None) -> Price | None:
        """The price of ``model`` (or of the model its snapshot name extends); None."""
        if model is None:
            return None
        models = self.prices.get(provider, {})
        found = models.get(model)
        if found is not None:
            return found
        extended = [
            name
            for name in models
            if model.startswith(name) and _SNAPSHOT_SUFFIX.fullmatch(model[len(name) :])
        ]
        return models[max(extended, key=len)] if extended else None

    def cost(self, provider: str, usage: Usage, *, batch: bool = False) -> float | None:
        """Dollars for ``usage`` of ``provider`` (None: the model or a price is unknown);
        ``batch=True`` at the Batch API prices."""
        price = self.price(provider, usage.model)
        return None if price is None else price.cost(usage, batch=batch)


def _bad(where: str, problem: str) -> OptionError:
    return OptionError(f"invalid price table {where}: {problem}")


def _read(source: Any) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise _bad(repr(path), f"cannot be read ({error.strerror or error})") from None
    except tomllib.TOMLDecodeError as error:
        raise _bad(repr(path), f"is not valid TOML ({error})") from None


def _merged(base: PriceTable, layer: Mapping[str, Any], where: str) -> PriceTable:
    """``base`` with the prices of ``layer`` (same layout as prices.toml) over it."""
    providers = {provider: dict(models) for provider, models in base.prices.items()}
    date, currency, sources = base.date, base.currency, base.sources
    for name, value in layer.items():
        if name == "date":
            date = str(value)
            continue
        if name == "currency":
            currency = str(value)
            continue
        if name == "sources":
            sources = tuple(str(item) for item in value)
            continue
        if not isinstance(value, Mapping):
            raise _bad(where, f"{name!r} must be a table of models, got {value!r}")
        models = providers.setdefault(name, {})
        for model, entry in value.items():
            if not isinstance(entry, Mapping):
                raise _bad(where, f"{name}.{model} must be a table of prices, got {entry!r}")
            unknown = sorted(set(entry) - set(_FIELDS))
            if unknown:
                raise _bad(
                    where,
                    f"{name}.{model} has unknown field {unknown[0]!r}; price fields: "
                    + ", ".join(_FIELDS),
                )
            values = dict(vars(models[model])) if model in models else {}
            for field_name, amount in entry.items():
                if (
                    isinstance(amount, bool)
                    or not isinstance(amount, (int, float))
                    or not amount >= 0
                ):
                    raise _bad(
                        where,
                        f"{name}.{model}.{field_name} must be a number of dollars >= 0, "
                        f"got {amount!r}",
                    )
                values[field_name] = float(amount)
            models[model] = Price(**values)
    return PriceTable(providers, date, currency, sources)


_builtin: PriceTable | None = None
_overridden: dict[Any, tuple[Any, PriceTable]] = {}
_lock = threading.Lock()


def builtin_prices() -> PriceTable:
    """The table shipped with feste (``prices.toml``), read once."""
    global _builtin
    with _lock:
        if _builtin is None:
            text = resources.files("feste.backend").joinpath("prices.toml").read_text()
            _builtin = _merged(PriceTable({}), tomllib.loads(text), "prices.toml")
        return _builtin


def price_table() -> PriceTable:
    """The built-in table with the ``prices`` option merged over it."""
    source = context.get("prices")
    base = builtin_prices()
    if source is None:
        return base
    memo_key = id(source) if isinstance(source, Mapping) else os.fspath(source)
    with _lock:
        found = _overridden.get(memo_key)
        if found is not None and found[0] is source:
            return found[1]
    where = "given in the prices option" if isinstance(source, Mapping) else repr(memo_key)
    table = _merged(base, _read(source), where)
    with _lock:
        if len(_overridden) > 64:
            _overridden.clear()
        _overridden[memo_key] = (source, table)
    return table
