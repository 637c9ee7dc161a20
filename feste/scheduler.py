"""Compatibility module: the scheduler registry under its feste 0.1 name.

feste 0.1 exposed its scheduler as ``feste.scheduler``. The implementation now lives in
the :mod:`feste.schedulers` package (one module per scheduler, and the name -> module
registry); this module only re-exports the registry so that old imports keep working.
"""

from feste.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, get_scheduler

__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "get_scheduler"]
