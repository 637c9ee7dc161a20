"""TEMPORARY: replaced by the async engine."""

from feste.schedulers.sync import get  # noqa: F401
