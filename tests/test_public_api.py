"""The public surface: ``feste.__all__``, every public module's ``__all__``, and the
module paths and names of feste 0.1 that must keep importing."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import types

import pytest

import feste

# What ``from feste import *`` gives. Changing it is an API change: update this list
# on purpose, together with the docs.
EXPORTED = {
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
}

# feste 0.1's public modules and the names users imported from them.
FESTE_01_NAMES = {
    "feste.compute": ["compute"],
    "feste.context": ["set", "get"],
    "feste.task": ["feste_task", "FesteDelayed", "FesteBase"],
    "feste.graph": ["FesteGraph"],
    "feste.prompt": ["Prompt", "FesteEnvironment", "LanguageMismatch"],
    "feste.optimization": ["Optimization", "Optimizer"],
    "feste.scheduler": ["get_scheduler", "SCHEDULERS"],
    "feste.backend": [],
}


def _is_private(module_name: str) -> bool:
    return any(part.startswith("_") for part in module_name.split("."))


def public_modules() -> list[str]:
    names = ["feste"]
    for info in pkgutil.walk_packages(feste.__path__, "feste."):
        if not _is_private(info.name):
            names.append(info.name)
    return sorted(names)


def test_top_level_all_is_sorted_and_exact():
    assert feste.__all__ == sorted(feste.__all__)
    assert len(feste.__all__) == len(set(feste.__all__))
    assert set(feste.__all__) == EXPORTED


def test_top_level_names_exist_and_none_is_private():
    for name in feste.__all__:
        assert not name.startswith("_")
        value = getattr(feste, name)
        if isinstance(value, types.ModuleType):
            assert not _is_private(value.__name__), f"feste.{name} is private {value.__name__}"


def test_star_import_gives_exactly_all():
    namespace: dict[str, object] = {}
    exec("from feste import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == EXPORTED


def test_version_matches_the_installed_distribution():
    assert feste.__version__ == importlib.metadata.version("feste")


def test_the_public_modules_are_found():
    # Guards the walk below: if it found nothing, the per-module checks would pass vacuously.
    found = public_modules()
    for name in ("feste.context", "feste.errors", "feste.graph", "feste.task", "feste.scheduler"):
        assert name in found


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_module_has_a_sorted_all_of_existing_names(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    assert list(exported) == sorted(exported), f"{module_name}.__all__ is not sorted"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize("module_name", sorted(FESTE_01_NAMES))
def test_feste_01_module_paths_and_names_still_import(module_name):
    module = importlib.import_module(module_name)
    for name in FESTE_01_NAMES[module_name]:
        assert hasattr(module, name), f"{module_name}.{name} is gone"


def test_top_level_names_are_the_module_objects():
    from feste.compute import compute
    from feste.errors import Failure, FesteError
    from feste.graph import FesteGraph
    from feste.prompt import Prompt
    from feste.task import FesteBase, FesteDelayed, feste_task

    assert feste.compute is compute
    assert feste.context is importlib.import_module("feste.context")
    assert (feste.Failure, feste.FesteError, feste.FesteGraph) == (Failure, FesteError, FesteGraph)
    assert (feste.FesteBase, feste.FesteDelayed, feste.feste_task) == (
        FesteBase,
        FesteDelayed,
        feste_task,
    )
    assert feste.Prompt is Prompt


def test_scheduler_compat_module_re_exports_the_registry():
    import feste.scheduler as old
    import feste.schedulers as new

    assert old.get_scheduler is new.get_scheduler
    assert old.SCHEDULERS is new.SCHEDULERS
    assert old.DEFAULT_SCHEDULER == new.DEFAULT_SCHEDULER
    assert "feste.schedulers" in (old.__doc__ or "")
    assert callable(old.get_scheduler("sync"))
